"""Building blocks shared by the decoder models: norms, rotary embedding, linear layers (fused projections).

Fused projections (qkv, gate_up) own a `weight_loader` that copies each checkpoint shard into its
slice, so the loader stacks `q_proj`/`k_proj`/`v_proj` and `gate_proj`/`up_proj` at load time.

Norms, rotary and SiLU-and-mul run our kernels (kernels/, dispatched by device) when eager. Inside
torch.compile (`torch.compiler.is_compiling()`) a module with `compiler_fusion` set runs them as
plain torch ops, which inductor fuses with their neighbours; without it, as opaque custom ops that
call the same kernels (custom_ops.py). `set_compiler_fusion` flips it for a whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import rotary
from kernels.activation import silu_and_mul, silu_and_mul_reference
from kernels.gemv import gemv, gemv_triton
from kernels.layernorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)

from . import custom_ops  # noqa: F401  (registers torch.ops.aio_engine.*)


def _op_kind(fusion: bool) -> str:
    """eager: our kernels; inside torch.compile: torch ops (inductor fuses them) or opaque custom ops."""
    if not torch.compiler.is_compiling():
        return "eager"
    return "torch" if fusion else "custom_op"


def set_compiler_fusion(model: nn.Module, on: bool) -> None:
    """Inside torch.compile, run norms, rotary and SiLU-and-mul as torch ops (on) or as our kernels (off)."""
    for module in model.modules():
        if hasattr(module, "compiler_fusion"):
            module.compiler_fusion = on


def apply_rotary(positions, q, k, cache, fusion: bool):
    """Rotary on q [T, Hq, D] and k [T, Hk, D] (in place when eager on CUDA); returns (q, k)."""
    kind = _op_kind(fusion)
    if kind == "torch":
        return rotary.apply_rotary_reference(positions, q, k, cache)
    if kind == "custom_op":
        return torch.ops.aio_engine.rotary(positions, q, k, cache)
    return rotary.apply_rotary(positions, q, k, cache)


class RMSNorm(nn.Module):
    compiler_fusion = True

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Plain norm, or (norm(x + residual), x + residual) when a residual is passed."""
        kind = _op_kind(self.compiler_fusion)
        if residual is None:
            if kind == "torch":
                return rms_norm_reference(x, self.weight, self.eps)
            if kind == "custom_op":
                return torch.ops.aio_engine.rms_norm(x, self.weight, self.eps)
            return rms_norm(x, self.weight, self.eps)
        if kind == "torch":
            return fused_add_rms_norm_reference(x, residual, self.weight, self.eps)
        if kind == "custom_op":
            return torch.ops.aio_engine.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


def _cuda_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows of x against a weight of its dtype on CUDA, both row-major: our GEMV (and mm's
    out_dtype) take them as they are."""
    return (x.is_cuda and x.dim() == 2 and x.dtype == weight.dtype and x.stride(-1) == 1
            and weight.stride(-1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a one-token batch on CUDA runs our GEMV (kernels/gemv.py), which streams the weight
    8-76% faster than cuBLAS's small-tile GEMMs at batch 1 on the H100. Inside torch.compile the
    one-token compile sees the static count 1; the dynamic compile's symbolic count ranges from 2
    (mark_dynamic), so `== 1` is false there without a guard and cuBLAS stays."""
    if x.shape[0] == 1 and _cuda_rows(x, weight):
        if torch.compiler.is_compiling():
            return torch.ops.aio_engine.gemv(x, weight, bias)
        return gemv(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


def logits_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in float32 (the logits). On CUDA the matmul writes its float32 accumulator
    directly (one kernel, no bf16 round trip: a batch-256 step's 233 MB copy on Qwen3's vocabulary)."""
    if x.dtype in (torch.bfloat16, torch.float16) and _cuda_rows(x, weight):
        if x.shape[0] == 1:
            return gemv_triton(x, weight, out_dtype=torch.float32)
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return linear(x, weight).float()


class Linear(nn.Linear):
    """nn.Linear through `linear` (same parameters, so checkpoints load unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class FusedLinear(nn.Module):
    """One matmul for several checkpoint projections stacked on the output dim."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__()
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.weight = nn.Parameter(torch.empty(offset, in_features))
        self.bias = nn.Parameter(torch.empty(offset)) if bias else None

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: str) -> None:
        """Copy one checkpoint projection ('q', 'gate', ...) into its rows of weight or bias."""
        start, size = self.shard_offsets[shard]
        target = getattr(self, param_name).data.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard!r}: checkpoint shape {tuple(loaded.shape)}, expected {tuple(target.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    compiler_fusion = True

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate_size]
        kind = _op_kind(self.compiler_fusion)
        if kind == "torch":
            return self.down_proj(silu_and_mul_reference(gate_up))
        if kind == "custom_op":
            return self.down_proj(torch.ops.aio_engine.silu_and_mul(gate_up))
        return self.down_proj(silu_and_mul(gate_up))


def rope_cache(config, head_dim: int, max_positions: int) -> torch.Tensor:
    """The cos/sin cache for the config's rope type (default, linear, llama3; others via transformers)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    scaling = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = rotary.llama3_inv_freq(
            inv_freq, params["factor"], params["low_freq_factor"], params["high_freq_factor"],
            params["original_max_position_embeddings"],
        )
    elif rope_type in ("yarn", "longrope"):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    elif rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3, yarn, longrope)")
    return rotary.cos_sin_cache(inv_freq, max_positions, scaling)
