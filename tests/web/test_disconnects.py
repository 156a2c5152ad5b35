"""Clients that drop mid-stream: every request aborted at once, no leaked blocks, server healthy."""

from __future__ import annotations

import asyncio

import aiohttp

from .conftest import wait_idle


async def test_fifty_clients_dropping_mid_stream_leak_nothing(client):
    engine = client.engine
    url = str(client.make_url("/v1/completions"))

    async def drop(i: int, session: aiohttp.ClientSession) -> None:
        body = {"prompt": f"client {i}", "max_tokens": 120, "ignore_eos": True, "stream": True}
        if i % 2:
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 120,
                    "ignore_eos": True, "stream": True}
        path = url if i % 2 == 0 else url.replace("/v1/completions", "/v1/chat/completions")
        resp = await session.post(path, json=body)
        assert resp.status == 200
        await resp.content.readline()  # the first event: the request is running
        resp.close()  # drop the connection mid-stream

    sessions = [aiohttp.ClientSession() for _ in range(5)]
    try:
        await asyncio.gather(*(drop(i, sessions[i % 5]) for i in range(50)))
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    await wait_idle(engine, timeout=5)
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks
    assert (await client.get("/health")).status == 200
    body = await client.api.completions(prompt="still here", max_tokens=3)
    assert body["usage"]["completion_tokens"] == 3


async def test_a_non_streaming_client_that_leaves_aborts_its_request(client):
    engine = client.engine
    task = asyncio.create_task(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "wait"}], "max_tokens": 120, "ignore_eos": True}))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if engine.core.scheduler.requests:
            break
    assert engine.core.scheduler.requests
    steps = engine.core.num_steps
    task.cancel()  # closes the connection under the waiting request
    await asyncio.gather(task, return_exceptions=True)
    await wait_idle(engine, timeout=2)
    assert engine.core.num_steps - steps < 40
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks
