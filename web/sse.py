"""Server-Sent Events: one `data: {json}` event per chunk, `data: [DONE]` last.

Errors after the headers went out (the status is 200 by then) travel as an error event, the way
OpenAI and vLLM report them, and the stream still ends with [DONE].
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from .errors import error_from_exception

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive",
               "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def sse_event(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def write_sse(request: web.Request, chunks: AsyncIterator[dict]) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        try:
            async for chunk in chunks:
                await response.write(sse_event(chunk))
        except ConnectionResetError:
            raise
        except Exception as e:  # noqa: BLE001 - every other failure becomes an error event
            _, body = error_from_exception(e, request.path)
            await response.write(sse_event(body))
        await response.write(DONE)
        await response.write_eof()
    except ConnectionResetError:  # the client left between two writes: nothing more to say
        pass
    return response
