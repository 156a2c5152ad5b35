"""GrammarCompilerService: error messages, the LRU cache and its counters, async compiles that
share one in-flight compile and never stall the event loop."""

from __future__ import annotations

import asyncio
import time

import pytest
import xgrammar as xgr

from structured import StructuredOutputsParams

from .conftest import EOS, PADDED_VOCAB, VOCAB

# Big enough that one compile takes a noticeable time (checked in the test that relies on it).
SLOW_SCHEMA = {"type": "object", "required": [f"k{i}" for i in range(600)],
               "properties": {f"k{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1},{i % 7 + 9}}}"}
                              for i in range(600)}}


def test_tokenizer_info_is_the_tokenizers_vocabulary_and_the_service_reports_the_models(service, padded_service):
    assert service.vocab_size == VOCAB and padded_service.vocab_size == PADDED_VOCAB
    assert service.stop_token_ids == [EOS]
    # xgrammar never sees the padding ids (BatchBitmask disallows them); the non-stop special
    # tokens are special to it: never allowed.
    assert padded_service.tokenizer_info.vocab_size == VOCAB
    assert set(padded_service.tokenizer_info.special_token_ids) == {1, 2}


@pytest.mark.parametrize("params, message", [
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
     r"^structured_outputs\.json: invalid JSON schema: .*nonsense"),
    (StructuredOutputsParams(json={"$ref": "#/$defs/missing"}), r"^structured_outputs\.json: invalid JSON schema: .*\$defs"),
    (StructuredOutputsParams(regex="(ab"), r"^structured_outputs\.regex: invalid regex: .*parenthesis"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"),
     r"^structured_outputs\.grammar: invalid EBNF grammar: .*undefined_rule"),
    (StructuredOutputsParams(grammar="start: missing"), r"^structured_outputs\.grammar: invalid Lark grammar: .*missing"),
    (StructuredOutputsParams(structural_tag='{"type": "structural_tag"}'),
     r"^structured_outputs\.structural_tag: invalid structural tag: .*format"),
])
def test_invalid_specs_raise_value_error_naming_the_field(fresh_service, params, message):
    svc = fresh_service()
    with pytest.raises(ValueError, match=message) as info:
        svc.compile_sync(params)
    assert "/project/cpp" not in str(info.value) and "\n" not in str(info.value)  # no C++ log prefix
    # A good spec right after a bad one compiles and works; the failure was not cached.
    good = svc.compile_sync(StructuredOutputsParams(regex="[0-9]+"))
    assert xgr.GrammarMatcher(good).accept_string("42")
    with pytest.raises(ValueError):
        svc.compile_sync(params)
    assert (svc.num_compiles, len(svc)) == (3, 1)


def test_second_compile_of_an_equivalent_schema_is_a_cache_hit(fresh_service):
    svc = fresh_service()
    first = svc.compile_sync(StructuredOutputsParams(json={"type": "object", "required": ["a"],
                                                          "properties": {"a": {"type": "integer"}}}))
    again = svc.compile_sync(StructuredOutputsParams(json='{"properties": {"a": {"type": "integer"}}, '
                                                          '"required": ["a"], "type": "object"}'))
    assert again is first
    assert (svc.num_compiles, svc.num_cache_hits) == (1, 1)
    svc.compile_sync(StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True))
    assert svc.num_compiles == 2  # other whitespace rules: another grammar


def test_cache_evicts_the_least_recently_used_grammar(fresh_service):
    svc = fresh_service(max_cache_entries=2)
    a, b, c = (StructuredOutputsParams(regex=r) for r in ("a+", "b+", "c+"))
    svc.compile_sync(a)
    svc.compile_sync(b)
    svc.compile_sync(a)  # a is now the most recently used
    svc.compile_sync(c)  # evicts b
    assert svc.cached(a) is not None and svc.cached(c) is not None and svc.cached(b) is None
    assert (svc.num_compiles, len(svc)) == (3, 2)
    svc.compile_sync(b)
    assert svc.num_compiles == 4 and svc.cached(a) is None
    assert svc.cache_bytes > 0


async def test_concurrent_compiles_of_one_spec_compile_once_and_keep_the_loop_responsive(fresh_service):
    svc = fresh_service(compile_threads=1)  # leaves the loop a core on a small CI machine
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.002)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    results = await asyncio.gather(*(svc.compile(StructuredOutputsParams(json=SLOW_SCHEMA)) for _ in range(16)))
    elapsed = time.perf_counter() - start
    ticking.cancel()
    assert all(r is results[0] for r in results)
    assert (svc.num_compiles, svc.num_cache_hits) == (1, 15)
    assert elapsed > 0.1, f"the compile took only {elapsed:.3f}s: make SLOW_SCHEMA bigger"
    during = [t for t in ticks if start <= t <= start + elapsed]
    gaps = [b - a for a, b in zip(during, during[1:])]
    # A loop blocked by the compile would show one gap as long as the compile; a busy machine
    # only stretches the 2 ms ticks a little.
    assert len(during) > elapsed / 0.02 and max(gaps) < elapsed / 4, \
        f"loop stalled: {len(during)} ticks in {elapsed:.3f}s, longest gap {max(gaps):.3f}s"
    # Now cached: answered without a trip through the worker thread.
    assert await svc.compile(StructuredOutputsParams(json=SLOW_SCHEMA)) is results[0]


async def test_a_cancelled_caller_does_not_cancel_the_shared_compile(fresh_service):
    svc = fresh_service(compile_workers=1)
    params = StructuredOutputsParams(json=SLOW_SCHEMA)
    first = asyncio.create_task(svc.compile(params))
    second = asyncio.create_task(svc.compile(params))
    await asyncio.sleep(0.01)
    first.cancel()
    compiled = await second
    assert first.cancelled() and isinstance(compiled, xgr.CompiledGrammar)
    assert svc.num_compiles == 1 and svc.cached(params) is compiled


async def test_async_compile_errors_reach_every_waiter_and_spare_other_specs(fresh_service):
    # One worker, busy with a slow compile first: both bad callers are queued on one compile.
    svc = fresh_service(compile_workers=1)
    bad, good = StructuredOutputsParams(regex="[z-a]"), StructuredOutputsParams(choice=["x", "y"])
    slow = StructuredOutputsParams(json=SLOW_SCHEMA)
    results = await asyncio.gather(svc.compile(slow), svc.compile(bad), svc.compile(good), svc.compile(bad),
                                   return_exceptions=True)
    assert isinstance(results[1], ValueError) and isinstance(results[3], ValueError)
    assert str(results[1]).startswith("structured_outputs.regex: invalid regex")
    assert isinstance(results[2], xgr.CompiledGrammar)
    assert svc.num_compiles == 3
    # A malformed spec fails before anything is queued.
    with pytest.raises(ValueError, match="structured_outputs.json: not valid JSON"):
        await svc.compile(StructuredOutputsParams(json="{"))
    assert svc.num_compiles == 3
