"""GET /v1/ws: many concurrent requests multiplexed on one websocket, by client-chosen id.

Protocol (JSON text frames; binary frames holding JSON are read the same way):

client -> server
  {"type": "chat.completions" | "completions", "id": "<client id>", "body": {<the HTTP route's body>}}
  {"type": "cancel", "id": "<client id>"}     end that request; it still gets its last delta and done
  {"type": "ping"}                             answered with {"type": "pong"}

server -> client
  {"type": "delta", "id": ..., "chunk": {<the same chunk object as the SSE stream>}}   one per flush
  {"type": "done", "id": ..., "usage": {prompt_tokens, completion_tokens, total_tokens}}
  {"type": "error", "id": ... | null, "error": {message, type, param, code}}   that request alone

Requests always stream (the body's `stream` is forced on). A bad message gets an error message,
never a dropped socket; a message over ws_max_message_bytes closes the socket with 1009. Closing
the socket aborts every request it started. With an API key, the socket takes it as the usual
Authorization header or, from browsers, as `?api_key=`.
"""

from __future__ import annotations

import asyncio
import weakref

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from .errors import RequestError, error_from_exception
from .routes_openai import SERVING
from .serving import Job, ServingContext, make_job


class WebSocketSession:
    def __init__(self, ctx: ServingContext, ws: web.WebSocketResponse) -> None:
        self.ctx = ctx
        self.ws = ws
        self.tasks: dict[str, asyncio.Task] = {}
        self.jobs: dict[str, Job] = {}
        self.cancelled: set[str] = set()
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_str(orjson.dumps(message).decode())
            except ConnectionResetError:  # the socket is closing; close() aborts what is left
                pass

    async def error(self, request_id, e: BaseException) -> None:
        _, body = error_from_exception(e, "/v1/ws")
        await self.send({"type": "error", "id": request_id, **body})

    async def handle(self, data: str | bytes) -> None:
        """One client message; requests run as tasks so the socket keeps reading."""
        request_id = None
        try:
            try:
                message = orjson.loads(data)
            except orjson.JSONDecodeError as e:
                raise RequestError(f"the message is not valid JSON: {e}") from None
            if not isinstance(message, dict):
                raise RequestError("a message must be a JSON object with a 'type'")
            kind = message.get("type")
            request_id = message.get("id")
            if kind == "ping":
                await self.send({"type": "pong"})
                return
            if not isinstance(request_id, (str, int)) or isinstance(request_id, bool) or request_id == "":
                raise RequestError("'id' must be a non-empty string or an integer", param="id")
            if kind == "cancel":
                await self.cancel(request_id)
                return
            body = message.get("body")
            if not isinstance(body, dict):
                raise RequestError("'body' must be a JSON object", param="body")
            if request_id in self.tasks:
                raise RequestError(f"a request with id {request_id!r} is already running on this socket", param="id")
            job = make_job(self.ctx, kind, {**body, "stream": True})
            self.jobs[request_id] = job
            self.tasks[request_id] = asyncio.create_task(self.run(request_id, job))
        except Exception as e:  # noqa: BLE001 - reported to the client, the socket lives on
            await self.error(request_id, e)

    async def run(self, request_id, job: Job) -> None:
        try:
            await job.prepare()
            await job.start()
            if request_id in self.cancelled:
                await job.abort()
            async for chunk in job.chunks():
                await self.send({"type": "delta", "id": request_id, "chunk": chunk})
            await self.send({"type": "done", "id": request_id, "usage": job.usage()})
        except Exception as e:  # noqa: BLE001
            await self.error(request_id, e)
        finally:
            await job.close()
            self.tasks.pop(request_id, None)
            self.jobs.pop(request_id, None)
            self.cancelled.discard(request_id)

    async def cancel(self, request_id) -> None:
        job = self.jobs.get(request_id)
        if job is None:
            raise RequestError(f"no running request with id {request_id!r}", 404, "NotFoundError", "id")
        self.cancelled.add(request_id)
        await job.abort()  # before start: run() aborts right after starting

    async def close(self) -> None:
        """The socket is gone: abort everything it started."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    ctx = request.app[SERVING]
    ws = web.WebSocketResponse(max_msg_size=ctx.settings.ws_max_message_bytes)
    await ws.prepare(request)
    session = WebSocketSession(ctx, ws)
    open_sockets = request.app[OPEN_SOCKETS]
    open_sockets.add(ws)
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await session.handle(msg.data)
    finally:
        open_sockets.discard(ws)
        await session.close()
    return ws


OPEN_SOCKETS = web.AppKey("open_sockets", weakref.WeakSet)


async def close_open_sockets(app: web.Application) -> None:
    """On shutdown: tell every client the server is going away (else aiohttp waits them out)."""
    for ws in list(app[OPEN_SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
