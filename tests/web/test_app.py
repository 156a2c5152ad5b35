"""The first web layer: OpenAI routes, SSE streaming, errors as OpenAI error objects, disconnects."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from aio_engine import AsyncEngine, EngineArgs
from web.app import ServerSettings, build_app


@pytest.fixture
async def client(tiny_models):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(tiny_models["qwen3"]), block_size=8, num_gpu_blocks_override=256))
    app = build_app(engine, ServerSettings(served_model_names=["tiny"], api_key=None))
    server = TestServer(app, handler_cancellation=True)
    async with TestClient(server) as c:
        c.engine = engine
        yield c
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


async def sse_events(resp) -> list:
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = (await resp.read()).decode()
    chunks = [line[len("data: "):] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return [orjson.loads(c) for c in chunks[:-1]]


async def test_health_and_models_list_the_served_name(client):
    assert (await client.get("/health")).status == 200
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["tiny"]


async def test_completion_matches_engine_greedy_output(client):
    resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello world", "max_tokens": 7,
                                                        "temperature": 0, "ignore_eos": True})
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 7
    from sampling.params import SamplingParams

    final = None
    async for out in client.engine.generate("Hello world", SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)):
        final = out
    assert body["choices"][0]["text"] == final.outputs[0].text
    assert body["choices"][0]["finish_reason"] == "length"


async def test_streamed_completion_joins_to_the_non_streamed_text(client):
    req = {"prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = await (await client.post("/v1/completions", json=req)).json()
    events = await sse_events(await client.post("/v1/completions", json={**req, "stream": True,
                                                                         "stream_options": {"include_usage": True}}))
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == full["choices"][0]["text"]
    assert events[-1]["usage"]["completion_tokens"] == 12
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


async def test_multiple_prompts_give_one_choice_each(client):
    body = await (await client.post("/v1/completions", json={"prompt": ["a b", "c d e"], "max_tokens": 3,
                                                              "ignore_eos": True})).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 6


async def test_chat_completion_streams_role_then_content(client):
    req = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}], "max_completion_tokens": 6,
           "temperature": 0, "ignore_eos": True}
    full = await (await client.post("/v1/chat/completions", json=req)).json()
    assert full["choices"][0]["message"]["role"] == "assistant"
    assert full["usage"]["completion_tokens"] == 6
    events = await sse_events(await client.post("/v1/chat/completions", json={**req, "stream": True}))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == full["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "top_p": 2}, 400, "top_p"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": 12}, 400, "prompt"),
        ({"prompt": "x", "model": "other"}, 404, "model"),
        ({"prompt": [99999]}, 400, None),
    ],
)
async def test_bad_input_gets_an_openai_error_object(client, body, status, param):
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == status
    err = (await resp.json())["error"]
    assert err["code"] == status and err["message"]
    if param:
        assert err["param"] == param


async def test_invalid_json_unknown_route_and_oversized_prompt(client):
    resp = await client.post("/v1/completions", data=b"{not json")
    assert resp.status == 400 and "JSON" in (await resp.json())["error"]["message"]
    assert (await client.get("/v1/nothing")).status == 404
    resp = await client.post("/v1/completions", json={"prompt": [1] * 600, "max_tokens": 1})
    assert resp.status == 400 and "max_model_len" in (await resp.json())["error"]["message"]


async def test_client_disconnect_aborts_the_request(client):
    engine = client.engine
    resp = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 400, "ignore_eos": True,
                                                       "stream": True})
    await resp.content.readline()  # the stream is running
    assert engine.core.scheduler.requests
    resp.close()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not engine.core.scheduler.requests:
            break
    assert not engine.core.scheduler.requests
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


async def test_api_key_guards_v1_routes(tiny_models):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(tiny_models["llama"]), num_gpu_blocks_override=64))
    app = build_app(engine, ServerSettings(served_model_names=["m"], api_key="sekret"))
    async with TestClient(TestServer(app)) as c:
        assert (await c.get("/v1/models")).status == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer sekret"})).status == 200
        assert (await c.get("/health")).status == 200


async def test_dead_engine_reports_503(client):
    def boom(*a, **k):
        raise RuntimeError("injected failure")

    client.engine.core.runner.execute = boom
    resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert resp.status == 503
    assert (await client.get("/health")).status == 503
