"""Our norm, rotary, SiLU-and-mul and one-token matmul kernels as opaque torch custom ops (torch.ops.aio_engine.*).

Inside torch.compile without fusion (-O1) the compiled pieces call these: the compiler sees one
node per kernel, never traces into it, and compiles only the code between them. Each op's body
dispatches by device like the kernel module does (Triton on CUDA, the torch reference elsewhere),
and each returns new tensors (none aliases an input), as custom ops must.
"""

from __future__ import annotations

import torch

from kernels import activation, layernorm, rotary
from kernels import gemv as gemv_kernels


@torch.library.custom_op("aio_engine::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return layernorm.rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("aio_engine::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return layernorm.fused_add_rms_norm(x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.custom_op("aio_engine::silu_and_mul", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return activation.silu_and_mul(x)


@silu_and_mul.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("aio_engine::rotary", mutates_args=())
def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if query.is_cuda:  # the kernel rotates in place: on copies, so the inputs stay as they are
        query, key = query.new_empty(query.shape).copy_(query), key.new_empty(key.shape).copy_(key)
        return rotary.apply_rotary_triton(positions, query, key, cache)
    return rotary.apply_rotary_reference(positions, query, key, cache)


@apply_rotary.register_fake
def _(positions, query, key, cache):
    return query.new_empty(query.shape), key.new_empty(key.shape)


@torch.library.custom_op("aio_engine::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return gemv_kernels.gemv(x, weight, bias)


@gemv.register_fake
def _(x, weight, bias):
    return x.new_empty(1, weight.shape[0])
