"""The OpenAI routes: /v1/completions, /v1/chat/completions (JSON or SSE) and /v1/models.

Each handler builds a Job (validate, tokenize, apply the chat template), starts it (the engine
queues its requests or refuses them: a 4xx before any byte goes out) and then streams its chunks
or returns its body. A client that goes away cancels the handler (handler_cancellation), which
closes the Job and aborts its engine requests at once.
"""

from __future__ import annotations

from aiohttp import web

from .protocol import read_json
from .responses import json_response, now
from .serving import ServingContext, make_job
from .sse import write_sse

SERVING = web.AppKey("serving", ServingContext)


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    ctx = request.app[SERVING]
    body = await read_json(request)
    request_id = request.headers.get("X-Request-Id") if ctx.settings.enable_request_id_headers else None
    job = make_job(ctx, kind, body, request_id)
    try:
        await job.prepare()
        await job.start()
        if job.stream:
            return await write_sse(request, job.chunks())
        return json_response(await job.result())
    finally:
        await job.close()


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat.completions")


async def models(request: web.Request) -> web.Response:
    ctx = request.app[SERVING]
    config = ctx.engine.config.model
    created = now()
    data = [{"id": name, "object": "model", "created": created, "owned_by": "aio-engine", "root": str(config.path),
             "parent": None, "max_model_len": config.max_model_len, "permission": []}
            for name in ctx.settings.served_model_names]
    return json_response({"object": "list", "data": data})


def add_routes(add) -> None:
    add("POST", "/v1/completions", completions)
    add("POST", "/v1/chat/completions", chat_completions)
    add("GET", "/v1/models", models)
