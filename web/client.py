"""An aiohttp-based async client for aio-engine's HTTP, SSE and websocket APIs.

    async with AsyncClient("http://127.0.0.1:8000", api_key="...") as client:
        body = await client.chat(messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
        async for chunk in client.chat_stream(messages=[...]):          # SSE
            ...
        async with client.websocket() as ws:                             # one socket, many streams
            async for chunk in ws.stream("chat.completions", {"messages": [...]}):
                ...

Errors come back as APIError carrying the HTTP status and the OpenAI error object; an error
event inside a stream raises the same way.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson


class APIError(Exception):
    def __init__(self, status: int, error: dict) -> None:
        super().__init__(f"{status}: {error.get('message')}")
        self.status = status
        self.error = error


async def iter_sse(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON events of an SSE stream until `data: [DONE]`; an error event raises APIError."""
    data: list[bytes] = []
    async for line in response.content:
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
            continue
        if line or not data:
            continue  # comments, other fields, keep-alive blank lines
        payload, data = b"\n".join(data), []
        if payload == b"[DONE]":
            return
        event = orjson.loads(payload)
        if isinstance(event, dict) and "error" in event and "choices" not in event:
            raise APIError(event["error"].get("code") or 500, event["error"])
        yield event


class AsyncClient:
    """`max_connections`: HTTP connections open at once (0: no limit). Each SSE stream holds one
    for its whole life, so this is also the number of concurrent streams; more wait for a free
    connection. aiohttp's own default of 100 would queue the 101st stream; the OpenAI Python
    client allows 1,000, as here."""

    def __init__(self, base_url: str, api_key: str | None = None, *, session: aiohttp.ClientSession | None = None,
                 timeout: float | None = None, ssl: Any = None, max_connections: int = 1000) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_key = api_key
        self._own_session = session is None
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._ssl = ssl if ssl is not None else True
        self._max_connections = max_connections

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._max_connections),
                                                  timeout=self._timeout, json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def url(self, path: str) -> str:
        return self.base_url + path

    # --- plain requests ---
    async def request(self, method: str, path: str, body: dict | None = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        headers = {**self.headers, "Content-Type": "application/json"} if data is not None else self.headers
        async with self.session.request(method, self.url(path), data=data, headers=headers, ssl=self._ssl) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise APIError(resp.status, _error_of(raw, resp.status))
            if resp.content_type == "application/json":
                return orjson.loads(raw)
            return raw.decode()

    async def completions(self, **body: Any) -> dict:
        return await self.request("POST", "/v1/completions", {**body, "stream": False})

    async def chat(self, **body: Any) -> dict:
        return await self.request("POST", "/v1/chat/completions", {**body, "stream": False})

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self.request("GET", "/v1/models"))["data"]]

    async def tokenize(self, **body: Any) -> dict:
        return await self.request("POST", "/tokenize", body)

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self.request("POST", "/detokenize", {"tokens": tokens}))["prompt"]

    async def health(self) -> bool:
        async with self.session.get(self.url("/health"), ssl=self._ssl) as resp:
            return resp.status == 200

    async def metrics(self) -> str:
        return await self.request("GET", "/metrics")

    # --- SSE streams ---
    async def stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        """POST with stream=true and yield each chunk; leaving early closes the connection."""
        headers = {**self.headers, "Content-Type": "application/json", "Accept": "text/event-stream"}
        async with self.session.post(self.url(path), data=orjson.dumps({**body, "stream": True}), headers=headers,
                                     ssl=self._ssl) as resp:
            if resp.status >= 400:
                raise APIError(resp.status, _error_of(await resp.read(), resp.status))
            async for event in iter_sse(resp):
                yield event

    def completions_stream(self, **body: Any) -> AsyncIterator[dict]:
        return self.stream("/v1/completions", body)

    def chat_stream(self, **body: Any) -> AsyncIterator[dict]:
        return self.stream("/v1/chat/completions", body)

    # --- websocket ---
    def websocket(self) -> WebSocketSession:
        return WebSocketSession(self)


def _error_of(raw: bytes, status: int) -> dict:
    try:
        return orjson.loads(raw)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return {"message": raw.decode(errors="replace"), "type": "HTTPError", "param": None, "code": status}


class WebSocketSession:
    """One /v1/ws socket: start concurrent streams on it, cancel them by id."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._queues: dict[Any, asyncio.Queue] = {}
        self._pongs: asyncio.Queue = asyncio.Queue()
        self.errors: asyncio.Queue = asyncio.Queue()  # errors not tied to a running request
        self.usage: dict[Any, dict | None] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> WebSocketSession:
        self.ws = await self.client.session.ws_connect(self.client.url("/v1/ws"), headers=self.client.headers,
                                                       ssl=self.client._ssl, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                message = orjson.loads(msg.data)
                kind, request_id = message.get("type"), message.get("id")
                if kind == "pong":
                    self._pongs.put_nowait(message)
                elif request_id in self._queues:
                    self._queues[request_id].put_nowait(message)
                elif kind == "error":
                    self.errors.put_nowait(message)
        finally:
            closed = {"type": "error", "error": {"message": "the websocket closed", "type": "ConnectionClosed",
                                                 "code": self.ws.close_code}}
            for queue in self._queues.values():
                queue.put_nowait(closed)

    async def send(self, message: dict) -> None:
        await self.ws.send_str(orjson.dumps(message).decode())

    async def ping(self) -> dict:
        await self.send({"type": "ping"})
        return await self._pongs.get()

    async def cancel(self, request_id: Any) -> None:
        await self.send({"type": "cancel", "id": request_id})

    async def stream(self, kind: str, body: dict, request_id: Any = None) -> AsyncIterator[dict]:
        """Start a request on the socket and yield its chunks; usage lands in self.usage[id]."""
        request_id = request_id if request_id is not None else f"r{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        ended = False
        try:
            await self.send({"type": kind, "id": request_id, "body": body})
            while True:
                message = await queue.get()
                if message["type"] == "delta":
                    yield message["chunk"]
                    continue
                ended = True
                if message["type"] == "done":
                    self.usage[request_id] = message.get("usage")
                    return
                raise APIError(message["error"].get("code") or 500, message["error"])
        finally:
            self._queues.pop(request_id, None)
            if not ended and self.ws is not None and not self.ws.closed:  # left early: stop the server's work
                await self.cancel(request_id)

    def chat_stream(self, request_id: Any = None, **body: Any) -> AsyncIterator[dict]:
        return self.stream("chat.completions", body, request_id)

    def completions_stream(self, request_id: Any = None, **body: Any) -> AsyncIterator[dict]:
        return self.stream("completions", body, request_id)
