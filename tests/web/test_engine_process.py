"""The engine in a process of its own (web/engine_process.py): the same outputs as in one process,
refusals before the first byte, aborts that free blocks there, grammars, the server's routes over
it, and a dead engine process failing its requests instead of hanging them."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from aio_engine import EngineArgs, SamplingParams, StructuredOutputsParams
from aio_engine.async_engine import EngineDeadError
from sampling.params import RequestOutputKind
from web import engine_spawn
from web.engine_process import EngineClient

from .conftest import MAX_MODEL_LEN, serve_app, sse_events, wait_drained

PROMPTS = ["the quick brown fox", "hello there", "a", "numbers 1 2 3 4 5 6 7 8 9"]


def engine_args(tiny_models) -> EngineArgs:  # as the in-process `engine` fixture's
    return EngineArgs(model=str(tiny_models["qwen3"]), block_size=8, num_gpu_blocks_override=256,
                      max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
async def remote(tiny_models):
    engine_spawn.start_early()  # as `aio-engine serve` does, before its own imports
    early = engine_spawn._early.process
    client = await EngineClient.start(engine_args(tiny_models).create_engine_config(), startup_timeout=120)
    assert client.process is early and engine_spawn._early is None
    yield client
    await client.shutdown()
    assert client.process.exitcode == 0
    with pytest.raises(EngineDeadError, match="shut down"):
        await client.check_health()
    with pytest.raises(EngineDeadError):
        await anext(client.generate("after shutdown", SamplingParams(max_tokens=2), "late"))
    assert not client._streams


async def run(engine, prompt, params: SamplingParams, request_id: str):
    final = None
    async for out in engine.generate(prompt, params, request_id):
        final = out
    return final


async def test_outputs_equal_the_in_process_engine(remote, engine):
    """Greedy and seeded sampling, n=2, cumulative text and ids, all at once: token for token."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.CUMULATIVE)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=2, logprobs=2,
                            output_kind=RequestOutputKind.CUMULATIVE)
    jobs = [(p, greedy) for p in PROMPTS] + [(PROMPTS[0], seeded)]
    here = await asyncio.gather(*(run(engine, p, s, f"local-{i}") for i, (p, s) in enumerate(jobs)))
    there = await asyncio.gather(*(run(remote, p, s, f"remote-{i}") for i, (p, s) in enumerate(jobs)))
    for a, b in zip(here, there):
        assert b.finished and b.prompt == a.prompt and b.prompt_token_ids == a.prompt_token_ids
        assert [c.token_ids for c in b.outputs] == [c.token_ids for c in a.outputs]
        assert [c.text for c in b.outputs] == [c.text for c in a.outputs]
        assert [c.finish_reason for c in b.outputs] == [c.finish_reason for c in a.outputs]
        assert b.metrics.first_token_time >= b.metrics.arrival_time
    assert there[-1].outputs[0].logprobs[0] == here[-1].outputs[0].logprobs[0]
    await wait_drained(remote)


async def test_delta_outputs_add_up_to_the_whole_text(remote):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    whole = await run(remote, PROMPTS[1], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                         output_kind=RequestOutputKind.CUMULATIVE), "whole")
    text, ids = "", []
    async for out in remote.generate(PROMPTS[1], params, "deltas"):
        text += out.outputs[0].text
        ids += out.outputs[0].token_ids
    assert (text, ids) == (whole.outputs[0].text, whole.outputs[0].token_ids)


async def test_a_refused_request_raises_at_accepted_and_others_run_on(remote):
    gen = remote.generate(list(range(MAX_MODEL_LEN + 5)), SamplingParams(max_tokens=4), "too-long")
    first = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="max_model_len|maximum context|longer"):
        await remote.accepted("too-long")
    with pytest.raises(ValueError):
        await first
    await gen.aclose()
    out = await run(remote, PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True), "after-refusal")
    assert len(out.outputs[0].token_ids) == 3


async def test_leaving_early_aborts_in_the_engine_process_and_frees_its_blocks(remote):
    params = SamplingParams(max_tokens=120, ignore_eos=True)
    gens = [remote.generate(f"leave {i}", params, f"leave-{i}") for i in range(6)]
    for gen in gens:
        await anext(gen)
    assert remote.counters().running + remote.counters().waiting > 0
    for gen in gens:
        await gen.aclose()
    await wait_drained(remote)
    assert remote.counters().generated_tokens < 6 * 120


async def test_adds_not_yet_answered_count_as_waiting(remote):
    """Admission (--max-waiting-requests) reads num_waiting: a burst of adds counts before the
    engine process has answered any of them, and each answer brings its counters."""
    await wait_drained(remote)
    gens = [remote.generate(f"burst {i}", SamplingParams(max_tokens=4, ignore_eos=True), f"burst-{i}")
            for i in range(3)]
    firsts = [asyncio.ensure_future(anext(g)) for g in gens]
    await asyncio.sleep(0)  # the adds are sent; the reader has not run since
    assert remote.num_waiting >= 3
    for rid in (f"burst-{i}" for i in range(3)):
        await remote.accepted(rid)
    assert remote._unanswered == 0
    await asyncio.gather(*firsts)
    for g in gens:
        async for _ in g:
            pass
    await wait_drained(remote)


async def test_an_id_left_early_can_be_used_again(remote):
    """The old request's last frames never reach the new one of the same id: it runs to its own
    end, or is refused while the old one is still being aborted (as in one process)."""
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    for _ in range(5):
        await wait_drained(remote)
        gen = remote.generate("reuse", params, "reused")
        await anext(gen)
        await gen.aclose()
        try:
            out = await asyncio.wait_for(run(remote, "reuse", SamplingParams(max_tokens=3, ignore_eos=True),
                                             "reused"), timeout=20)
        except ValueError as e:
            assert "already in use" in str(e)
        else:
            assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    await wait_drained(remote)


async def test_abort_ends_the_stream_with_finish_reason_abort(remote):
    outputs = []
    async for out in remote.generate("abort me", SamplingParams(max_tokens=120, ignore_eos=True), "to-abort"):
        outputs.append(out)
        if len(outputs) == 2:
            await remote.abort("to-abort")
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    await wait_drained(remote)


async def test_grammars_compile_there_and_constrain_the_output(remote):
    with pytest.raises(ValueError, match="(?i)regex|pattern|invalid|parse|error"):
        await remote.compile_grammar(StructuredOutputsParams(regex="(unclosed"))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3,
                            structured_outputs=StructuredOutputsParams(json=schema))
    await remote.compile_grammar(params.structured_outputs)
    out = await run(remote, "json:", params, "json")
    assert out.outputs[0].finish_reason == "stop"
    assert set(json.loads(out.outputs[0].text)) == {"n"}
    gen = remote.generate("bad", SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(
        grammar="root ::= undefined_rule")), "bad-grammar")
    first = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0)
    with pytest.raises(ValueError):
        await remote.accepted("bad-grammar")
    with pytest.raises(ValueError):
        await first
    await gen.aclose()


async def test_the_routes_over_the_engine_process(remote):
    async with serve_app(remote) as client:
        resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "ignore_eos": True,
                                                          "stream": True})
        events = await sse_events(resp)
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events) >= 1
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        body = await client.api.chat(messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        assert body["usage"]["completion_tokens"] == 4
        resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10 * MAX_MODEL_LEN})
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "max_tokens"
        resp = await client.post("/v1/completions", json={"prompt": [MAX_MODEL_LEN * 1000], "max_tokens": 2,
                                                          "stream": True})
        assert resp.status == 400, await resp.text()  # refused before the first byte of the stream
        resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nonsense"}}}})
        assert resp.status == 400
        # A client that drops mid-stream: its request ends in the engine process, no block kept.
        resp = await client.post("/v1/completions", json={"prompt": "drop", "max_tokens": 120, "ignore_eos": True,
                                                          "stream": True})
        await resp.content.readline()
        resp.close()
        await wait_drained(remote)
        metrics = await (await client.get("/metrics")).text()
        generated = [line for line in metrics.splitlines() if line.startswith("aio_engine:generation_tokens_total")]
        assert float(generated[0].split()[-1]) == remote.counters().generated_tokens > 0
        assert (await client.get("/health")).status == 200


async def test_a_dead_engine_process_fails_its_requests_and_health(tiny_models):
    client = await EngineClient.start(engine_args(tiny_models).create_engine_config(), startup_timeout=120)
    try:
        gen = client.generate("never ends", SamplingParams(max_tokens=MAX_MODEL_LEN - 10, ignore_eos=True), "doomed")
        await anext(gen)
        os.kill(client.process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited"):
            async for _ in gen:
                pass
        with pytest.raises(EngineDeadError):
            await client.check_health()
        assert client.errored
        with pytest.raises(EngineDeadError):
            await anext(client.generate("after", SamplingParams(max_tokens=2), "after"))
    finally:
        await client.shutdown()


async def test_a_failed_startup_raises_with_the_reason(tiny_models, tmp_path):
    config = engine_args(tiny_models).create_engine_config()
    config.model.path = tmp_path  # no weights there
    with pytest.raises(RuntimeError, match="failed to start: .*safetensors|weights|checkpoint"):
        await EngineClient.start(config, startup_timeout=120)


def test_which_command_lines_start_the_engine_process_early():
    assert engine_spawn.wanted(["serve", "model", "--port", "8000"])
    assert engine_spawn.wanted(["serve", "--", "--help"])  # after "--": not serve's own flags
    for argv in (["serve", "--no-engine-process"], ["serve", "--help"], ["serve", "-h"], ["serve", "--help=all"],
                 ["chat"], ["bench", "serve"], []):
        assert not engine_spawn.wanted(argv), argv


def test_an_early_process_nobody_takes_ends_with_the_command():
    engine_spawn.start_early()
    spawn = engine_spawn._early
    engine_spawn.discard_early()
    assert not spawn.process.is_alive() and spawn.process.exitcode is not None
    assert (spawn.folder is None or not os.path.exists(spawn.folder)) and engine_spawn._early is None
