"""Structured outputs on CUDA: the CPU suite's engine checks (regex, choice, EBNF, json_object, n=3,
min_tokens, the cache) collected again on an LLM on the GPU, the 20 JSON schemas in a batch mixed
with unconstrained requests, constrained batches running ahead (async scheduling: the forward of
the next step queued, its sampling late) offline and in an AsyncEngine, and xgrammar's
apply_token_bitmask_inplace on CUDA against the plain-torch reference, at the default model's
vocabulary and at Qwen's."""

from __future__ import annotations

import asyncio
import gc

import pytest
import pytest_asyncio
import torch
import xgrammar as xgr

from aio_engine import LLM, AsyncEngine, EngineArgs, SamplingParams
from structured import (
    BatchBitmask,
    RequestGrammar,
    StructuredOutputsParams,
    apply_bitmask_reference,
)

# The CPU suite's tests imported here are collected again, on the CUDA `llm` below.
from tests.aio_engine.test_structured_engine import (  # noqa: F401
    PROMPTS,
    SCHEMAS,
    TIMEOUT,
    _blocks_free,
    closers,
    constrained,
    final_output,
    finished_text,
    free,
    run,
    test_a_bitmask_filled_while_the_step_before_finishes_gives_the_tokens_of_one_filled_at_sampling,
    test_choice_returns_one_of_the_choices,
    test_compact_json_has_no_free_whitespace,
    test_ebnf_arithmetic_outputs_parse,
    test_grammar_ends_the_request_even_with_ignore_eos,
    test_json_object_yields_an_object,
    test_min_tokens_with_a_grammar_that_completes_early_never_masks_a_whole_row,
    test_n3_with_a_schema_gives_three_valid_outputs,
    test_regex_outputs_fullmatch,
    test_second_request_with_the_same_schema_does_not_compile_again,
    test_stop_string_inside_the_grammar_ends_the_request,
    validate,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu on the GPU machine)")

# The default model on the GPU, async scheduling and CUDA graphs on (the defaults), a small KV cache.
ENGINE = dict(max_model_len=512, max_num_seqs=64, kv_cache_memory_bytes=256 << 20)
QWEN_VOCAB = 151936


@pytest.fixture(scope="module")
def llm():
    llm = LLM(**ENGINE)
    assert llm.core.config.device.type == "cuda"
    yield llm
    llm.core.grammars.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest_asyncio.fixture(scope="module")
async def engine():
    engine = AsyncEngine.from_engine_args(EngineArgs(**ENGINE))
    yield engine
    await engine.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("seed", [0, 1])
def test_json_schemas_validate_on_cuda_mixed_with_unconstrained_requests(llm, closers, seed):  # noqa: F811
    names = list(SCHEMAS)
    params = [constrained(closers, 1000 * seed + i, json=SCHEMAS[n]) for i, n in enumerate(names)]
    # Unconstrained rows around and between: the bitmask must leave them alone.
    batch = [free(1), *params[:10], free(2), *params[10:], free(3)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(batch))]
    outs = run(llm, batch, prompts)
    constrained_outs = outs[1:11] + outs[12:-1]
    for name, out in zip(names, constrained_outs):
        validate(SCHEMAS[name], finished_text(out))
    for out in (outs[0], outs[11], outs[-1]):
        assert len(out.outputs[0].token_ids) == 24 and out.outputs[0].finish_reason == "length"


def test_constrained_batch_runs_ahead_on_cuda_sampling_late_from_graph_replays(llm, closers):  # noqa: F811
    """Grammar, penalty and min_tokens rows do not stop async scheduling: each decode step's
    forward (a CUDA graph) is queued before the step in flight is finished; only its sampling
    waits for the host. Every output still validates."""
    core = llm.core
    ahead, late, replays = core.num_steps_run_ahead, core.num_late_samplings, core.runner.graph_replays
    names = ["nested", "object_array", "refs", "formats", "string_patterns", "any_of_objects"]
    params = [constrained(closers, 300 + i, json=SCHEMAS[n]) for i, n in enumerate(names)]
    params[0].n = 2
    params += [SamplingParams(temperature=1.0, seed=310, max_tokens=24, presence_penalty=1.0, repetition_penalty=1.2),
               SamplingParams(temperature=1.0, seed=311, max_tokens=24, min_tokens=16, bad_words=["the"])]
    outs = run(llm, params, [PROMPTS[i % len(PROMPTS)] for i in range(len(params))])
    for name, out in zip(names, outs):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", (name, completion.text)
            validate(SCHEMAS[name], completion.text)
    assert len(outs[-1].outputs[0].token_ids) >= 16
    decode_steps = max(len(c.token_ids) for out in outs for c in out.outputs) - 1
    assert core.num_steps_run_ahead - ahead >= decode_steps
    assert core.num_late_samplings - late >= decode_steps - 1
    assert core.runner.graph_replays - replays >= decode_steps // 2


async def test_constrained_requests_join_an_engine_running_ahead(engine, closers):  # noqa: F811
    assert engine.config.scheduler.async_scheduling
    busy = [asyncio.create_task(final_output(engine, p, free(60 + i))) for i, p in enumerate(PROMPTS)]
    start = engine.core.num_steps
    while engine.core.num_steps < start + 3:
        await asyncio.sleep(0.001)
    names = ["nested", "object_array", "refs", "formats"]
    joined = await asyncio.wait_for(asyncio.gather(*(
        final_output(engine, "ROMEO:", constrained(closers, 70 + i, json=SCHEMAS[n])) for i, n in enumerate(names))),
        TIMEOUT)
    for name, out in zip(names, joined):
        validate(SCHEMAS[name], finished_text(out))
    outs = await asyncio.wait_for(asyncio.gather(*busy), TIMEOUT)
    assert [len(o.outputs[0].token_ids) for o in outs] == [24] * len(PROMPTS)


@pytest.mark.parametrize("vocab_size", [4096, QWEN_VOCAB])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_xgrammar_apply_on_cuda_equals_the_reference(vocab_size, dtype):
    gen = torch.Generator().manual_seed(vocab_size)
    rows = 64
    bitmask = torch.randint(-(2**31), 2**31, (rows, (vocab_size + 31) // 32), dtype=torch.int64, generator=gen)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(rows, vocab_size, generator=gen).to(dtype)
    for indices in (None, [0, 3, 17, 63], [40]):
        expected = logits.clone()
        apply_bitmask_reference(expected, bitmask, indices)
        got = logits.cuda()
        if indices is None:
            xgr.apply_token_bitmask_inplace(got, bitmask.cuda(), vocab_size=vocab_size)
        else:
            xgr.apply_token_bitmask_inplace(got, bitmask.cuda(), indices=torch.tensor(indices, device="cuda",
                                                                                    dtype=torch.int32),
                                            vocab_size=vocab_size)
        torch.cuda.synchronize()
        assert torch.equal(got.cpu(), expected), (vocab_size, dtype, indices)


def test_bitmask_apply_compiles_once_whatever_the_row_count():
    """A constrained batch thins out step by step: no count of rows (1, multiples of 16 or others)
    may compile a kernel of its own (a compile holds the engine loop ~0.25 s)."""
    from structured.bitmask import apply_kernel

    kernel = apply_kernel()
    kernel.device_caches.clear()  # count this test's compiles only
    bitmask = BatchBitmask(64, 5000, "cuda")
    gen = torch.Generator().manual_seed(3)
    bitmask.host = torch.randint(-(2**31), 2**31, (64, (5000 + 31) // 32), generator=gen).to(torch.int32).pin_memory()
    for count in (1, 2, 16, 17, 48, 63, 64):
        rows = sorted(torch.randperm(64, generator=gen)[:count].tolist())
        logits = torch.randn(64, 5000, generator=gen)
        expected = logits.clone()
        apply_bitmask_reference(expected, bitmask.host, rows)
        got = logits.cuda()
        bitmask._rows = rows
        bitmask.apply(got)
        assert torch.equal(got.cpu(), expected), count
    assert len(kernel.device_caches[torch.cuda.current_device()][0]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_bitmask_on_cuda_masks_only_constrained_rows_at_qwen_vocab(llm, dtype):
    """Real matchers over several steps, an lm_head as wide as Qwen's (ids past the tokenizer are
    padding): the CUDA apply (xgrammar's kernel launched directly) equals the reference on the
    host mask, in float32 and bfloat16 logits; other rows stay untouched."""
    from structured import GrammarCompilerService

    service = GrammarCompilerService(llm.tokenizer, QWEN_VOCAB, stop_token_ids=list(llm.core.eos_token_ids))
    try:
        compiled = [service.compile_sync(StructuredOutputsParams(json=SCHEMAS[n])) for n in ("nested", "refs")]
        compiled.append(service.compile_sync(StructuredOutputsParams(regex="[0-9]{2,6}")))
        grammars = {5: RequestGrammar(compiled[0]), 0: RequestGrammar(compiled[1]), 9: RequestGrammar(compiled[2])}
        bitmask = BatchBitmask(16, QWEN_VOCAB, "cuda")
        gen = torch.Generator().manual_seed(1)
        for _ in range(12):
            live = [r for r, g in grammars.items() if not g.is_terminated]
            if not live:
                break
            bitmask.fill([grammars[r] for r in live], live)
            logits = torch.randn(10, QWEN_VOCAB, generator=gen).to(dtype)
            expected = logits.clone()
            apply_bitmask_reference(expected, bitmask.host, live)
            got = logits.cuda()
            bitmask.apply(got)
            got = got.cpu()
            assert torch.equal(got, expected)
            assert not torch.isfinite(got[live][:, len(llm.tokenizer):]).any()  # padding ids never allowed
            for row in live:  # the most likely allowed token
                assert grammars[row].accept_token(int(got[row].argmax()))
    finally:
        service.close()
