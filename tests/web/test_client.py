"""web/client.py against a bare aiohttp server (no engine): what the client itself decides."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestServer

from web.client import AsyncClient


async def test_more_than_a_hundred_streams_are_open_at_once():
    # Every stream's server side waits until all of them are connected: with aiohttp's default
    # connector (100 connections) the 101st would queue behind the others and nothing would end.
    streams = 150
    connected = 0
    everyone = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal connected
        connected += 1
        if connected == streams:
            everyone.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await everyone.wait()
        await response.write(b'data: {"choices": [{"text": "x"}]}\n\ndata: [DONE]\n\n')
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    async with TestServer(app) as server, AsyncClient(str(server.make_url("")).rstrip("/")) as client:
        async def one() -> list[dict]:
            return [event async for event in client.completions_stream(prompt="hi")]

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(streams))), timeout=30)
    assert connected == streams and all(r == [{"choices": [{"text": "x"}]}] for r in results)


async def test_max_connections_bounds_the_streams_open_at_once():
    open_now = peak = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(0.05)
        await response.write(b"data: [DONE]\n\n")
        open_now -= 1
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    async with TestServer(app) as server, \
            AsyncClient(str(server.make_url("")).rstrip("/"), max_connections=3) as client:
        async def one() -> list[dict]:
            return [event async for event in client.completions_stream(prompt="hi")]

        await asyncio.gather(*(one() for _ in range(12)))
    assert peak == 3
