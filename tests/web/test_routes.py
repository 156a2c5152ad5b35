"""Routes beside the OpenAI ones, /metrics, and the status codes every route shares."""

from __future__ import annotations

import asyncio

import pytest

from aio_engine import AsyncEngine, EngineArgs
from web.client import APIError

from .conftest import MAX_MODEL_LEN, serve_app


async def test_tokenize_and_detokenize_round_trip(client):
    tok = await (await client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_MODEL_LEN
    assert tok["tokens"] == client.engine.tokenizer("Hello world").input_ids
    assert len(tok["token_strs"]) == tok["count"]
    detok = await (await client.post("/detokenize", json={"tokens": tok["tokens"]})).json()
    assert detok == {"prompt": "Hello world"}
    chat = await (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})).json()
    assert client.engine.tokenizer.decode(chat["tokens"]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat["token_strs"] is None
    for body, param in (({"tokens": [10 ** 6]}, "tokens"), ({"tokens": "x"}, "tokens")):
        resp = await client.post("/detokenize", json=body)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    resp = await client.post("/tokenize", json={"prompt": 5})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "prompt"


async def test_version_ping_health_and_models(client):
    assert (await (await client.get("/version")).json())["version"]
    assert (await client.get("/ping")).status == 200
    assert (await client.post("/ping")).status == 200
    assert (await client.get("/health")).status == 200
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == "tiny" and model["object"] == "model" and model["max_model_len"] == MAX_MODEL_LEN


async def test_unknown_routes_and_methods_are_openai_errors(client):
    resp = await client.get("/v1/nothing")
    err = (await resp.json())["error"]
    assert resp.status == 404 and err["code"] == 404 and "/v1/nothing" in err["message"]
    resp = await client.get("/v1/completions")
    assert resp.status == 405 and (await resp.json())["error"]["code"] == 405


async def test_body_over_the_limit_is_413(engine):
    async with serve_app(engine, max_body_bytes=1000) as c:
        resp = await c.post("/v1/completions", json={"prompt": "x" * 2000})
        assert resp.status == 413 and (await resp.json())["error"]["code"] == 413


async def test_overloaded_server_answers_503_and_stays_healthy(engine):
    async with serve_app(engine, max_waiting_requests=0) as c:
        resp = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        err = (await resp.json())["error"]
        assert resp.status == 503 and "overloaded" in err["message"]
        assert (await c.get("/health")).status == 200


async def test_request_id_header_echoes_the_client_id(engine):
    async with serve_app(engine, enable_request_id_headers=True) as c:
        resp = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "abc"})
        assert resp.headers["X-Request-Id"] == "abc" and (await resp.json())["id"] == "cmpl-abc"
        resp = await c.get("/health")
        assert len(resp.headers["X-Request-Id"]) == 32
    async with serve_app(engine) as c:
        assert "X-Request-Id" not in (await c.get("/health")).headers


async def test_load_counts_requests_in_flight_when_enabled(engine):
    async with serve_app(engine) as c:
        assert (await c.get("/load")).status == 404
    async with serve_app(engine, enable_server_load_tracking=True) as c:
        assert (await (await c.get("/load")).json()) == {"server_load": 0}
        resp = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True})
        await resp.content.readline()
        assert (await (await c.get("/load")).json()) == {"server_load": 1}
        await resp.read()
        assert (await (await c.get("/load")).json()) == {"server_load": 0}


def _metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


async def test_metrics_count_requests_tokens_and_latencies(engine):
    async with serve_app(engine) as c:
        before = await c.api.metrics()
        generated = _metric(before, "aio_engine:generation_tokens_total")
        await c.api.completions(prompt="abc", max_tokens=5, ignore_eos=True)
        chunks = [ch async for ch in c.api.completions_stream(prompt="abc", max_tokens=5, ignore_eos=True)]
        assert chunks
        with_error = await c.post("/v1/completions", json={"prompt": "x", "temperature": -1})
        assert with_error.status == 400
        resp = await c.get("/metrics")
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert _metric(text, "aio_engine:http_requests_total", route="/v1/completions", status="200") == 2
    assert _metric(text, "aio_engine:http_requests_total", route="/v1/completions", status="400") == 1
    assert _metric(text, "aio_engine:request_success_total", finished_reason="length") == 2
    assert _metric(text, "aio_engine:generation_tokens_total") >= generated + 10
    assert _metric(text, "aio_engine:e2e_request_latency_seconds_count") == 2
    assert _metric(text, "aio_engine:time_to_first_token_seconds_count") >= 1
    assert _metric(text, "aio_engine:inter_token_latency_seconds_count") == 4  # the streamed request's gaps
    assert _metric(text, "aio_engine:request_queue_time_seconds_count") == 2
    assert _metric(text, "aio_engine:request_generation_tokens_sum") == 10
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate"):
        assert _metric(text, f"aio_engine:{gauge}", model_name="tiny") >= 0
    assert _metric(text, "aio_engine:prefix_cache_hits_total") <= _metric(text, "aio_engine:prefix_cache_queries_total")


async def test_each_app_has_its_own_registry(engine):
    async with serve_app(engine) as a, serve_app(engine) as b:
        await a.api.completions(prompt="x", max_tokens=1)
        text_b = await b.api.metrics()
        assert 'route="/v1/completions"' not in text_b


async def test_dead_engine_reports_503_everywhere(tiny_models):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(tiny_models["llama"]), num_gpu_blocks_override=64))

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    engine.core.runner.enqueue = boom
    async with serve_app(engine) as c:
        resp = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert resp.status == 503 and (await resp.json())["error"]["code"] == 503
        assert (await c.get("/health")).status == 503
        resp = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert resp.status == 503
        with pytest.raises(APIError) as e:
            await c.api.completions(prompt="x")
        assert e.value.status == 503
        assert _metric(await c.api.metrics(), "aio_engine:engine_dead") == 1
    await engine.shutdown()


async def test_client_disconnect_aborts_the_request_at_once(client):
    engine = client.engine
    resp = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 140, "ignore_eos": True,
                                                       "stream": True})
    await resp.content.readline()  # the stream is running
    assert engine.core.scheduler.requests
    steps = engine.core.num_steps
    resp.close()
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not engine.core.scheduler.requests:
            break
    assert not engine.core.scheduler.requests
    assert engine.core.num_steps - steps < 20  # gone long before its 140 tokens
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


async def test_inter_token_latencies_are_observed_while_the_stream_runs(engine):
    async with serve_app(engine) as c:
        before = _metric(await c.api.metrics(), "aio_engine:inter_token_latency_seconds_count") or 0
        stream = c.api.completions_stream(prompt="abc", max_tokens=12, ignore_eos=True)
        got = 0
        async for chunk in stream:
            got += bool(chunk["choices"] and chunk["choices"][0]["text"] is not None)
            if got == 6:
                break
        midway = _metric(await c.api.metrics(), "aio_engine:inter_token_latency_seconds_count")
        await stream.aclose()
    assert midway - before >= 4  # the gaps so far, before the request has finished
