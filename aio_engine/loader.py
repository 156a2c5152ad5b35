"""Weight loading: a Hugging Face folder's safetensors (sharded or not) or .bin/.pt files, or
random weights of the right shapes (`--load-format dummy`). One tqdm bar step per shard."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import EngineConfig
from .models import model_class

logger = logging.getLogger(__name__)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return sorted(path.glob("*.safetensors"))


def _pt_files(path: Path) -> list[Path]:
    return sorted(p for p in [*path.glob("*.bin"), *path.glob("*.pt")] if "training_args" not in p.name)


def _ignored(path: Path, file: Path, patterns: list[str]) -> bool:
    relative = file.relative_to(path).as_posix()
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(file.name, p) for p in patterns)


def iterate_weights(path: Path, load_format: str, use_tqdm: bool, ignore_patterns: list[str] | None = None,
                    safetensors_load_strategy: str = "lazy") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from the folder, shard by shard; files matching ignore_patterns are skipped.

    lazy memory-maps each safetensors shard; eager reads the whole file first (one sequential read,
    faster than page faults on network filesystems).
    """
    files: list[Path] = []
    kind = load_format
    patterns = list(ignore_patterns or [])
    if load_format in ("auto", "safetensors"):
        files = [f for f in _safetensors_files(path) if not _ignored(path, f, patterns)]
        kind = "safetensors"
    if not files and load_format in ("auto", "pt"):
        files = [f for f in _pt_files(path) if not _ignored(path, f, patterns)]
        kind = "pt"
    if not files:
        raise ValueError(f"no weights for load_format={load_format!r} in {path} (use --load-format dummy for random weights)")
    for file in tqdm(files, desc="Loading weights", unit="shard", disable=not use_tqdm or len(files) < 2):
        if kind == "safetensors" and safetensors_load_strategy == "eager":
            from safetensors.torch import load

            yield from load(file.read_bytes()).items()
        elif kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            yield from state.items()


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights: N(0, 0.02) for matrices and biases, U(1, 1.1) for norm weights.

    Drawn in place on the parameters' device by a generator of that device (seeded per engine):
    drawing on the CPU and copying took 5.6 s for a 0.6B model and over a minute for an 8B one.
    The values depend on the seed and the device type, not on anything else."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            if "norm" in name:
                param.uniform_(1.0, 1.1, generator=gen)
            else:
                param.normal_(0.0, 0.02, generator=gen)


def build_on_meta(cls: type, hf_config, dtype: torch.dtype) -> torch.nn.Module:
    """The model's modules on the meta device with parameters already in `dtype`, so that
    to_empty() allocates the weights once, in their dtype (built in float32 and converted, an
    8B model took 32 GB and then 16 GB more on the GPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"), _no_init():
            return cls(hf_config)
    finally:
        torch.set_default_dtype(previous)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def _no_init():
    """torch.nn.init as no-ops while the model is built on the meta device: there is no data to
    fill, and on meta tensors those functions run through torch's reference ops, whose first use
    imports dynamo (1-2 s of -O0's startup)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, _keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def load_model(config: EngineConfig) -> torch.nn.Module:
    """Build the model on the target device with the configured dtype and fill its weights."""
    mc = config.model
    cls = model_class(getattr(mc.hf_config, "architectures", None))
    model = build_on_meta(cls, mc.hf_config, mc.dtype).to_empty(device=config.device)
    if config.load.load_format == "dummy":
        init_dummy_weights(model, mc.seed)
    else:
        weights = (
            (name, tensor.to(mc.dtype) if tensor.is_floating_point() else tensor)
            for name, tensor in iterate_weights(mc.path, config.load.load_format, config.load.use_tqdm,
                                                config.load.ignore_patterns, config.load.safetensors_load_strategy)
        )
        loaded = model.load_weights(weights)
        missing = set(dict(model.named_parameters())) - loaded
        if missing:
            raise ValueError(f"checkpoint in {mc.path} lacks weights: {sorted(missing)[:8]}")
    model.init_buffers(config.device, mc.max_model_len)
    return model.eval()
