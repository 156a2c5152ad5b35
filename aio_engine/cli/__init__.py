"""`aio-engine`: the command line (serve, chat, complete, bench, --version), as vLLM's `vllm`.

flags.py builds `serve`'s flags from EngineArgs and ServerSettings; argv.py expands --config
files and JSON arguments before argparse; help.py answers the `--help=` forms; serve.py runs the
server; client.py the terminal clients; bench.py the benchmarks. The environment is read here and
nowhere else: AIO_ENGINE_LOGGING_LEVEL (default log level) and AIO_ENGINE_API_KEY.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__

__all__ = ["GROUP_TITLES", "add_engine_args", "engine_args_from", "expand_argv", "main", "make_parser",
           "parse_serve_args", "serve_parser"]
# Loaded on first use: flags.py imports the engine's config, and so torch, which `serve` wants to
# import only after it has started the engine process (main()).
_LAZY = {"GROUP_TITLES": ".flags", "add_engine_args": ".flags", "engine_args_from": ".flags",
         "expand_argv": ".argv"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def make_parser() -> argparse.ArgumentParser:
    from .bench import add_bench_parser
    from .client import add_client_parsers
    from .flags import make_serve_parser
    from .help import SummaryHelpAction

    parser = argparse.ArgumentParser(prog="aio-engine", description="An asyncio-first LLM inference and serving engine.")
    parser.add_argument("--version", action="version", version=f"aio-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,chat,complete,bench}")
    serve = sub.add_parser("serve", help="Serve a model over the OpenAI-compatible HTTP API.", add_help=False,
                           allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                           usage="aio-engine serve [MODEL] [flags] (--help=all lists every flag)",
                           description="Serve a model over the OpenAI-compatible HTTP API (flags as `vllm serve`).")
    serve.add_argument("-h", "--help", action=SummaryHelpAction, help="Show the groups; --help=<group|flag|keyword|all|listgroup|page>.")
    make_serve_parser(serve)
    serve.set_defaults(handler=_serve)
    add_client_parsers(sub)
    add_bench_parser(sub)
    return parser


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]


def parse_serve_args(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The namespace of `aio-engine serve ARGV` (config files and JSON forms expanded)."""
    from .argv import expand_argv

    parser = parser or make_parser()
    return parser.parse_args(["serve", *expand_argv(serve_parser(parser), list(argv))])


def _serve(ns: argparse.Namespace, environ: dict[str, str]) -> None:
    from .serve import run_serve

    run_serve(ns, environ)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)
    if argv[:1] == ["bench"]:
        from .bench import run_bench

        raise SystemExit(run_bench(argv[1:]))
    from web import engine_spawn

    if engine_spawn.wanted(argv):  # its imports (seconds) overlap with this process's own from here on
        engine_spawn.start_early()
    try:
        _dispatch(argv, environ)
    finally:
        engine_spawn.discard_early()  # started but not used (an error, --help, a config file's no)


def _dispatch(argv: list[str], environ: dict[str, str]) -> None:
    from .help import show_help

    parser = make_parser()
    try:
        if argv[:1] == ["serve"]:
            args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
            asked = [a.split("=", 1)[1] for a in args if a.startswith("--help=")]
            if asked:
                raise SystemExit(show_help(serve_parser(parser), asked[0]))
            ns = parse_serve_args(argv[1:], parser)
        else:
            ns = parser.parse_args(argv)
        ns.handler(ns, environ)
    except ValueError as e:  # configuration errors: say what is wrong, no traceback
        print(f"aio-engine: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
