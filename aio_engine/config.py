"""Engine configuration: EngineArgs (flat, the CLI's names) -> EngineConfig (a tree), built and
validated once by `EngineArgs.create_engine_config()` and passed down. Nothing else reads flags
or the environment."""

from __future__ import annotations

import bisect
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from structured.config import StructuredOutputsConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
DEFAULT_CACHE_DIR = "~/.cache/aio-engine"
# The default capture size's ceiling: a larger budget's longest steps are GPU-bound (8,192 tokens
# of Qwen3-0.6B: ~15-20 ms on the H100, about the host time of running its pieces from Python),
# and each size costs startup (a graph per compiled piece, a warm-up forward at that size).
DEFAULT_CAPTURE_CAP = 8192
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
           "float32": torch.float32, "float": torch.float32}


def arg(default: Any, help: str, choices: tuple | None = None, group: str = "model") -> Any:
    """A field of EngineArgs with what the CLI needs to expose it (one source of truth)."""
    meta = {"help": help, "choices": choices, "group": group}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_size(value: str | int | None) -> int | None:
    """'32k' -> 32000, '32K' -> 32768, '1m' -> 1000000, '1M' -> 1048576, 'auto' -> None."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    if text in ("auto", "-1"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)", text)
    if not m:
        raise ValueError(f"max_model_len must be an integer, 'auto', or a form like 32k/1M; got {value!r}")
    number, unit = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 2**20, "g": 10**9, "G": 2**30}[unit]
    return int(number * scale)


@dataclass
class EngineArgs:
    """Every engine setting, flat, named as vLLM's `serve` flags (dashes become underscores)."""

    # model
    model: str | None = arg(None, "Model folder (Hugging Face format). Default: the embedded tiny model.")
    tokenizer: str | None = arg(None, "Tokenizer folder; default: the model folder.")
    tokenizer_mode: str = arg("auto", "auto/hf: fast tokenizer where available; slow: the Python one.", ("auto", "hf", "slow"))
    skip_tokenizer_init: bool = arg(False, "Load no tokenizer: prompts and outputs are token ids only.")
    trust_remote_code: bool = arg(False, "Accepted for compatibility; no remote code is ever run.")
    revision: str | None = arg(None, "Ignored: models load offline from a folder (a warning says so).")
    dtype: str = arg("auto", "Weight and activation dtype. auto: the checkpoint's on GPU (float16/bfloat16), float32 on CPU.",
                     ("auto", "bfloat16", "float16", "half", "float32", "float"))
    seed: int = arg(0, "Random seed for weights made with --load-format dummy and for unseeded sampling.")
    max_model_len: int | str | None = arg(None, "Context length (prompt + output). Default: the model's limit. Accepts 32k/1M forms.")
    served_model_name: str | list[str] | None = arg(None, "Name(s) the API answers to; default: the model path.")
    generation_config: str = arg("auto", "Sampling defaults: auto (the model's generation_config.json), vllm (none), or a folder.")
    override_generation_config: dict = arg({}, "JSON overriding fields of the generation config, e.g. '{\"temperature\": 0.5}'.")
    hf_overrides: dict = arg({}, "JSON overriding fields of the model's config.json.")
    hf_config_path: str | None = arg(None, "Folder whose config.json describes the model; default: the model folder.")
    max_logprobs: int = arg(20, "Most logprobs a request may ask for (-1: no cap).")
    logprobs_mode: str = arg("raw_logprobs", "What logprobs return.", ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits"))
    disable_sliding_window: bool = arg(False, "Attend over the whole context on sliding-window layers (caps max_model_len at the window).")
    device: str = arg("auto", "cuda or cpu; auto picks cuda when present.", ("auto", "cuda", "cpu"))
    # load
    load_format: str = arg("auto", "auto: safetensors, else .bin/.pt; dummy: random weights of the right shapes.",
                           ("auto", "safetensors", "pt", "dummy"), group="load")
    download_dir: str | None = arg(None, "Ignored offline: models are folders.", group="load")
    use_tqdm_on_load: bool = arg(True, "Show a progress bar per weight shard.", group="load")
    ignore_patterns: list[str] | None = arg(None, "Weight files to skip: glob patterns on paths inside the model folder, e.g. 'original/**/*'.", group="load")
    safetensors_load_strategy: str = arg("lazy", "lazy: memory-map each shard; eager: read each whole file first (faster on network filesystems).",
                                         ("lazy", "eager"), group="load")
    # cache
    block_size: int = arg(16, "Tokens per KV-cache block.", BLOCK_SIZES, group="cache")
    gpu_memory_utilization: float = arg(0.9, "Fraction of GPU memory the engine may use (weights, activations, KV cache).", group="cache")
    kv_cache_memory_bytes: int | None = arg(None, "KV cache size in bytes (overrides --gpu-memory-utilization).", group="cache")
    num_gpu_blocks_override: int | None = arg(None, "Number of KV-cache blocks, whatever memory says.", group="cache")
    enable_prefix_caching: bool = arg(True, "Reuse KV blocks of identical prompt prefixes.", group="cache")
    prefix_caching_hash_algo: str = arg("sha256", "Block hash: sha256 (collision-safe) or xxhash (fast).", ("sha256", "xxhash"), group="cache")
    kv_cache_dtype: str = arg("auto", "KV cache dtype; auto: the model dtype.", ("auto", "bfloat16", "float16", "float32"), group="cache")
    # scheduler
    max_num_batched_tokens: int | None = arg(None, "Most tokens in one step. Default 8192 on GPU, 2048 on CPU (without chunked prefill at least --max-model-len). Steps up to it replay CUDA graphs (--max-cudagraph-capture-size defaults to it, up to 8192); a smaller budget splits long prompts into more steps: lower inter-token latency under load, less throughput at saturation.", group="scheduler")
    max_num_seqs: int = arg(256, "Most requests in one step.", group="scheduler")
    scheduling_policy: str = arg("fcfs", "fcfs: arrival order; priority: lower `priority` first, then arrival.", ("fcfs", "priority"), group="scheduler")
    enable_chunked_prefill: bool = arg(True, "Split long prompts into chunks that share steps with decodes.", group="scheduler")
    async_scheduling: bool = arg(True, "Schedule step N+1 before step N's tokens reach the host.", group="scheduler")
    stream_interval: int = arg(1, "Tokens per streamed chunk (the last chunk always comes).", group="scheduler")
    # compilation
    optimization_level: int = arg(2, "-O0 eager, -O1 compile + piecewise graphs, -O2 + full decode graphs and fusions, -O3 + autotune. Sets defaults only: what -cc or a flag sets wins.", (0, 1, 2, 3), group="compilation")
    enforce_eager: bool = arg(False, "Never capture CUDA graphs (cudagraph_mode NONE) and, unless -cc.mode says otherwise, never compile.", group="compilation")
    cudagraph_capture_sizes: list[int] | None = arg(None, "Batch sizes to capture CUDA graphs for (default: 1, 2, 4, 8, then every 8 up to 512, every 64 up to 2048, every 256 up to 8192, every 1024 beyond, up to --max-cudagraph-capture-size). Piecewise graphs take every size (token counts of any batch); FULL decode graphs those up to the first that seats --max-num-seqs rows.", group="compilation")
    max_cudagraph_capture_size: int | None = arg(None, f"Largest batch, in tokens, captured in a CUDA graph (default: --max-num-batched-tokens up to {DEFAULT_CAPTURE_CAP}, so that with the default budget every step replays graphs; capped by the budget). A step with more tokens runs the compiled pieces from Python: ~20-40 ms of host time for a 1,000-token prefill of Qwen3-0.6B on the H100, against ~2 ms in graphs (past {DEFAULT_CAPTURE_CAP} tokens a step's GPU time outweighs that, and each size costs startup). 512 is vLLM's default: shorter startup (each size is a graph per compiled piece), slower long prefills.", group="compilation")
    compilation_config: dict = arg({}, f"JSON settings of compilation and CUDA graphs: mode (none|compile; on CPU only when given), cudagraph_mode (NONE|PIECEWISE|FULL|FULL_DECODE_ONLY|FULL_AND_PIECEWISE), cudagraph_capture_sizes, max_cudagraph_capture_size, pass_config {{enable_fusion}}, inductor_compile_config, cache_dir (compiled code kept across starts, inductor's in a folder per model shape, dtype, context, token budget, compile options and torch / triton versions; default {DEFAULT_CACHE_DIR}). Keys set here win over -O's defaults.", group="compilation")
    # structured outputs
    structured_outputs_config: dict = arg({}, "JSON settings of grammar-constrained decoding: backend, disable_any_whitespace, disable_additional_properties, max_cache_entries, compile_threads, compile_workers, fill_threads (xgrammar's threads for the per-step bitmask fill, default a quarter of the cores, 1 to 4).", group="structured_outputs")
    # parallel
    tensor_parallel_size: int = arg(1, "GPUs per model replica.", group="parallel")
    data_parallel_size: int = arg(1, "Model replicas.", group="parallel")
    distributed_executor_backend: str | None = arg(None, "mp or uni: one process drives the one GPU either way.", ("mp", "uni"), group="parallel")
    # observability
    disable_log_stats: bool = arg(False, "Do not log throughput and cache statistics.", group="observability")

    def create_engine_config(self) -> EngineConfig:
        return EngineConfig.build(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class ModelConfig:
    path: Path
    hf_config: Any
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    tokenizer: str | None
    tokenizer_mode: str
    seed: int
    served_model_names: list[str]
    generation_defaults: dict
    max_logprobs: int
    logprobs_mode: str
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass
class LoadConfig:
    load_format: str
    use_tqdm: bool
    ignore_patterns: list[str] = field(default_factory=list)
    safetensors_load_strategy: str = "lazy"


@dataclass
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    num_blocks_override: int | None
    enable_prefix_caching: bool
    hash_algo: str
    kv_cache_dtype: torch.dtype


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    policy: str
    enable_chunked_prefill: bool
    async_scheduling: bool
    stream_interval: int
    max_model_len: int


CUDAGRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")
COMPILE_MODES = ("none", "compile")
# What each -O level implies (../shared/DESIGN.md's table); every entry can be set by hand.
LEVEL_DEFAULTS = {
    0: dict(mode="none", cudagraph_mode="NONE", enable_fusion=False, max_autotune=False),
    1: dict(mode="compile", cudagraph_mode="PIECEWISE", enable_fusion=False, max_autotune=False),
    2: dict(mode="compile", cudagraph_mode="FULL_AND_PIECEWISE", enable_fusion=True, max_autotune=False),
    3: dict(mode="compile", cudagraph_mode="FULL_AND_PIECEWISE", enable_fusion=True, max_autotune=True),
}
# vLLM's names and numbers for `mode`, accepted so that its -cc values work here.
_VLLM_MODES = {"0": "none", "1": "compile", "2": "compile", "3": "compile", "no_compilation": "none",
               "stock_torch_compile": "compile", "dynamo_trace_once": "compile", "vllm_compile": "compile"}
_CC_KEYS = ("mode", "cudagraph_mode", "cudagraph_capture_sizes", "max_cudagraph_capture_size", "pass_config",
            "inductor_compile_config", "cache_dir")
_PASS_KEYS = ("enable_fusion",)


@dataclass
class CompilationConfig:
    """Resolved compilation settings: the -O level's defaults under what the user set."""

    level: int
    enforce_eager: bool
    cudagraph_mode: str = "NONE"  # one of CUDAGRAPH_MODES
    cudagraph_capture_sizes: list[int] = field(default_factory=list)  # empty when cudagraph_mode is NONE
    full_capture_sizes: list[int] = field(default_factory=list)  # FULL decode graphs' sizes: those that seat rows
    mode: str = "none"  # none: eager; compile: torch.compile (inductor) of the pieces between attention calls
    max_cudagraph_capture_size: int = 0
    # Inside the compiled pieces, norms, rotary and SiLU-and-mul as torch ops that inductor fuses with
    # their neighbours (residual add + RMSNorm, q/k norm + rotary, ...); off: our Triton kernels.
    enable_fusion: bool = False
    inductor_compile_config: dict = field(default_factory=dict)  # max_autotune at -O3
    cache_dir: str = DEFAULT_CACHE_DIR  # inductor's and Triton's compiled code, kept across starts
    user_set: tuple[str, ...] = ()  # the settings the user gave (the rest came from the level)

    @property
    def full_decode_graphs(self) -> bool:
        """Uniform decode batches replay one full graph (attention inside)."""
        return self.cudagraph_mode in ("FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")

    @property
    def piecewise_graphs(self) -> bool:
        """Other batches replay graphs of the compiled pieces between attention calls."""
        return self.cudagraph_mode in ("PIECEWISE", "FULL_AND_PIECEWISE")

    def describe(self) -> str:
        sizes = self.cudagraph_capture_sizes
        shown = f"{len(sizes)} sizes {sizes[0]}..{sizes[-1]}" if len(sizes) > 4 else str(sizes)
        return (f"-O{self.level}{' (enforce_eager)' if self.enforce_eager else ''}: mode={self.mode} "
                f"cudagraph_mode={self.cudagraph_mode} capture_sizes={shown} enable_fusion={self.enable_fusion} "
                f"inductor_compile_config={self.inductor_compile_config} cache_dir={self.cache_dir}; set by the user: "
                f"{', '.join(self.user_set) or 'nothing'}")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1


@dataclass
class ObservabilityConfig:
    log_stats: bool = True
    log_stats_interval: float = 10.0  # seconds between AsyncEngine's statistics lines


@dataclass
class EngineConfig:
    model: ModelConfig
    load: LoadConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    compilation: CompilationConfig
    parallel: ParallelConfig
    observability: ObservabilityConfig
    structured_outputs: StructuredOutputsConfig
    device: torch.device
    args: EngineArgs

    @classmethod
    def build(cls, args: EngineArgs) -> EngineConfig:
        from .models import model_class
        from .models.hf_config import load_hf_config

        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        if args.revision:
            logger.warning("--revision %s ignored: models load offline from a folder", args.revision)
        path = Path(args.model) if args.model else DEFAULT_MODEL_DIR
        if not (path / "config.json").is_file():
            raise ValueError(f"model {str(path)!r} is not a folder with a config.json (models load offline from a folder)")
        config_path = Path(args.hf_config_path) if args.hf_config_path else path
        if not (config_path / "config.json").is_file():
            raise ValueError(f"hf_config_path {str(config_path)!r} is not a folder with a config.json")
        hf_config = load_hf_config(config_path, _dict_arg(args.hf_overrides, "hf_overrides"))
        architecture = model_class(getattr(hf_config, "architectures", None)).__name__
        if args.disable_sliding_window:
            hf_config._disable_sliding_window = True

        dtype = _resolve_dtype(args.dtype, hf_config, device)
        model_limit = _model_max_len(hf_config, args.disable_sliding_window)
        max_model_len = parse_size(args.max_model_len) or model_limit
        if max_model_len > model_limit:
            raise ValueError(f"max_model_len ({max_model_len}) is larger than the model's limit ({model_limit})")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")

        if args.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {args.block_size}")
        if not 0 < args.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}")
        if args.num_gpu_blocks_override is not None and args.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {args.num_gpu_blocks_override}")
        if args.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {args.max_num_seqs}")
        if args.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {args.stream_interval}")
        if args.optimization_level not in (0, 1, 2, 3):
            raise ValueError(f"optimization_level must be 0, 1, 2 or 3, got {args.optimization_level}")
        if args.tensor_parallel_size != 1 or args.data_parallel_size != 1:
            raise ValueError("tensor_parallel_size and data_parallel_size > 1 are not supported yet")
        if args.distributed_executor_backend not in (None, "mp", "uni"):
            raise ValueError(f"distributed_executor_backend must be mp or uni, got {args.distributed_executor_backend!r}")
        if args.safetensors_load_strategy not in ("lazy", "eager"):
            raise ValueError(f"safetensors_load_strategy must be lazy or eager, got {args.safetensors_load_strategy!r}")
        if args.kv_cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"kv_cache_dtype must be auto, bfloat16, float16 or float32, got {args.kv_cache_dtype}")

        batched = args.max_num_batched_tokens
        if batched is None:
            default = default_token_budget(device)
            batched = default if args.enable_chunked_prefill else max(default, max_model_len)
        if batched < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {batched}")
        if not args.enable_chunked_prefill and batched < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({batched}) is smaller than max_model_len ({max_model_len}): "
                "a long prompt could never be scheduled. Raise it, lower max_model_len, or enable chunked prefill."
            )

        names = args.served_model_name or [args.model or "aio-engine/default"]
        text_config = getattr(hf_config, "text_config", hf_config)
        num_heads = text_config.num_attention_heads
        model = ModelConfig(
            path=path, hf_config=hf_config, architecture=architecture, dtype=dtype,
            max_model_len=max_model_len, tokenizer=args.tokenizer, tokenizer_mode=args.tokenizer_mode,
            seed=args.seed, served_model_names=[names] if isinstance(names, str) else list(names),
            generation_defaults=_generation_defaults(path, args),
            max_logprobs=args.max_logprobs, logprobs_mode=args.logprobs_mode,
            vocab_size=text_config.vocab_size, num_layers=text_config.num_hidden_layers,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
        )
        if args.skip_tokenizer_init:
            model.tokenizer = None
        elif model.tokenizer is None:
            model.tokenizer = str(path)
        kv_dtype = dtype if args.kv_cache_dtype == "auto" else _DTYPES[args.kv_cache_dtype]
        compilation = resolve_compilation_config(args, device, batched)
        logger.info("compilation config: %s", compilation.describe())
        return cls(
            model=model,
            load=LoadConfig(args.load_format, args.use_tqdm_on_load, list(args.ignore_patterns or []),
                            args.safetensors_load_strategy),
            cache=CacheConfig(args.block_size, args.gpu_memory_utilization, args.kv_cache_memory_bytes,
                              args.num_gpu_blocks_override, args.enable_prefix_caching,
                              args.prefix_caching_hash_algo, kv_dtype),
            scheduler=SchedulerConfig(batched, args.max_num_seqs, args.scheduling_policy,
                                      args.enable_chunked_prefill, args.async_scheduling,
                                      args.stream_interval, max_model_len),
            compilation=compilation,
            parallel=ParallelConfig(args.tensor_parallel_size, args.data_parallel_size),
            observability=ObservabilityConfig(log_stats=not args.disable_log_stats),
            structured_outputs=_structured_config(args),
            device=device,
            args=args,
        )


def resolve_compilation_config(args: EngineArgs, device: torch.device, batched: int | None = None) -> CompilationConfig:
    """The -O level's defaults under what the user set (-cc keys, dedicated flags, --enforce-eager).

    CUDA graphs exist on CUDA only: elsewhere cudagraph_mode resolves to NONE, and mode to none unless
    the user asked for compile (CPU runs tests and CI, where compiling costs more than it saves). A
    padded graph batch must fit the input buffers (max_num_batched_tokens), so capture sizes above
    it are dropped; FULL decode graphs stop at the first size that seats max_num_seqs rows.
    """
    cc = dict(_dict_arg(args.compilation_config, "compilation_config"))
    unknown = sorted(set(cc) - set(_CC_KEYS))
    if unknown:
        raise ValueError(f"compilation_config has unknown keys {unknown}; known: {list(_CC_KEYS)}")
    for key in ("cudagraph_capture_sizes", "max_cudagraph_capture_size"):
        flag = getattr(args, key)
        if flag is not None and key in cc and cc[key] != flag:
            raise ValueError(f"{key} is given twice, differently: --{key.replace('_', '-')} {flag} and "
                             f"compilation_config.{key}={cc[key]}")
        if flag is not None:
            cc[key] = flag
    passes = _dict_arg(cc.get("pass_config"), "compilation_config.pass_config")
    unknown = sorted(set(passes) - set(_PASS_KEYS))
    if unknown:
        raise ValueError(f"compilation_config.pass_config has unknown keys {unknown}; known: {list(_PASS_KEYS)}")
    inductor = _dict_arg(cc.get("inductor_compile_config"), "compilation_config.inductor_compile_config")
    user_set = [k for k in _CC_KEYS if k in cc and k not in ("pass_config", "inductor_compile_config")]
    user_set += [f"pass_config.{k}" for k in passes] + [f"inductor_compile_config.{k}" for k in inductor]
    if args.enforce_eager:
        user_set.append("enforce_eager")

    level = args.optimization_level
    if level not in LEVEL_DEFAULTS:
        raise ValueError(f"optimization_level must be 0, 1, 2 or 3, got {level}")
    implied = LEVEL_DEFAULTS[0 if args.enforce_eager else level]

    mode = cc.get("mode", implied["mode"])
    mode = _VLLM_MODES.get(str(mode).lower(), str(mode).lower())
    if mode not in COMPILE_MODES:
        raise ValueError(f"compilation_config.mode must be one of {COMPILE_MODES}, got {cc['mode']!r}")
    if device.type != "cuda" and "mode" not in cc:
        mode = "none"
    cache_dir = cc.get("cache_dir", DEFAULT_CACHE_DIR)
    if not isinstance(cache_dir, str) or not cache_dir:
        raise ValueError(f"compilation_config.cache_dir must be a folder path, got {cache_dir!r}")
    graphs = str(cc.get("cudagraph_mode", implied["cudagraph_mode"])).upper()
    if graphs not in CUDAGRAPH_MODES:
        raise ValueError(f"compilation_config.cudagraph_mode must be one of {CUDAGRAPH_MODES}, got {cc['cudagraph_mode']!r}")
    if args.enforce_eager and graphs != "NONE":
        raise ValueError(f"enforce_eager means cudagraph_mode NONE, but compilation_config.cudagraph_mode is {graphs}")
    if device.type != "cuda" and graphs != "NONE":
        if "cudagraph_mode" in cc:
            logger.warning("cudagraph_mode %s ignored: CUDA graphs need a CUDA device (this one is %s)", graphs, device)
        graphs = "NONE"
    fusion = passes.get("enable_fusion", implied["enable_fusion"])
    if not isinstance(fusion, bool):
        raise ValueError(f"compilation_config.pass_config.enable_fusion must be true or false, got {fusion!r}")
    if implied["max_autotune"]:
        inductor = {"max_autotune": True, **inductor}

    if batched is None:  # the token budget as EngineConfig.build resolves it (given there)
        batched = args.max_num_batched_tokens or default_token_budget(device)
    largest = cc.get("max_cudagraph_capture_size", min(batched, DEFAULT_CAPTURE_CAP))
    if not isinstance(largest, int) or isinstance(largest, bool) or largest < 1:
        raise ValueError(f"max_cudagraph_capture_size must be an integer >= 1, got {largest!r}")
    fits = min(largest, batched)
    sizes = cc.get("cudagraph_capture_sizes")
    if sizes is None:
        sizes = default_capture_sizes(fits)
    elif not isinstance(sizes, list) or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"cudagraph_capture_sizes must hold positive integers, got {sizes}")
    elif graphs != "NONE" and any(s > fits for s in sizes):
        logger.warning("capture sizes above %d dropped (max_cudagraph_capture_size and max_num_batched_tokens "
                       "cap them): %s", fits, sorted(s for s in sizes if s > fits))
    sizes = sorted({s for s in sizes if s <= fits}) if graphs != "NONE" else []
    # A uniform decode batch has at most max_num_seqs rows: FULL graphs up to the first size that holds them.
    seats = bisect.bisect_left(sizes, args.max_num_seqs)
    return CompilationConfig(
        level=level, enforce_eager=args.enforce_eager, cudagraph_mode=graphs, cudagraph_capture_sizes=sizes,
        full_capture_sizes=sizes[: seats + 1], mode=mode, max_cudagraph_capture_size=max(sizes, default=0),
        enable_fusion=fusion, inductor_compile_config=inductor, cache_dir=cache_dir, user_set=tuple(user_set),
    )


def default_token_budget(device: torch.device) -> int:
    """--max-num-batched-tokens unless given (with chunked prefill)."""
    return 8192 if device.type == "cuda" else 2048


def default_capture_sizes(largest: int) -> list[int]:
    """1, 2, 4, then every 8 up to 512, every 64 up to 2048, every 256 up to 8192 and every 1024
    beyond, and `largest` (each size is a graph per compiled piece, ~1.7 ms of startup each for
    Qwen3-0.6B's 29 on the H100: the coarser grid above 512 tokens pads a batch by at most 12.5%)."""
    grid = (1, 2, 4, *range(8, 513, 8), *range(576, 2049, 64), *range(2304, 8193, 256),
            *range(9216, largest + 1, 1024))
    return [s for s in grid if s < largest] + [largest]


def _structured_config(args: EngineArgs) -> StructuredOutputsConfig:
    values = _dict_arg(args.structured_outputs_config, "structured_outputs_config")
    known = {f.name for f in fields(StructuredOutputsConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"structured_outputs_config has unknown keys {unknown}; known: {sorted(known)}")
    return StructuredOutputsConfig(**values)


def _dict_arg(value: dict | str | None, name: str) -> dict:
    if not value:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return value


def _resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored)
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def _model_max_len(hf_config: Any, disable_sliding_window: bool) -> int:
    config = getattr(hf_config, "text_config", hf_config)
    limit = getattr(config, "max_position_embeddings", None) or 2048
    window = getattr(config, "sliding_window", None)
    if disable_sliding_window and window:
        limit = min(limit, window)
    return int(limit)


_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def _generation_defaults(path: Path, args: EngineArgs) -> dict:
    """Sampling defaults from generation_config.json (auto / a folder) plus overrides; 'vllm': none."""
    defaults: dict = {}
    source = {"auto": path, "vllm": None}.get(args.generation_config, Path(args.generation_config))
    if source is not None:
        file = Path(source) / "generation_config.json"
        if file.is_file():
            raw = json.loads(file.read_text())
            defaults = {k: raw[k] for k in _SAMPLING_KEYS if k in raw}
            if "max_new_tokens" in defaults:
                defaults["max_tokens"] = defaults.pop("max_new_tokens")
            if raw.get("do_sample") is False:
                defaults.pop("temperature", None)
            eos = raw.get("eos_token_id")
            if eos is not None:
                defaults["_eos_token_ids"] = tuple(eos if isinstance(eos, list) else [eos])
        elif args.generation_config not in ("auto",):
            raise ValueError(f"generation_config {args.generation_config!r}: no generation_config.json there")
    defaults.update(_dict_arg(args.override_generation_config, "override_generation_config"))
    return defaults

