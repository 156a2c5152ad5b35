"""GET /v1/ws: concurrent requests on one socket, cancel, bad messages, closing aborts; the chat page."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from web.client import APIError

from .conftest import greedy_text, serve_app, wait_idle

GREEDY = {"temperature": 0, "ignore_eos": True}


async def test_many_concurrent_requests_on_one_socket_match_their_greedy_texts(client):
    prompts = [f"Hello {i}" for i in range(8)]
    expected = [await greedy_text(client.engine, p, 6 + i) for i, p in enumerate(prompts)]
    async with client.api.websocket() as ws:
        async def one(i: int) -> str:
            chunks = [c async for c in ws.completions_stream(request_id=f"p{i}", prompt=prompts[i], max_tokens=6 + i,
                                                             **GREEDY)]
            assert all(c["object"] == "text_completion" for c in chunks)
            return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

        texts = await asyncio.gather(*(one(i) for i in range(8)))
        assert texts == expected
        assert [ws.usage[f"p{i}"]["completion_tokens"] for i in range(8)] == [6 + i for i in range(8)]
        chat = [c async for c in ws.chat_stream(messages=[{"role": "user", "content": "Hi"}], max_tokens=3)]
        assert chat[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chat[-1]["object"] == "chat.completion.chunk" and chat[-1]["choices"][0]["finish_reason"] == "length"


async def test_cancel_by_id_ends_that_request_only(client):
    async with client.api.websocket() as ws:
        long_chunks: list[dict] = []

        async def long() -> None:
            async for chunk in ws.completions_stream(request_id="long", prompt="abc", max_tokens=140, ignore_eos=True):
                long_chunks.append(chunk)
                if len(long_chunks) == 3:
                    await ws.cancel("long")

        short = ws.completions_stream(request_id="short", prompt="xyz", max_tokens=20, ignore_eos=True)
        _, short_chunks = await asyncio.gather(long(), _collect(short))
        assert long_chunks[-1]["choices"][0]["finish_reason"] == "abort"
        assert ws.usage["long"]["completion_tokens"] < 140
        assert short_chunks[-1]["choices"][0]["finish_reason"] == "length" and ws.usage["short"]["completion_tokens"] == 20


async def _collect(stream) -> list:
    return [c async for c in stream]


async def test_bad_messages_get_errors_and_the_socket_lives_on(client):
    ws = await client.ws_connect("/v1/ws")
    bad = ["{not json", "[1]", '{"type": "completions", "body": {}}', '{"type": "what", "id": "a", "body": {}}',
           '{"type": "completions", "id": "a", "body": 5}', '{"type": "cancel", "id": "nope"}',
           '{"type": "completions", "id": "b", "body": {"prompt": "x", "temperature": -1}}',
           '{"type": "chat.completions", "id": "c", "body": {"messages": []}}']
    for message in bad:
        await ws.send_str(message)
        reply = await ws.receive_json()
        assert reply["type"] == "error" and reply["error"]["message"], message
    assert reply["id"] == "c" and reply["error"]["param"] == "messages"
    await ws.send_json({"type": "ping"})
    assert await ws.receive_json() == {"type": "pong"}
    await ws.send_json({"type": "completions", "id": 7, "body": {"prompt": "x", "max_tokens": 2}})
    await ws.send_json({"type": "completions", "id": 7, "body": {"prompt": "x", "max_tokens": 2}})
    kinds = []
    while "done" not in kinds:
        msg = await ws.receive_json()
        assert msg["id"] == 7
        kinds.append(msg["type"])
    assert "error" in kinds  # the duplicate id
    await ws.close()


async def test_oversized_message_closes_the_socket_with_1009(engine):
    async with serve_app(engine, ws_max_message_bytes=1000) as c:
        ws = await c.ws_connect("/v1/ws")
        await ws.send_str('{"type": "ping", "pad": "' + "x" * 2000 + '"}')
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_closing_the_socket_aborts_everything_it_started(client):
    engine = client.engine
    ws = await client.ws_connect("/v1/ws")
    for i in range(5):
        await ws.send_json({"type": "completions", "id": i, "body": {"prompt": f"p{i}", "max_tokens": 140,
                                                                       "ignore_eos": True}})
    seen = set()
    while len(seen) < 5:
        seen.add((await ws.receive_json())["id"])
    assert len(engine.core.scheduler.requests) == 5
    steps = engine.core.num_steps
    await ws.close()
    await wait_idle(engine, timeout=2)
    assert engine.core.num_steps - steps < 40
    assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks


async def test_errors_reach_the_client_as_api_errors(client):
    async with client.api.websocket() as ws:
        with pytest.raises(APIError) as e:
            async for _ in ws.completions_stream(prompt="x", model="other"):
                pass
        assert e.value.status == 404 and e.value.error["param"] == "model"
        assert (await ws.ping())["type"] == "pong"


async def test_chat_page_is_one_self_contained_file(client):
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert "new WebSocket" in page and "v1/ws" in page and '"cancel"' in page and "json_schema" in page
    assert "http://" not in page and "https://" not in page  # no CDN, nothing fetched from elsewhere


async def test_server_shutdown_does_not_wait_for_open_sockets(engine):
    """aiohttp would wait 60 s for an open websocket; the app closes it with GOING_AWAY instead."""
    import time

    from aiohttp.test_utils import TestServer

    from web.app import build_app
    from web.settings import ServerSettings

    server = TestServer(build_app(engine, ServerSettings(served_model_names=["tiny"])), handler_cancellation=True)
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.make_url("/v1/ws"))
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json())["type"] == "pong"
        start = time.monotonic()
        await server.close()
        assert time.monotonic() - start < 5
        msg = await ws.receive()
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
