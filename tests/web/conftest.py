"""Web fixtures: one engine on the tiny Qwen3 for the whole session, a fresh app per test.

Apps do not own the engine, so many apps (with different ServerSettings) share it; each test's
client checks on the way out that no request is left and every KV block is free again.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from aio_engine import AsyncEngine, EngineArgs
from web.app import build_app
from web.client import AsyncClient
from web.settings import ServerSettings

MAX_MODEL_LEN = 160


@pytest.fixture(scope="session")
async def engine(tiny_models):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(tiny_models["qwen3"]), block_size=8,
                                                     num_gpu_blocks_override=256, max_model_len=MAX_MODEL_LEN))
    yield engine
    await engine.shutdown()


async def wait_idle(engine, timeout: float = 5.0) -> None:
    """Until the engine holds no request (aborts land after the current step)."""
    for _ in range(int(timeout / 0.01)):
        if not engine.core.scheduler.requests:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"requests left in the engine: {list(engine.core.scheduler.requests)}")


def assert_no_leak(engine) -> None:
    assert not engine.core.scheduler.requests
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


async def wait_drained(engine, timeout: float = 5.0) -> None:
    """Until the engine (in a process of its own) reports no request and no KV block in use."""
    for _ in range(int(timeout / 0.02)):
        n = engine.counters()
        if n.running == 0 and n.waiting == 0 and n.kv_cache_usage == 0.0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the engine still holds work: {engine.counters()}")


@contextlib.asynccontextmanager
async def serve_app(engine, **settings):
    """A TestClient on a fresh app over `engine`, with `.engine`, `.settings` and `.api` (AsyncClient)."""
    settings.setdefault("served_model_names", ["tiny"])
    server_settings = ServerSettings(**settings)
    app = build_app(engine, server_settings)
    async with TestClient(TestServer(app, handler_cancellation=True)) as client:
        client.engine = engine
        client.settings = server_settings
        client.api = AsyncClient(str(client.make_url("")).rstrip("/"), api_key=server_settings.api_key)
        try:
            yield client
        finally:
            await client.api.close()
    if hasattr(engine, "core"):
        await wait_idle(engine)
        assert_no_leak(engine)
    else:  # web/engine_process.py's client: what the engine process reports
        await wait_drained(engine)


@pytest.fixture
async def client(engine):
    async with serve_app(engine) as c:
        yield c


async def sse_events(resp) -> list:
    """Every data event of an SSE response, checking the framing and the final [DONE]."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return [orjson.loads(b[len("data: "):]) for b in blocks[:-1]]


async def greedy_text(engine, prompt, max_tokens: int) -> str:
    from sampling.params import SamplingParams

    final = None
    async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)):
        final = out
    return final.outputs[0].text


@pytest.fixture(autouse=True)
def _collect():
    """Overrides the suite's gc.collect() after every test: web tests hold no large tensors of their own."""
    yield
