"""`aio-engine`: the command line. `serve` takes vLLM's flags, built from EngineArgs' fields.

One source of truth: every EngineArgs field becomes a flag with its name, type, default, choices
and help; booleans come as --x/--no-x pairs. Frontend flags (host, port, api key) live here.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import types
import typing

from .config import EngineArgs

GROUP_TITLES = {
    "frontend": "Frontend", "model": "ModelConfig", "load": "LoadConfig", "cache": "CacheConfig",
    "scheduler": "SchedulerConfig", "compilation": "CompilationConfig", "parallel": "ParallelConfig",
    "structured_outputs": "StructuredOutputsConfig", "observability": "ObservabilityConfig",
}


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "auto") else int(text)


def _base_type(annotation) -> type:
    hint = typing.get_type_hints(EngineArgs).get(annotation) if isinstance(annotation, str) else annotation
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0] if len(args) == 1 else str
    return hint


def add_engine_args(parser: argparse.ArgumentParser, groups: dict[str, argparse._ArgumentGroup]) -> None:
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        meta = f.metadata
        group = groups[meta.get("group", "model")]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = hints[f.name]
        base = _base_type(hint)
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta.get("help", "")}
        if default not in (None, {}, []):
            kw["help"] += f" (default: {default})"
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.name == "max_model_len":
            kw["type"] = str
        elif f.name == "served_model_name":
            kw["nargs"] = "+"
        elif base is dict:
            kw["type"] = _json_dict
        elif base is int:
            kw["type"] = _optional_int if default is None else int
        elif base is float:
            kw["type"] = float
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        group.add_argument(flag, **kw)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aio-engine", description="An asyncio-first LLM inference and serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve a model over the OpenAI-compatible HTTP API.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("model_tag", nargs="?", default=None, help="Model folder (same as --model). Default: the embedded tiny model.")
    groups = {key: serve.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    front = groups["frontend"]
    front.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    front.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    front.add_argument("--api-key", default=None, help="Require this key (Bearer) on /v1 routes. Also AIO_ENGINE_API_KEY.")
    front.add_argument("--response-role", default="assistant", help="Role of the generated chat message.")
    front.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="Log level.")
    add_engine_args(serve, groups)
    return parser


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(ns, f.name)}
    if ns.model_tag is not None:
        if values.get("model") not in (None, ns.model_tag):
            raise SystemExit(f"aio-engine serve: error: the model is given twice ({ns.model_tag!r} and --model {values['model']!r})")
        values["model"] = ns.model_tag
    return EngineArgs(**values)


def run_serve(ns: argparse.Namespace) -> None:
    from web.app import ServerSettings, serve

    from .async_engine import AsyncEngine

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = engine_args_from(ns)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass

    async def main() -> None:
        engine = AsyncEngine.from_engine_args(args)
        settings = ServerSettings(
            served_model_names=engine.config.model.served_model_names,
            api_key=ns.api_key or os.environ.get("AIO_ENGINE_API_KEY"),
            response_role=ns.response_role,
        )
        await serve(engine, settings, ns.host, ns.port)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> None:
    ns = make_parser().parse_args(argv)
    try:
        if ns.command == "serve":
            run_serve(ns)
    except ValueError as e:  # configuration errors: say what is wrong, no traceback
        print(f"aio-engine: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
