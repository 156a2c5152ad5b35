"""BatchBitmask and xgrammar's apply_token_bitmask_inplace against the plain-torch reference."""

from __future__ import annotations

import random

import pytest
import torch
import xgrammar as xgr

from structured import (
    BatchBitmask,
    GrammarCompilerService,
    RequestGrammar,
    StructuredOutputsParams,
    accept_batch,
    apply_bitmask_reference,
    build_tokenizer_info,
    unpack_bitmask,
)
from structured.bitmask import FillWorker
from structured.matcher import fill_stop_row

from .conftest import EOS, ODD_VOCAB, PADDED_VOCAB, VOCAB


def test_unpack_reads_bit_j_of_word_w_as_token_32w_plus_j():
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 | (1 << 5)
    bitmask[0, 1] = -(1 << 31)  # bit 31 only: the sign bit of an int32
    bitmask[0, 2] = 1 << 1
    assert unpack_bitmask(bitmask, 70)[0].nonzero().flatten().tolist() == [0, 5, 63, 65]


def test_stop_row_sets_exactly_the_stop_bits_sign_bit_included():
    bitmask = torch.full((2, 3), -1, dtype=torch.int32)
    fill_stop_row(bitmask, 1, [31, 40, 63])
    assert unpack_bitmask(bitmask, 96)[1].nonzero().flatten().tolist() == [31, 40, 63]
    assert unpack_bitmask(bitmask, 96)[0].all()


@pytest.mark.parametrize("vocab_size", [33, 100, 4096, PADDED_VOCAB])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_xgrammar_apply_equals_the_reference(vocab_size, dtype):
    gen = torch.Generator().manual_seed(vocab_size)
    rows = 9
    bitmask = torch.randint(-(2**31), 2**31, (rows, (vocab_size + 31) // 32), dtype=torch.int64, generator=gen)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(rows, vocab_size, generator=gen).to(dtype)
    for indices in (None, [0, 3, 8], [5]):
        ours, theirs = logits.clone(), logits.clone()
        apply_bitmask_reference(ours, bitmask, indices)
        xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=indices, vocab_size=vocab_size)
        assert torch.equal(ours, theirs)
        untouched = [r for r in range(rows) if indices is not None and r not in indices]
        assert torch.equal(theirs[untouched], logits[untouched])
        assert torch.isinf(ours).any()


def test_fill_and_apply_mask_only_the_filled_rows(service, tokenizer):
    choice = service.compile_sync(StructuredOutputsParams(choice=["yes", "no"]))
    digits = service.compile_sync(StructuredOutputsParams(regex="[0-9]+"))
    grammars = [RequestGrammar(choice), RequestGrammar(digits)]
    bitmask = BatchBitmask(8, VOCAB)
    bitmask.fill(grammars, [5, 2])
    assert bitmask.rows == [5, 2]
    logits = torch.randn(6, VOCAB)  # a step with 6 rows out of 8 possible
    masked = logits.clone()
    bitmask.apply(masked)
    assert torch.equal(masked[[0, 1, 3, 4]], logits[[0, 1, 3, 4]])
    for row, grammar in ((5, grammars[0]), (2, grammars[1])):
        expected = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
        grammar.matcher.fill_next_token_bitmask(expected, 0)
        assert torch.equal(torch.isfinite(masked[row]), unpack_bitmask(expected, VOCAB)[0])
    allowed_first = {tokenizer.decode([t]) for t in torch.isfinite(masked[5]).nonzero().flatten().tolist()}
    assert allowed_first and all("yes".startswith(s) or "no".startswith(s) for s in allowed_first)
    # A step without constrained rows costs nothing and masks nothing.
    bitmask.clear()
    again = logits.clone()
    bitmask.apply(again)
    assert torch.equal(again, logits)


def test_a_fill_started_in_the_background_masks_what_fill_masks(service, tokenizer):
    specs = [StructuredOutputsParams(choice=["yes", "no"]), StructuredOutputsParams(regex="[0-9]+"),
             StructuredOutputsParams(json_object=True)]
    grammars = [RequestGrammar(service.compile_sync(s)) for s in specs]
    first = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    grammars[1].matcher.fill_next_token_bitmask(first, 0)
    assert grammars[1].accept_token(int(unpack_bitmask(first, VOCAB)[0].nonzero()[0]))  # one digit in
    background, inline = BatchBitmask(8, VOCAB), BatchBitmask(8, VOCAB)
    logits = torch.randn(8, VOCAB)
    for step in range(2):
        rows = [6, 0, 3] if step == 0 else [1, 4, 2]
        background.start_fill(grammars, rows)
        inline.fill(grammars, rows)
        assert background.rows == inline.rows == rows
        a, b = logits.clone(), logits.clone()
        background.apply(a)  # waits for the fill
        inline.apply(b)
        assert torch.equal(a, b) and torch.isinf(a[rows]).any() and not torch.isinf(a[[5, 7]]).any()
    background.start_fill(grammars[:1], [2])
    background.clear()  # waits too: nothing is masked, and nothing writes the buffer afterwards
    assert background.rows == [] and not background._filling



def _walk(grammar: RequestGrammar, steps: int, rng: random.Random) -> None:
    """Feed the grammar `steps` tokens its own bitmask allows (not a stop token)."""
    row = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    for _ in range(steps):
        grammar.matcher.fill_next_token_bitmask(row, 0)
        allowed = [t for t in unpack_bitmask(row, VOCAB)[0].nonzero().flatten().tolist() if t != EOS]
        assert grammar.accept_token(rng.choice(allowed))


@pytest.mark.parametrize("background", [True, False])
def test_an_accept_handed_to_the_fill_equals_accept_batch_then_fill(service, tokenizer, background):
    """start_fill(accept=...) (the worker accepts the step's tokens, then fills) gives what
    accept_batch then fill give: the same answers, counts, terminations and bitmask rows (the
    accepted tokens change them: the fill comes after the accept), a refused token refused, a
    stop token's row filled as terminated."""
    specs = [StructuredOutputsParams(json_object=True), StructuredOutputsParams(regex="[0-9]{2,6}"),
             StructuredOutputsParams(regex="[a-z]+"), StructuredOutputsParams(regex="(ab|cd)[0-9]")]
    compiled = [service.compile_sync(s) for s in specs]
    ours, theirs = [RequestGrammar(c) for c in compiled], [RequestGrammar(c) for c in compiled]
    for i in range(3):
        _walk(ours[i], 2, random.Random(i))
        _walk(theirs[i], 2, random.Random(i))
    assert ours[1].matcher.is_completed()  # two digits in: a stop token ends it
    rows = [5, 0, 2, 7]
    before = BatchBitmask(8, VOCAB)
    before.fill(theirs, rows)
    allowed = unpack_bitmask(before.host[[5, 7]], VOCAB)
    grow = int(allowed[0].nonzero()[0])  # a token the JSON grammar allows here
    digit = tokenizer.encode("7")[0]  # refused by [a-z]+
    opening = tokenizer.encode("ab")[0]
    assert allowed[1, opening] and not allowed[1, tokenizer.encode("9")[0]]
    tokens = [grow, EOS, digit, opening]
    a_mask, b_mask = BatchBitmask(8, VOCAB), BatchBitmask(8, VOCAB)
    a_mask.start_fill(ours, rows, background=background, accept=(ours, tokens))
    answer = a_mask.accepted()
    expected = accept_batch(theirs, tokens)
    b_mask.fill(theirs, rows)
    assert answer == expected == [True, True, False, True]
    assert [g.num_tokens for g in ours] == [g.num_tokens for g in theirs]
    assert [g.is_terminated for g in ours] == [g.is_terminated for g in theirs] and ours[1].is_terminated
    assert torch.equal(a_mask.host[rows], b_mask.host[rows])
    for row in (5, 7):  # the accepted tokens moved these rows' masks: filled after the accept
        assert not torch.equal(a_mask.host[row], before.host[row]), row
    after = unpack_bitmask(a_mask.host[7:8], VOCAB)[0]
    assert after[tokenizer.encode("9")[0]]  # "ab" in: a digit next
    logits = torch.randn(8, VOCAB)
    a, b = logits.clone(), logits.clone()
    a_mask.apply(a)
    b_mask.apply(b)
    assert torch.equal(a, b)
    assert unpack_bitmask(a_mask.host[0:1], VOCAB)[0].nonzero().flatten().tolist() == ours[1].stop_token_ids
    with pytest.raises(RuntimeError, match="nothing to accept"):
        a_mask.accepted()


def test_an_accept_never_collected_is_booked_by_the_next_fill(service):
    grammar = RequestGrammar(service.compile_sync(StructuredOutputsParams(regex="[0-9]{1,4}")))
    mask = BatchBitmask(4, VOCAB)
    digit = int(unpack_bitmask(_first_row(grammar), VOCAB)[0].nonzero()[0])
    mask.start_fill([grammar], [1], accept=([grammar], [digit]))
    mask.start_fill([grammar], [1])  # no accepted() in between: the accept is booked, not lost
    mask.finish_fill()
    assert grammar.num_tokens == 1
    with pytest.raises(RuntimeError, match="nothing to accept"):
        mask.accepted()
    mask.start_fill([grammar], [1], accept=([grammar], [EOS]))  # a stop token after it: booked too
    mask.start_fill([grammar], [2])
    mask.finish_fill()
    assert grammar.num_tokens == 2 and grammar.is_terminated


def _first_row(grammar: RequestGrammar) -> torch.Tensor:
    row = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    grammar.matcher.fill_next_token_bitmask(row, 0)
    return row


def test_an_accept_that_fails_in_the_worker_raises_at_accepted_and_fills_nothing(service, monkeypatch):
    import structured.bitmask as bitmask_module

    def broken(handles, tokens, debug):
        raise RuntimeError("xgrammar broke")

    grammar = RequestGrammar(service.compile_sync(StructuredOutputsParams(regex="[0-9]+")))
    mask = BatchBitmask(4, VOCAB)
    filled = []
    mask._fill = lambda *args: filled.append(args)
    monkeypatch.setattr(bitmask_module, "batch_accept_token", broken)
    mask.start_fill([grammar], [1], accept=([grammar], [5]))
    with pytest.raises(RuntimeError, match="xgrammar broke"):
        mask.accepted()
    mask.finish_fill()  # the fill was skipped, not failed
    assert filled == [] and grammar.num_tokens == 0
    monkeypatch.undo()
    mask._fill = mask._batch._handle.batch_fill_next_token_bitmask
    digit = RequestGrammar(service.compile_sync(StructuredOutputsParams(regex="[0-9]+")))
    mask.start_fill([digit], [1])  # usable again, without an accept
    mask.finish_fill()
    assert unpack_bitmask(mask.host[1:2], VOCAB)[0].any()

def test_fill_worker_runs_one_call_beside_the_caller_raises_its_error_and_ends_with_its_owner():
    import gc
    import threading
    import time

    worker = FillWorker()
    released = threading.Event()
    seen = []

    def blocking(value):  # lets the GIL go until the test releases it
        released.wait(5)
        seen.append(value)

    worker.start(blocking, (1,))
    assert worker._slot[0] is None  # start() returned once the worker had taken the call
    assert worker.busy and seen == []  # and while it runs
    with pytest.raises(RuntimeError, match="still to be finished"):
        worker.start(blocking, (2,))
    released.set()
    worker.finish()
    assert seen == [1] and not worker.busy
    worker.finish()  # nothing to wait for

    def failing():
        raise ValueError("bad fill")

    worker.start(failing, ())
    with pytest.raises(ValueError, match="bad fill"):
        worker.finish()
    worker.start(seen.append, (3,))  # usable after an error
    worker.finish()
    assert seen == [1, 3]

    names = lambda: [t for t in threading.enumerate() if t.name == "bitmask-fill"]  # noqa: E731
    before = len(names())
    del worker
    gc.collect()
    deadline = time.monotonic() + 5
    while len(names()) >= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(names()) == before - 1


def test_terminated_grammar_row_allows_only_eos(service, tokenizer):
    grammar = RequestGrammar(service.compile_sync(StructuredOutputsParams(choice=["ok"])))
    grammar.accept_tokens(tokenizer.encode("ok", add_special_tokens=False) + [EOS])
    live = RequestGrammar(service.compile_sync(StructuredOutputsParams(choice=["ok"])))
    bitmask = BatchBitmask(2, VOCAB)
    bitmask.fill([grammar, live], [0, 1])
    logits = torch.zeros(2, VOCAB)
    bitmask.apply(logits)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOS]
    assert not torch.isfinite(logits[1])[EOS]


def test_bad_rows_and_shapes_raise(service):
    grammar = RequestGrammar(service.compile_sync(StructuredOutputsParams(regex="a")))
    bitmask = BatchBitmask(4, VOCAB)
    with pytest.raises(ValueError, match="distinct"):
        bitmask.fill([grammar, grammar], [1, 1])
    with pytest.raises(ValueError, match="distinct and in"):
        bitmask.fill([grammar], [4])
    with pytest.raises(ValueError, match="1 grammars but 2 rows"):
        bitmask.fill([grammar], [0, 1])
    bitmask.fill([grammar], [3])
    with pytest.raises(ValueError, match="logits must be"):
        bitmask.apply(torch.zeros(4, VOCAB + 1))
    with pytest.raises(ValueError, match="past the 2 logits rows"):
        bitmask.apply(torch.zeros(2, VOCAB))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_apply_equals_the_cpu_apply_step_after_step(service, tokenizer):
    compiled = [service.compile_sync(StructuredOutputsParams(json_object=True)),
                service.compile_sync(StructuredOutputsParams(regex="[0-9]{2,6}"))]
    grammars = {3: RequestGrammar(compiled[0]), 0: RequestGrammar(compiled[1])}
    on_cpu, on_cuda = BatchBitmask(6, PADDED_VOCAB), BatchBitmask(6, PADDED_VOCAB, "cuda")
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # several steps: the host buffer is refilled after each upload
        rows = list(grammars)
        for bitmask in (on_cpu, on_cuda):
            bitmask.fill([grammars[r] for r in rows], rows)
        logits = torch.randn(5, PADDED_VOCAB, generator=gen, dtype=torch.float32)
        expected, got = logits.clone(), logits.cuda().to(torch.bfloat16)
        on_cpu.apply(expected)
        on_cuda.apply(got)
        assert torch.equal(torch.isfinite(got.cpu()), torch.isfinite(expected))
        assert torch.equal(got.cpu()[[1, 2, 4]], logits[[1, 2, 4]].to(torch.bfloat16))
        for row in rows:  # advance each live grammar by its most likely allowed token
            if not grammars[row].is_terminated:
                assert grammars[row].accept_token(int(expected[row].argmax()))


def test_fill_threads_must_be_a_positive_integer():
    from structured.config import StructuredOutputsConfig

    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="fill_threads"):
            StructuredOutputsConfig(fill_threads=bad)
    assert StructuredOutputsConfig(fill_threads=4).fill_threads == 4


@pytest.mark.parametrize("vocab_size, info_vocab", [(ODD_VOCAB + 50, 4128), (4117, 4117), (None, ODD_VOCAB)])
def test_tokenizer_info_covers_the_tokenizer_in_whole_words_within_the_model(odd_tokenizer, vocab_size, info_vocab):
    info = build_tokenizer_info(odd_tokenizer, vocab_size)
    assert info.vocab_size == info_vocab
    # The ids of the rounding have no text: xgrammar treats them as special, never allowed.
    assert set(info.special_token_ids) == {1, 2, *range(ODD_VOCAB, info_vocab)}


@pytest.mark.parametrize("vocab_size", [ODD_VOCAB + 50, 4117])  # the rounding inside the logits, or past them
def test_padding_ids_are_never_allowed_even_with_huge_logits(odd_tokenizer, vocab_size):
    """A model vocabulary and a tokenizer vocabulary that are not whole bitmask words: the padding
    ids are masked in constrained rows, the applied mask equals the reference, other rows are untouched."""
    service = GrammarCompilerService(odd_tokenizer, vocab_size)
    try:
        in_string = RequestGrammar(service.compile_sync(StructuredOutputsParams(json_object=True)))
        assert in_string.accept_tokens(odd_tokenizer.encode('{"a": "x', add_special_tokens=False))
        done = RequestGrammar(service.compile_sync(StructuredOutputsParams(choice=["ok"])))
        assert done.accept_tokens(odd_tokenizer.encode("ok", add_special_tokens=False) + [EOS])
        fresh = RequestGrammar(service.compile_sync(StructuredOutputsParams(regex="qqq[0-4]")))
        rows = [4, 0, 2]
        bitmask = BatchBitmask(6, vocab_size)
        gen = torch.Generator().manual_seed(vocab_size)
        for _ in range(3):  # refilled each step, the JSON string growing
            bitmask.fill([in_string, done, fresh], rows)
            logits = torch.randn(5, vocab_size, generator=gen)  # [rows, vocab]
            logits[:, ODD_VOCAB:] = 1e4
            expected, got = logits.clone(), logits.clone()
            apply_bitmask_reference(expected, bitmask.host, rows)
            bitmask.apply(got)
            assert torch.equal(got, expected)
            assert torch.equal(got[[1, 3]], logits[[1, 3]])
            assert not torch.isfinite(got[rows, ODD_VOCAB:]).any()
            assert torch.isfinite(got[0]).nonzero().flatten().tolist() == [EOS]
            assert torch.isfinite(got[2, 4096:ODD_VOCAB]).all()  # the added tokens, in the last partial word
            assert in_string.accept_token(int(got[4].argmax()))
    finally:
        service.close()


def test_fill_threads_default_is_a_quarter_of_the_cores_from_one_to_four(monkeypatch):
    import structured.config as config

    for cores, threads in ((None, 1), (2, 1), (7, 1), (8, 2), (16, 4), (128, 4)):
        monkeypatch.setattr(config.os, "cpu_count", lambda cores=cores: cores)
        assert config.StructuredOutputsConfig().fill_threads == threads
