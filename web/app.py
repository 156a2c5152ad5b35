"""The aiohttp application: OpenAI-compatible routes over one AsyncEngine.

Each handler validates its body (protocol.py), calls engine.generate(), and either waits for the
final output or streams Server-Sent Events, one `data:` event per flush and `data: [DONE]` last.
A client that goes away cancels its handler (handler_cancellation), which leaves the `async for`
and so aborts the request and frees its blocks. All errors leave as OpenAI error objects.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from aio_engine import __version__
from aio_engine.async_engine import AsyncEngine, EngineDeadError
from aio_engine.outputs import RequestOutput

from . import protocol
from .protocol import RequestError

logger = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", AsyncEngine)
SETTINGS = web.AppKey("settings", "ServerSettings")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    response_role: str = "assistant"
    max_body_bytes: int = 32 * 2**20


def json_response(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(message: str, status: int, err_type: str, param: str | None = None) -> web.Response:
    return json_response(protocol.error_body(message, err_type, status, param), status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """The one place exceptions become OpenAI error objects."""
    try:
        return await handler(request)
    except RequestError as e:
        return error_response(str(e), e.status, e.err_type, e.param)
    except ValueError as e:
        return error_response(str(e), 400, "BadRequestError")
    except EngineDeadError as e:
        return error_response(str(e), 503, "ServiceUnavailableError")
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(e.text or "request body too large", 413, "RequestTooLargeError")
    except web.HTTPNotFound:
        return error_response(f"route {request.method} {request.path} not found", 404, "NotFoundError")
    except web.HTTPMethodNotAllowed:
        return error_response(f"method {request.method} not allowed on {request.path}", 405, "MethodNotAllowed")
    except web.HTTPException:
        raise
    except Exception as e:  # a bug of ours: say so, never take the server down
        logger.exception("internal error on %s", request.path)
        return error_response(f"internal error: {e!r}", 500, "InternalServerError")


@web.middleware
async def auth_middleware(request: web.Request, handler):
    key = request.app[SETTINGS].api_key
    if key and request.path.startswith("/v1"):
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return error_response("invalid or missing API key", 401, "AuthenticationError")
    return await handler(request)


async def read_json(request: web.Request) -> dict:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def check_model(request: web.Request, body: dict) -> str:
    names = request.app[SETTINGS].served_model_names
    model = body.get("model") or names[0]
    if model not in names:
        raise RequestError(f"the model {model!r} does not exist; this server serves {names}", 404, "NotFoundError", "model")
    return model


def sse_event(body: dict) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def stream_sse(request: web.Request, events: AsyncIterator[dict]) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        async for event in events:
            await response.write(sse_event(event))
    except (RequestError, ValueError) as e:  # after headers went out: report in the stream
        await response.write(sse_event(protocol.error_body(str(e), "BadRequestError", 400)))
    except EngineDeadError as e:
        await response.write(sse_event(protocol.error_body(str(e), "ServiceUnavailableError", 503)))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _merge(generators: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come (for multi-prompt completions)."""
    if len(generators) == 1:
        async for out in generators[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except BaseException as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await read_json(request)
    model = check_model(request, body)
    stream = _expect_bool(body, "stream")
    params = protocol.sampling_params_from(body, engine.core.config.model.generation_defaults, stream)
    prompts = protocol.completion_prompts(body)
    request_id = protocol.new_id("cmpl")
    created = int(time.time())
    priority = protocol._expect(body, "priority", int, 0)
    gens = [
        engine.generate(p if isinstance(p, str) else {"prompt_token_ids": p}, params.clone(),
                        f"{request_id}-{i}", priority)
        for i, p in enumerate(prompts)
    ]
    if not stream:
        finals: list[RequestOutput | None] = [None] * len(gens)
        async for i, out in _merge(gens):
            finals[i] = out
        return json_response(protocol.completion_body(request_id, model, finals, created))

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def events() -> AsyncIterator[dict]:
        counts = [[0, 0] for _ in gens]
        async for i, out in _merge(gens):
            c = out.outputs[0]
            counts[i] = [len(out.prompt_token_ids), counts[i][1] + len(c.token_ids)]
            if not c.text and not out.finished:
                continue  # tokens whose text is held back (partial UTF-8, a possible stop string)
            yield {"id": request_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason}]}
        if include_usage:
            p, g = sum(c[0] for c in counts), sum(c[1] for c in counts)
            yield {"id": request_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": protocol.usage(p, g)}

    return await stream_sse(request, events())


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    settings = request.app[SETTINGS]
    body = await read_json(request)
    model = check_model(request, body)
    stream = _expect_bool(body, "stream")
    messages = protocol.chat_messages(body)
    params = protocol.sampling_params_from(body, engine.core.config.model.generation_defaults, stream,
                                           max_tokens_key="max_completion_tokens")
    kwargs = protocol._expect(body, "chat_template_kwargs", dict, {})
    add_generation_prompt = protocol._expect(body, "add_generation_prompt", bool, True)
    try:
        prompt_ids = engine.core.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except ValueError:
        raise
    except Exception as e:  # template errors (jinja) are the client's messages' fault
        raise RequestError(f"could not apply the chat template: {e}", param="messages") from None
    request_id = protocol.new_id("chatcmpl")
    created = int(time.time())
    priority = protocol._expect(body, "priority", int, 0)
    gen = engine.generate({"prompt_token_ids": prompt_ids}, params, request_id, priority)
    role = settings.response_role
    if not stream:
        final = None
        async for out in gen:
            final = out
        return json_response(protocol.chat_body(request_id, model, final, role, created))

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def events() -> AsyncIterator[dict]:
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        yield {**head, "choices": [{"index": 0, "delta": {"role": role, "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
        generated = 0
        prompt_tokens = len(prompt_ids)
        async for out in gen:
            c = out.outputs[0]
            generated += len(c.token_ids)
            if not c.text and not out.finished:
                continue  # tokens whose text is held back (partial UTF-8, a possible stop string)
            delta = {"content": c.text} if c.text else {}
            yield {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
        if include_usage:
            yield {**head, "choices": [], "usage": protocol.usage(prompt_tokens, generated)}

    return await stream_sse(request, events())


def _expect_bool(body: dict, name: str) -> bool:
    return bool(protocol._expect(body, name, bool, False))


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    created = int(time.time())
    data = [{"id": name, "object": "model", "created": created, "owned_by": "aio-engine", "root": str(engine.config.model.path),
             "max_model_len": engine.config.model.max_model_len} for name in request.app[SETTINGS].served_model_names]
    return json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    try:
        await request.app[ENGINE].check_health()
    except EngineDeadError as e:
        return error_response(str(e), 503, "ServiceUnavailableError")
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return json_response({"version": __version__})


async def not_found(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


def build_app(engine: AsyncEngine, settings: ServerSettings) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=settings.max_body_bytes)
    app[ENGINE] = engine
    app[SETTINGS] = settings
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)

    async def on_cleanup(app: web.Application) -> None:
        await app[ENGINE].shutdown()

    app.on_cleanup.append(on_cleanup)
    return app


async def serve(engine: AsyncEngine, settings: ServerSettings, host: str, port: int) -> None:
    """Run the app until cancelled; a client that disconnects cancels its handler."""
    app = build_app(engine, settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("serving %s on http://%s:%d", settings.served_model_names, host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
