"""AsyncEngine: streaming, aborts from every side (abort(), break, aclose, cancel), a failing step
reaching every caller, concurrency, stream intervals, output kinds and the slow-consumer merge."""

from __future__ import annotations

import asyncio
import gc

import pytest

from aio_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
)

from .conftest import assert_all_blocks_free, random_prompt, wait_until_idle

TIMEOUT = 30  # seconds: every wait is bounded, so a hang fails instead of stalling the suite


def params(max_tokens: int = 16, kind: RequestOutputKind = RequestOutputKind.CUMULATIVE, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind, **kw)


async def collect(engine: AsyncEngine, prompt, sampling_params: SamplingParams, **kw) -> list[RequestOutput]:
    async def run():
        return [out async for out in engine.generate(prompt, sampling_params, **kw)]

    return await asyncio.wait_for(run(), TIMEOUT)


def prompt(seed: int, length: int = 10) -> dict:
    return {"prompt_token_ids": random_prompt(length, seed=seed)}


async def test_stream_yields_each_token_and_finishes(make_async_engine, make_llm):
    engine = make_async_engine()
    outputs = await collect(engine, prompt(1), params(12))
    assert [len(o.outputs[0].token_ids) for o in outputs] == list(range(1, 13))
    assert [o.finished for o in outputs] == [False] * 11 + [True]
    assert outputs[-1].outputs[0].finish_reason == "length"
    # The same tokens as the offline engine.
    [offline] = make_llm().generate(prompt(1), params(12), use_tqdm=False)
    assert outputs[-1].outputs[0].token_ids == offline.outputs[0].token_ids
    assert engine.is_running and not engine.errored


async def test_abort_mid_generation_sends_a_final_abort_and_frees_blocks(make_async_engine):
    engine = make_async_engine()
    stream = engine.generate(prompt(2), params(200), request_id="victim")
    seen = [await asyncio.wait_for(stream.__anext__(), TIMEOUT) for _ in range(3)]
    assert not seen[-1].finished
    await engine.abort("victim")
    rest = await asyncio.wait_for(_drain(stream), TIMEOUT)
    final = rest[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert 3 <= len(final.outputs[0].token_ids) < 200
    assert not engine.core.has_unfinished
    assert_all_blocks_free(engine.core)


async def _drain(stream) -> list[RequestOutput]:
    return [out async for out in stream]


async def test_breaking_out_of_the_stream_aborts_and_frees(make_async_engine):
    engine = make_async_engine()
    count = 0
    async for _ in engine.generate(prompt(3), params(200)):
        count += 1
        if count == 3:
            break
    await wait_until_idle(engine)
    assert_all_blocks_free(engine.core)


async def test_aclose_aborts_and_frees(make_async_engine):
    engine = make_async_engine()
    stream = engine.generate(prompt(4), params(200))
    await asyncio.wait_for(stream.__anext__(), TIMEOUT)
    await stream.aclose()
    await wait_until_idle(engine)
    assert_all_blocks_free(engine.core)


async def test_cancelling_the_consumer_task_aborts_and_frees(make_async_engine):
    engine = make_async_engine()
    got_some = asyncio.Event()

    async def consume():
        async for out in engine.generate(prompt(5), params(200)):
            if len(out.outputs[0].token_ids) >= 2:
                got_some.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_some.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_idle(engine)
    assert_all_blocks_free(engine.core)
    # The engine keeps serving after a cancelled consumer.
    assert (await collect(engine, prompt(6), params(3)))[-1].finished


async def test_step_failure_reaches_every_caller_and_kills_the_engine(make_async_engine, monkeypatch):
    engine = make_async_engine()
    await collect(engine, prompt(7), params(2))  # the loop runs
    calls = 0
    forward = engine.core.runner.model.forward

    def flaky_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("boom in forward")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.core.runner.model, "forward", flaky_forward)
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(engine, prompt(10 + i), params(50)) for i in range(4)), return_exceptions=True),
        TIMEOUT)
    assert len(results) == 4
    for result in results:
        assert isinstance(result, EngineDeadError), result
        assert "boom in forward" in str(result)
    assert engine.errored
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        await collect(engine, prompt(20), params(2))
    assert_all_blocks_free(engine.core)


async def test_healthy_engine_passes_the_health_check(make_async_engine):
    engine = make_async_engine()
    await engine.check_health()
    assert not engine.errored


async def test_sixty_four_concurrent_requests_all_finish_with_their_lengths(make_async_engine):
    engine = make_async_engine(max_num_seqs=64)
    lengths = [1 + (i * 7) % 13 for i in range(64)]
    results = await asyncio.gather(*(collect(engine, prompt(100 + i, 4 + i % 9), params(n))
                                     for i, n in enumerate(lengths)))
    assert [len(r[-1].outputs[0].token_ids) for r in results] == lengths
    assert all(r[-1].finished and sum(o.finished for o in r) == 1 for r in results)


async def test_duplicate_request_id_is_refused_while_the_first_runs(make_async_engine):
    engine = make_async_engine()
    first = engine.generate(prompt(30), params(40), request_id="dup")
    await asyncio.wait_for(first.__anext__(), TIMEOUT)
    with pytest.raises(ValueError, match="dup"):
        await collect(engine, prompt(31), params(3), request_id="dup")
    rest = await asyncio.wait_for(_drain(first), TIMEOUT)  # the first is unharmed
    assert rest[-1].finished and len(rest[-1].outputs[0].token_ids) == 40
    # Once finished, the id is free again.
    assert (await collect(engine, prompt(31), params(3), request_id="dup"))[-1].finished


async def test_stream_interval_yields_every_four_tokens_and_the_last(make_async_engine):
    engine = make_async_engine(stream_interval=4)
    outputs = await collect(engine, prompt(40), params(10))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 8, 10]


async def test_delta_chunks_join_to_the_cumulative_result(make_async_engine):
    engine = make_async_engine()
    text_prompt = "Hello world! How are you"
    cumulative = await collect(engine, text_prompt, params(20))
    deltas = await collect(engine, text_prompt, params(20, RequestOutputKind.DELTA))
    final = cumulative[-1].outputs[0]
    assert len(deltas) == 20
    assert "".join(o.outputs[0].text for o in deltas) == final.text
    assert sum((o.outputs[0].token_ids for o in deltas), []) == final.token_ids
    assert [o.finished for o in deltas] == [False] * 19 + [True]


async def test_final_only_yields_exactly_once(make_async_engine):
    engine = make_async_engine()
    outputs = await collect(engine, prompt(50), params(15, RequestOutputKind.FINAL_ONLY))
    assert len(outputs) == 1
    assert outputs[0].finished and len(outputs[0].outputs[0].token_ids) == 15


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
async def test_slow_consumer_gets_merged_outputs_equal_to_a_fast_one(kind, make_async_engine):
    engine = make_async_engine()
    text_prompt = "The quick brown fox"
    fast = await collect(engine, text_prompt, params(24, kind))

    async def slow():
        seen = []
        async for out in engine.generate(text_prompt, params(24, kind)):
            seen.append(out)
            await asyncio.sleep(0.1)  # several steps run meanwhile
        return seen

    slowly = await asyncio.wait_for(slow(), TIMEOUT)
    assert len(slowly) < len(fast) == 24  # outputs were merged, not queued
    if kind == RequestOutputKind.DELTA:
        assert "".join(o.outputs[0].text for o in slowly) == "".join(o.outputs[0].text for o in fast)
        assert sum((o.outputs[0].token_ids for o in slowly), []) == sum((o.outputs[0].token_ids for o in fast), [])
    else:
        assert slowly[-1].outputs[0].text == fast[-1].outputs[0].text
        assert slowly[-1].outputs[0].token_ids == fast[-1].outputs[0].token_ids
    assert slowly[-1].finished


async def test_chat_applies_the_template(make_async_engine):
    engine = make_async_engine()
    messages = [{"role": "user", "content": "Hello world"}]
    outputs = [o async for o in engine.chat(messages, params(3))]
    expected = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert outputs[-1].prompt_token_ids == engine.tokenizer(expected, add_special_tokens=False).input_ids
    assert len(outputs[-1].outputs[0].token_ids) == 3


async def test_shutdown_aborts_what_is_left(make_async_engine):
    engine = make_async_engine()
    stream = engine.generate(prompt(60), params(200))
    await asyncio.wait_for(stream.__anext__(), TIMEOUT)
    await engine.shutdown()
    assert not engine.is_running
    assert_all_blocks_free(engine.core)
    await stream.aclose()


async def test_launching_on_the_loop_as_on_cuda_gives_the_same_tokens_and_only_waits_in_the_worker(
        make_async_engine, make_llm, monkeypatch):
    engine = make_async_engine()
    engine._launch_inline = True  # what a CUDA engine does; on CPU the launch computes the step here
    in_worker = []
    run_in_executor = asyncio.get_running_loop().run_in_executor
    # A step whose event has fired is read on the loop, one still running in the worker: on CPU
    # every step is done by the time it is waited for, so every other one pretends it is not.
    polls = []
    monkeypatch.setattr(engine.core.runner, "is_done", lambda step: polls.append(step) or len(polls) % 2 == 0)

    def spy(executor, call, *args):
        if executor is engine._executor:
            in_worker.append(call.func.__name__)
        return run_in_executor(executor, call, *args)

    monkeypatch.setattr(asyncio.get_running_loop(), "run_in_executor", spy)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True, presence_penalty=0.5)
    results = await asyncio.gather(collect(engine, prompt(11), params(12)), collect(engine, prompt(12), seeded))
    offline = make_llm().generate([prompt(11), prompt(12)], [params(12), seeded], use_tqdm=False)
    for streamed, expected in zip(results, offline):
        assert streamed[-1].outputs[0].token_ids == expected.outputs[0].token_ids
    assert in_worker and set(in_worker) == {"wait"}
    assert len(in_worker) == (len(polls) + 1) // 2 and len(polls) > 10  # the others were read on the loop
    await wait_until_idle(engine)
    assert_all_blocks_free(engine.core)


async def test_stats_lines_report_throughput_and_the_steps_shape(make_async_engine, caplog):
    engine = make_async_engine()
    engine.stats.interval = 0.0  # a line after every iteration
    caplog.set_level("INFO", logger="aio_engine.stats")
    await collect(engine, prompt(3, length=23), params(6))
    lines = [r.getMessage() for r in caplog.records if r.name == "aio_engine.stats"]
    assert lines and all(line.startswith("Avg prompt throughput: ") for line in lines)
    # Each line covers one iteration: the one that read the prefill holds its 23 prompt tokens,
    # the decode iterations one row each; every token generated shows in some line's throughput.
    assert any("(23 prefill tokens, 0 decode rows" in line for line in lines)
    assert sum("(0 prefill tokens, 1 decode rows" in line for line in lines) >= 4
    assert any("Avg generation throughput: 0.0 tokens/s" not in line for line in lines)
    assert all("loop: 1 iterations, median" in line for line in lines)


async def test_disable_log_stats_logs_nothing(make_async_engine, caplog):
    engine = make_async_engine(disable_log_stats=True)
    caplog.set_level("INFO", logger="aio_engine.stats")
    await collect(engine, prompt(3), params(4))
    assert engine.stats is None
    assert not [r for r in caplog.records if r.name == "aio_engine.stats"]


async def test_going_idle_logs_the_interval_with_every_iteration(make_async_engine, caplog):
    engine = make_async_engine()
    caplog.set_level("INFO", logger="aio_engine.stats")
    await collect(engine, prompt(4, length=9), params(7))
    await wait_until_idle(engine)
    for _ in range(100):  # the loop notices it is idle right after the last output
        await asyncio.sleep(0.01)
        lines = [r.getMessage() for r in caplog.records if r.name == "aio_engine.stats"]
        if lines:
            break
    # One line (the interval is 10 s): the prefill and six decode steps waited for, each an iteration.
    [line] = lines
    assert "loop: 8 iterations" in line, line
    assert "Running: 0 reqs, Waiting: 0 reqs" in line


async def test_the_stats_line_counts_garbage_collections_and_shutdown_unhooks_it(make_async_engine, caplog):
    engine = make_async_engine()
    caplog.set_level("INFO", logger="aio_engine.stats")
    hooks = len(gc.callbacks)
    stream = engine.generate(prompt(5), params(6))
    await asyncio.wait_for(stream.__anext__(), TIMEOUT)
    gc.collect()  # a full collection while the request runs
    async for _ in stream:
        pass
    await wait_until_idle(engine)
    for _ in range(100):
        await asyncio.sleep(0.01)
        lines = [r.getMessage() for r in caplog.records if r.name == "aio_engine.stats"]
        if lines:
            break
    [line] = lines
    assert "; GC: " in line and "collections" in line, line
    await engine.shutdown()
    assert len(gc.callbacks) == hooks - 1


def test_an_engine_dropped_without_shutdown_is_not_kept_alive_by_its_gc_hook():
    import weakref

    from aio_engine.stats import StatsLogger

    class Core:  # what StatsLogger reads
        num_prompt_tokens_computed = num_generated_tokens = 0
        kv = type("KV", (), {"prefix_queries": 0, "prefix_hits": 0})()

    core = Core()
    stats = StatsLogger(core)
    gone = weakref.ref(stats)
    del stats
    gc.collect()
    assert gone() is None


def test_the_stats_line_splits_each_iteration_into_the_steps_part_and_its_consumers(monkeypatch, caplog):
    """A long iteration is either the engine's step (schedule to outputs) or its consumers' and
    the web layer's turn before the next one: the line gives the p99 and longest of each."""
    import types

    import aio_engine.stats as stats_module

    class Core:  # what StatsLogger reads
        num_prompt_tokens_computed = num_generated_tokens = 0
        kv = types.SimpleNamespace(prefix_queries=0, prefix_hits=0, usage=0.0)
        scheduler = types.SimpleNamespace(running=[], waiting=[])

    clock = [0.0]
    monkeypatch.setattr(stats_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                                    monotonic=lambda: clock[0]))
    caplog.set_level("INFO", logger="aio_engine.stats")
    stats = stats_module.StatsLogger(Core(), interval=100.0)
    try:
        # (step's part, consumers' part) in ms, per iteration: one slow step, one slow turn of the consumers.
        for own, rest in [(2, 1)] * 200 + [(30, 1), (2, 45)]:
            stats.begin()
            clock[0] += own / 1e3
            stats.end(0.0, None)
            clock[0] += rest / 1e3
        stats.idle()
    finally:
        stats.close()
    [line] = [r.getMessage() for r in caplog.records if r.name == "aio_engine.stats"]
    assert "loop: 202 iterations" in line, line
    assert "the step's own part p99 2.00 ms (longest 30.00)" in line, line
    assert "consumers' part p99 1.00 ms (longest 45.00)" in line, line
