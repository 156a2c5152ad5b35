"""SiLU-and-mul for gated MLPs: Triton on CUDA, the torch reference elsewhere."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded like torch's silu in the activation dtype
    tl.store(out_ptr + row * stride_out + cols, silu * up, mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    n_rows, n = x2.shape[0], shape[-1] // 2
    out = torch.empty(n_rows, n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if n_rows:
        _silu_and_mul_kernel[(n_rows, triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block,
                                                              num_warps=4)
    return out.view(*shape[:-1], n)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim; returns silu(gate) * up."""
    return silu_and_mul_triton(x) if x.is_cuda else silu_and_mul_reference(x)
