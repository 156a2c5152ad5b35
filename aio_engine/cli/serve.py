"""`aio-engine serve`: settings from the flags, then the engine and the HTTP server until SIGTERM.

Both settings objects are validated before the model loads, so a bad flag fails in a second.
SIGTERM and SIGINT stop the server gracefully: open requests are aborted, the engine shuts down,
the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal

from ..config import EngineArgs
from .flags import LOG_LEVELS, engine_args_from, server_values_from

logger = logging.getLogger("aio_engine.serve")


def log_level(ns_level: str | None, environ: dict[str, str]) -> int:
    """The flag, else $AIO_ENGINE_LOGGING_LEVEL, else info; trace is debug."""
    name = (ns_level or environ.get("AIO_ENGINE_LOGGING_LEVEL") or "info").lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"AIO_ENGINE_LOGGING_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {name!r}")
    return logging.DEBUG if name == "trace" else getattr(logging, name.upper())


def server_settings_from(ns: argparse.Namespace, environ: dict[str, str], served_model_names: list[str] | None = None):
    """ServerSettings from the flags; the API key falls back to $AIO_ENGINE_API_KEY."""
    from web.settings import ServerSettings

    values = server_values_from(ns)
    if values.get("api_key") is None and environ.get("AIO_ENGINE_API_KEY"):
        values["api_key"] = environ["AIO_ENGINE_API_KEY"]
    return ServerSettings(served_model_names=served_model_names or ["(set when the engine is built)"], **values)


def run_serve(ns: argparse.Namespace, environ: dict[str, str]) -> None:
    logging.basicConfig(level=log_level(ns.log_level, environ), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = engine_args_from(ns)
    settings = server_settings_from(ns, environ)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    asyncio.run(_serve(args, settings, ns.host, ns.port))


async def _serve(args: EngineArgs, settings, host: str, port: int) -> None:
    from web.app import serve

    from ..async_engine import AsyncEngine

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        if settings.engine_process:
            from web.engine_process import EngineClient

            engine = await EngineClient.start(args.create_engine_config())
        else:
            from web import engine_spawn

            engine_spawn.discard_early()  # started for a command line whose config file said no
            engine = AsyncEngine.from_engine_args(args)
        settings = dataclasses.replace(settings, served_model_names=engine.config.model.served_model_names)
        await serve(engine, settings, host, port)
    except asyncio.CancelledError:
        logger.info("shut down")
