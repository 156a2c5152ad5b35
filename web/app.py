"""The aiohttp application: OpenAI-compatible routes, the websocket API and the chat page over
one AsyncEngine.

build_app wires routes (each also under --root-path when set), middlewares and the response hook;
it does not own the engine. serve() runs the app until cancelled and shuts the engine down: a
client that disconnects cancels its handler (handler_cancellation), which aborts its requests.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

from aiohttp import web

from aio_engine.async_engine import AsyncEngine

from . import routes_misc, routes_openai
from .middleware import (
    SETTINGS,
    auth_middleware,
    cors_middleware,
    errors_middleware,
    make_on_prepare,
)
from .routes_openai import SERVING
from .serving import ServingContext
from .settings import ServerSettings, build_ssl_context
from .websocket import OPEN_SOCKETS, close_open_sockets, websocket_handler

__all__ = ["ServerSettings", "build_app", "serve", "start_server"]

logger = logging.getLogger(__name__)


def build_app(engine: AsyncEngine, settings: ServerSettings) -> web.Application:
    app = web.Application(middlewares=[cors_middleware, errors_middleware, auth_middleware],
                          client_max_size=settings.max_body_bytes)
    ctx = ServingContext.create(engine, settings)
    app[SETTINGS] = settings
    app[SERVING] = ctx

    def add(method: str, path: str, handler) -> None:
        app.router.add_route(method, path, handler)
        if settings.root_path:
            app.router.add_route(method, settings.root_path + (path if path != "/" else ""), handler)

    routes_openai.add_routes(add)
    routes_misc.add_routes(add, app)
    add("GET", "/v1/ws", websocket_handler)
    app[OPEN_SOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(close_open_sockets)
    app.on_response_prepare.append(make_on_prepare(ctx.metrics.observe_http))
    return app


async def start_server(engine: AsyncEngine, settings: ServerSettings, host: str, port: int) -> web.AppRunner:
    """Start serving in the background; `await runner.cleanup()` stops it."""
    app = build_app(engine, settings)
    log = {} if settings.access_log else {"access_log": None}
    limits = dict(max_line_size=settings.h11_max_incomplete_event_size,
                  max_field_size=settings.h11_max_incomplete_event_size, max_headers=settings.h11_max_header_count)
    # Streams in flight are aborted on shutdown anyway: no need to wait aiohttp's 60 s for them.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0, **log, **limits)
    await runner.setup()
    ssl_context = build_ssl_context(settings)
    scheme = "https" if ssl_context else "http"
    if settings.uds:
        site: web.BaseSite = web.UnixSite(runner, settings.uds, ssl_context=ssl_context)
        where = f"{scheme}+unix://{settings.uds}"
    else:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        where = f"{scheme}://{host}:{port}"
    await site.start()
    logger.info("serving %s on %s%s", settings.served_model_names, where, settings.root_path)
    return runner


GC_YOUNG_THRESHOLD = 10_000  # net container allocations between young collections (Python's default: 700)


def freeze_startup_heap() -> None:
    """Take what startup allocated (torch, transformers, inductor's graphs, the model, the KV
    cache's block lists: hundreds of thousands of objects) out of the garbage collector's walks. A
    full collection walks every tracked object: 100-220 ms measured on the CPU machine with -O0's
    ~370k objects; on the H100 the -O2 server's loop had 50-125 ms iterations with nothing
    blocked on the device (such collections the likely cause), each a stall of every stream. What
    it freezes lives as long as the server (as vLLM does after startup).

    Then the youngest generation's threshold goes from 700 to GC_YOUNG_THRESHOLD: every iteration
    of a busy server allocates an output, a chunk and a few lists per stream, so at 256 streams
    Python collected ~50 times a second (510 collections, 525 ms, longest 31 ms in 10 s of the H100
    server at saturation); with 10,000: 5-6 collections, 22-43 ms in such 10 s (and 4 instead of
    444 in a run of benchmarks/serving_host.py at 256 streams). Objects are still collected: only
    cycles wait longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def serve(engine: AsyncEngine, settings: ServerSettings, host: str, port: int) -> None:
    """Run the app until cancelled, then stop it and shut the engine down."""
    try:
        runner = await start_server(engine, settings, host, port)
    except BaseException:  # the port in use, say: the engine (its process) still ends
        await engine.shutdown()
        raise
    freeze_startup_heap()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await engine.shutdown()
