"""RequestGrammar: accepting, rejecting, rolling back, and the end of output (stop tokens)."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from structured import (
    GrammarCompilerService,
    RequestGrammar,
    StructuredOutputsParams,
    accept_batch,
    unpack_bitmask,
)

from .conftest import EOS, VOCAB


def allowed(grammar: RequestGrammar, vocab_size: int = VOCAB) -> torch.Tensor:
    bitmask = xgr.allocate_token_bitmask(2, vocab_size)
    bitmask.fill_(0)
    grammar.fill_bitmask(bitmask, 1)
    return unpack_bitmask(bitmask, vocab_size)[1]  # [vocab] bool


def test_rollback_restores_the_earlier_bitmask(service, tokenizer):
    compiled = service.compile_sync(StructuredOutputsParams(json={
        "type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}}))
    ids = tokenizer.encode('{"name": "Romeo and Juliet", "n": 12', add_special_tokens=False)
    grammar = RequestGrammar(compiled)
    snapshots = [allowed(grammar)]
    for token in ids:
        assert grammar.accept_token(token)
        snapshots.append(allowed(grammar))
    assert grammar.num_tokens == len(ids)
    for back in (1, 3, len(ids) - 5):
        grammar.rollback(back)
        assert torch.equal(allowed(grammar), snapshots[grammar.num_tokens])
        assert grammar.accept_tokens(ids[grammar.num_tokens:])
        assert torch.equal(allowed(grammar), snapshots[-1])
    grammar.rollback(len(ids))
    assert grammar.num_tokens == 0 and torch.equal(allowed(grammar), snapshots[0])
    with pytest.raises(ValueError, match=r"rollback: num_tokens must be in \[0, 0\]"):
        grammar.rollback(1)


def test_rejected_token_leaves_the_accepted_prefix(service, tokenizer):
    grammar = RequestGrammar(service.compile_sync(StructuredOutputsParams(regex="[0-9]{2}x")))
    ids = tokenizer.encode("12", add_special_tokens=False) + tokenizer.encode("y", add_special_tokens=False)
    assert not grammar.accept_tokens(ids)
    assert grammar.num_tokens == len(ids) - 1
    assert grammar.accept_tokens(tokenizer.encode("x", add_special_tokens=False))
    assert grammar.is_completed and not grammar.is_terminated


def test_complete_grammar_allows_only_eos_and_eos_terminates(service, tokenizer):
    grammar = RequestGrammar(service.compile_sync(StructuredOutputsParams(choice=["yes", "no"])))
    assert grammar.accept_tokens(tokenizer.encode("yes", add_special_tokens=False))
    assert grammar.is_completed and not grammar.is_terminated
    assert allowed(grammar).nonzero().flatten().tolist() == [EOS]
    assert grammar.accept_token(EOS) and grammar.is_terminated
    # Terminated: nothing more is accepted, and its row still allows only eos (a token sampled
    # one step late, under async scheduling, is harmless).
    assert not grammar.accept_token(EOS)
    assert allowed(grammar).nonzero().flatten().tolist() == [EOS]
    grammar.rollback(1)  # e.g. the eos was dropped: the matcher is live again
    assert not grammar.is_terminated and grammar.is_completed


def test_open_ended_grammar_offers_eos_beside_continuations(service, tokenizer):
    grammar = RequestGrammar(service.compile_sync(StructuredOutputsParams(regex="a+")))
    assert not allowed(grammar)[EOS]
    grammar.accept_tokens(tokenizer.encode("a", add_special_tokens=False))
    mask = allowed(grammar)
    assert mask[EOS] and mask.sum() > 1


def test_stop_tokens_are_the_models_eos_ids(tokenizer):
    svc = GrammarCompilerService(tokenizer, VOCAB, stop_token_ids=[EOS, 2])
    try:
        grammar = RequestGrammar(svc.compile_sync(StructuredOutputsParams(choice=["ok"])))
        grammar.accept_tokens(tokenizer.encode("ok", add_special_tokens=False))
        assert allowed(grammar).nonzero().flatten().tolist() == [EOS, 2]
        assert grammar.accept_token(2) and grammar.is_terminated
    finally:
        svc.close()


def test_special_tokens_are_never_allowed_inside_strings(service, tokenizer):
    # Stock xgrammar reads <|im_start|> as its literal text and would allow it inside a string.
    grammar = RequestGrammar(service.compile_sync(StructuredOutputsParams(json_object=True)))
    grammar.accept_tokens(tokenizer.encode('{"text": "', add_special_tokens=False))
    mask = allowed(grammar)
    assert mask.sum() > 1000 and not mask[[0, 1, 2]].any()


def test_accept_batch_advances_each_grammar_by_its_token(service, tokenizer):
    compiled = service.compile_sync(StructuredOutputsParams(choice=["a", "b"]))
    grammars = [RequestGrammar(compiled) for _ in range(3)]
    a, b = (tokenizer.encode(s, add_special_tokens=False)[0] for s in "ab")
    assert accept_batch(grammars, [a, b, EOS]) == [True, True, False]
    assert [g.num_tokens for g in grammars] == [1, 1, 0]
    with pytest.raises(ValueError, match="2 tokens"):
        accept_batch(grammars, [a, b])
    # every token accepted (the usual step, answered without reading xgrammar's result per row):
    # the two finished choices take the stop token and terminate, the third takes its first token
    assert accept_batch(grammars, [EOS, EOS, b]) == [True, True, True]
    assert [g.num_tokens for g in grammars] == [2, 2, 1]
    assert [g.is_terminated for g in grammars] == [True, True, False]
    assert [g.matcher.is_terminated() for g in grammars] == [True, True, False]


def test_n_sequences_share_one_compiled_grammar_but_not_their_state(service, tokenizer):
    compiled = service.compile_sync(StructuredOutputsParams(regex="(ab|cd)"))
    first, second = RequestGrammar(compiled), RequestGrammar(compiled)
    first.accept_tokens(tokenizer.encode("ab", add_special_tokens=False))
    assert first.is_completed and not second.is_completed
    assert not torch.equal(allowed(first), allowed(second))


@pytest.mark.parametrize("spec", [dict(choice=["yes", "no", "maybe"]), dict(regex="(ab|cd)+"),
                                  dict(regex="[0-9]{1,3}(,[0-9]{1,2})?")])
def test_is_terminated_kept_on_our_side_equals_xgrammars(service, spec):
    """RequestGrammar answers is_terminated without asking xgrammar: random walks through the
    allowed tokens, stop tokens, rejected tokens, rollbacks and resets, one by one and in
    batches, agree with the matcher's own answer after every move."""
    import random

    rng = random.Random(0)
    compiled = service.compile_sync(StructuredOutputsParams(**spec))
    grammars = [RequestGrammar(compiled) for _ in range(4)]
    terminated_seen = 0
    for _ in range(120):
        picks = []
        for grammar in grammars:
            ids = allowed(grammar).nonzero().flatten().tolist()
            eos_first = EOS in ids and rng.random() < 0.5
            picks.append(EOS if eos_first else rng.choice(ids) if rng.random() < 0.9 else rng.randrange(VOCAB))
        if rng.random() < 0.5:
            accept_batch(grammars, picks)
        else:
            for grammar, token in zip(grammars, picks):
                grammar.accept_token(token)
        for grammar in grammars:
            terminated_seen += grammar.is_terminated
            assert grammar.is_terminated == grammar.matcher.is_terminated()
            move = rng.random()
            if move < 0.25 and grammar.num_tokens:
                grammar.rollback(rng.randint(1, grammar.num_tokens))
            elif move < 0.3:
                grammar.reset()
            assert grammar.is_terminated == grammar.matcher.is_terminated()
    assert terminated_seen > 10  # the walks did reach the end of the grammar
