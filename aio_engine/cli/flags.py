"""The `serve` flags: one argparse parser built from EngineArgs' and ServerSettings' fields.

One source of truth: each field becomes a flag with its name, type, default, choices and help
(from the field's metadata); booleans come as --x/--no-x pairs; dict fields are JSON arguments
(see argv.py for their dotted forms). Groups follow vLLM's. vLLM flags of features this engine
does not have yet are registered too, so that they fail with "not supported yet: --flag" instead
of being ignored or called unknown; their "off" values (--no-enable-lora, -pp 1) are accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from typing import NoReturn

from ..config import EngineArgs, parse_size

GROUP_TITLES = {
    "frontend": "Frontend", "model": "ModelConfig", "load": "LoadConfig", "cache": "CacheConfig",
    "scheduler": "SchedulerConfig", "compilation": "CompilationConfig", "parallel": "ParallelConfig",
    "structured_outputs": "StructuredOutputsConfig", "observability": "ObservabilityConfig",
}
GROUP_DESCRIPTIONS = {
    "frontend": "The HTTP server: address, TLS, CORS, API key, chat templates, tools, request logging.",
    "model": "Which model, its tokenizer, dtype, context length and generation defaults.",
    "load": "How weights are read from the model folder.",
    "cache": "The paged KV cache: block size, memory, prefix caching.",
    "scheduler": "Continuous batching: tokens and requests per step, policy, chunked prefill.",
    "compilation": "Optimization level (-O0..-O3), torch.compile and CUDA graphs (-cc).",
    "parallel": "GPUs per replica and replicas (one GPU today).",
    "structured_outputs": "Grammar-constrained decoding (xgrammar).",
    "observability": "Statistics logging.",
    "unsupported": "vLLM flags of features aio-engine does not have yet: they exit with 'not supported yet'. "
                   "Their off values (--no-enable-lora, -pp 1, ...) are accepted.",
}
UNSUPPORTED_TITLE = "Unsupported"
SHORT_FLAGS = {"tensor_parallel_size": "-tp", "data_parallel_size": "-dp", "compilation_config": "-cc",
               "structured_outputs_config": "-so", "optimization_level": "-O"}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# Settings this engine takes, but only at one value for now.
ONLY_VALUE = {"tensor_parallel_size": ("--tensor-parallel-size", 1), "data_parallel_size": ("--data-parallel-size", 1)}
# vLLM's values of flags we have that name features we have not: "not supported yet", not "invalid choice".
NOT_SUPPORTED_VALUES = {
    "distributed_executor_backend": ("ray", "external_launcher"),
    "kv_cache_dtype": ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla"),
    "load_format": ("gguf", "bitsandbytes", "npcache", "sharded_state", "tensorizer", "runai_streamer",
                    "fastsafetensors", "mistral"),
    "tokenizer_mode": ("mistral", "custom"),
}

# vLLM flags of features not implemented here: (flags, what, accepted values). None: a --x/--no-x
# boolean whose --no-x is accepted; a tuple: the values that mean "off" (compared lower-case).
NOT_SUPPORTED: list[tuple[tuple[str, ...], str, tuple[str, ...] | None]] = [
    (("--enable-lora",), "LoRA", None), (("--fully-sharded-loras",), "LoRA", None),
    (("--max-loras",), "LoRA", ()), (("--max-lora-rank",), "LoRA", ()), (("--lora-dtype",), "LoRA", ("auto",)),
    (("--max-cpu-loras",), "LoRA", ()), (("--lora-modules",), "LoRA", ()), (("--default-mm-loras",), "LoRA", ()),
    (("--limit-mm-per-prompt",), "multimodal inputs", ()), (("--mm-processor-kwargs",), "multimodal inputs", ()),
    (("--mm-processor-cache-gb",), "multimodal inputs", ()), (("--mm-processor-cache-type",), "multimodal inputs", ()),
    (("--mm-encoder-tp-mode",), "multimodal inputs", ()), (("--media-io-kwargs",), "multimodal inputs", ()),
    (("--allowed-local-media-path",), "multimodal inputs", ()), (("--allowed-media-domains",), "multimodal inputs", ()),
    (("--interleave-mm-strings",), "multimodal inputs", None), (("--skip-mm-profiling",), "multimodal inputs", None),
    (("--enable-mm-embeds",), "multimodal inputs", None), (("--enable-prompt-embeds",), "prompt embeddings", None),
    (("--speculative-config",), "speculative decoding", ()),
    (("--enable-expert-parallel",), "expert parallelism", None), (("--enable-eplb",), "expert parallelism", None),
    (("--eplb-config",), "expert parallelism", ()), (("--expert-placement-strategy",), "expert parallelism", ()),
    (("--enable-dbo",), "dual-batch overlap", None),
    (("--pipeline-parallel-size", "-pp"), "pipeline parallelism", ("1",)),
    (("--decode-context-parallel-size", "-dcp"), "context parallelism", ("1",)),
    (("--data-parallel-rank", "-dpn"), "data parallelism", ()),
    (("--data-parallel-start-rank", "-dpr"), "data parallelism", ()),
    (("--data-parallel-size-local", "-dpl"), "data parallelism", ()),
    (("--data-parallel-address", "-dpa"), "data parallelism", ()),
    (("--data-parallel-rpc-port", "-dpp"), "data parallelism", ()),
    (("--data-parallel-backend", "-dpb"), "data parallelism", ()),
    (("--data-parallel-hybrid-lb",), "data parallelism", None), (("--data-parallel-external-lb",), "data parallelism", None),
    (("--headless",), "multi-node serving", None), (("--api-server-count", "-asc"), "several API server processes", ("1",)),
    (("--nnodes",), "multi-node serving", ("1",)), (("--node-rank",), "multi-node serving", ("0",)),
    (("--master-addr",), "multi-node serving", ()), (("--master-port",), "multi-node serving", ()),
    (("--quantization", "-q"), "quantized checkpoints", ("none",)),
    (("--cpu-offload-gb",), "CPU weight offloading", ("0",)), (("--swap-space",), "CPU swap space (preemption recomputes)", ("0",)),
    (("--kv-transfer-config",), "KV transfer", ()), (("--kv-events-config",), "KV events", ()),
    (("--kv-offloading-size",), "KV offloading", ()), (("--kv-offloading-backend",), "KV offloading", ()),
    (("--calculate-kv-scales",), "fp8 KV scales", None), (("--kv-sharing-fast-prefill",), "KV sharing", None),
    (("--enable-sleep-mode",), "sleep mode", None),
    (("--runner",), "pooling models", ("auto", "generate")), (("--convert",), "pooling models", ("auto", "none")),
    (("--pooler-config", "--override-pooler-config"), "pooling models", ()),
    (("--model-impl",), "other model implementations", ("auto",)),
    (("--worker-cls",), "custom workers", ("auto",)), (("--worker-extension-cls",), "custom workers", ("",)),
    (("--otlp-traces-endpoint",), "OpenTelemetry tracing", ()), (("--collect-detailed-traces",), "OpenTelemetry tracing", ()),
    (("--tool-server",), "built-in tool servers", ()),
    (("--max-num-partial-prefills",), "concurrent partial prefills", ("1",)),
    (("--max-long-partial-prefills",), "concurrent partial prefills", ("1",)),
    (("--long-prefill-token-threshold",), "concurrent partial prefills", ("0",)),
]


def not_supported(flag: str, values: object = None) -> NoReturn:
    """Exit like argparse does (status 2), naming the flag a user gave."""
    shown = flag if values in (None, [], ()) else f"{flag} {' '.join(map(str, values)) if isinstance(values, list) else values}"
    print(f"aio-engine: error: not supported yet: {shown}", file=sys.stderr)
    raise SystemExit(2)


class NotSupportedAction(argparse.Action):
    """A vLLM flag of a missing feature: its off value passes, anything else exits 'not supported yet'."""

    def __init__(self, option_strings, dest, accepted=None, what="", **kwargs):
        self.accepted = accepted
        if accepted is None:  # a boolean: --x and --no-x
            option_strings = [*option_strings, *("--no-" + s[2:] for s in option_strings if s.startswith("--"))]
        # Always refused: take every value that follows, to show them. With an off value: exactly one,
        # so that `-pp 1 MODEL` leaves MODEL alone.
        kwargs.update(nargs=0 if accepted is None else (None if accepted else "*"), default=argparse.SUPPRESS)
        if accepted is not None:
            kwargs["metavar"] = "VALUE"
        off = "" if not accepted else f" (accepted: {', '.join(repr(a) for a in accepted)})"
        super().__init__(option_strings, dest, help=f"Not supported yet: {what}.{off}", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.accepted is None and option_string.startswith("--no-"):
            return
        if self.accepted and str(values).lower() in self.accepted:
            return
        long = self.option_strings[0]
        not_supported(option_string if option_string == long else f"{option_string} ({long})", values)


# --- value types (their __name__ shows in argparse's "invalid <name> value" messages) ---
def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


_HUMAN = re.compile(r"(\d+(?:\.\d+)?)([kKmMgG]?)")


def integer(text: str) -> int:
    """An int, also in 8k (8000) / 8K (8192) / 1M forms."""
    try:
        return int(text)
    except ValueError:
        pass
    m = _HUMAN.fullmatch(text.strip())
    if not m or not m.group(2):
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    scale = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 2**20, "g": 10**9, "G": 2**30}[m.group(2)]
    return int(float(m.group(1)) * scale)


def optional_integer(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "auto", "null") else integer(text)


def context_length(text: str) -> int | None:
    """--max-model-len: an integer, auto (the model's limit), or 32k/1M forms."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kind(hint) -> tuple[str, type]:
    """('bool'|'json'|'list'|'scalar', element type) of a dataclass field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = args if union else [hint]
    for option in options:
        if typing.get_origin(option) is list:
            return "list", (typing.get_args(option) or (str,))[0]
    base = options[0] if len(options) == 1 else str
    if base is bool:
        return "bool", bool
    if base is dict or typing.get_origin(base) is dict:
        return "json", dict
    return "scalar", base


def _add_field(group, f: dataclasses.Field, hint, flags: list[str]) -> argparse.Action:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta.get("help", "")}
    if default not in (None, {}, [], ""):
        kw["help"] += f" (default: {default})"
    kind, base = _kind(hint)
    if kind == "bool":
        if flags[0].startswith("--disable-") and default is True:  # e.g. access_log <- --disable-uvicorn-access-log
            return group.add_argument(*flags, action="store_false", **kw)
        return group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
    if kind == "json":
        kw.update(type=json_object, metavar="JSON")
    elif kind == "list":
        kw.update(nargs="+", type=integer if base is int else str)
    elif f.name == "max_model_len":
        kw["type"] = context_length
    elif base is int:
        kw["type"] = optional_integer if default is None else integer
    elif base is float:
        kw["type"] = float
    if meta.get("choices"):
        kw["choices"] = tuple(meta["choices"]) + NOT_SUPPORTED_VALUES.get(f.name, ())
        if f.name in NOT_SUPPORTED_VALUES:
            kw["help"] += f" Not supported yet: {', '.join(NOT_SUPPORTED_VALUES[f.name])}."
    return group.add_argument(*flags, **kw)


def add_engine_args(parser: argparse.ArgumentParser, groups: dict[str, argparse._ArgumentGroup]) -> None:
    """A flag per EngineArgs field, in the group its metadata names."""
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        flags = ["--" + f.name.replace("_", "-")] + ([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])
        _add_field(groups[f.metadata.get("group", "model")], f, hints[f.name], flags)


def add_server_args(group: argparse._ArgumentGroup) -> None:
    """A flag per ServerSettings field that the command line sets (metadata cli=True)."""
    from web.settings import ServerSettings

    hints = typing.get_type_hints(ServerSettings)
    for f in dataclasses.fields(ServerSettings):
        if f.metadata.get("cli", True):
            _add_field(group, f, hints[f.name], [f.metadata.get("flag") or "--" + f.name.replace("_", "-")])


def make_serve_parser(parser: argparse.ArgumentParser) -> None:
    """Fill the `serve` subparser: frontend, engine and not-supported flags, in vLLM's groups."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="Model folder (same as --model). Default: the embedded tiny model.")
    groups = {key: parser.add_argument_group(title, GROUP_DESCRIPTIONS[key]) for key, title in GROUP_TITLES.items()}
    front = groups["frontend"]
    front.add_argument("--config", metavar="FILE.yaml",
                       help="YAML file of flags (names with dashes or underscores); the command line wins over it.")
    front.add_argument("--host", default="127.0.0.1", help="Address to listen on. (default: 127.0.0.1)")
    front.add_argument("--port", type=integer, default=8000, help="Port to listen on. (default: 8000)")
    front.add_argument("--log-level", "--uvicorn-log-level", dest="log_level", default=None, choices=LOG_LEVELS,
                       type=str.lower, help="Log level (trace = debug). Default: $AIO_ENGINE_LOGGING_LEVEL, else info.")
    add_server_args(front)
    add_engine_args(parser, groups)
    unsupported = parser.add_argument_group(UNSUPPORTED_TITLE, GROUP_DESCRIPTIONS["unsupported"])
    for flags, what, accepted in NOT_SUPPORTED:
        unsupported.add_argument(*flags, action=NotSupportedAction, what=what,
                                 accepted=None if accepted is None else tuple(a.lower() for a in accepted),
                                 dest="not_supported_" + flags[0][2:].replace("-", "_"))


def _list_value(value):
    """nargs='+' values; one item that is a JSON list (vLLM's --allowed-origins '["a"]') counts as the list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) and value[0].startswith("["):
        try:
            parsed = json.loads(value[0])
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """EngineArgs from the flags given; fields not given keep EngineArgs' defaults."""
    values = {f.name: _list_value(getattr(ns, f.name)) for f in dataclasses.fields(EngineArgs) if hasattr(ns, f.name)}
    model_tag = getattr(ns, "model_tag", None)
    if model_tag is not None:
        if values.get("model") not in (None, model_tag):
            raise ValueError(f"the model is given twice ({model_tag!r} and --model {values['model']!r})")
        values["model"] = model_tag
    for name, (flag, only) in ONLY_VALUE.items():
        if values.get(name, only) != only:
            not_supported(flag, values[name])
    for name, refused in NOT_SUPPORTED_VALUES.items():
        if values.get(name) in refused:
            not_supported("--" + name.replace("_", "-"), values[name])
    return EngineArgs(**values)


def server_values_from(ns: argparse.Namespace) -> dict:
    """The ServerSettings fields given on the command line (build ServerSettings(**these, ...))."""
    from web.settings import ServerSettings

    return {f.name: _list_value(getattr(ns, f.name)) for f in dataclasses.fields(ServerSettings) if hasattr(ns, f.name)}
