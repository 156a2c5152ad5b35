"""Matrix-vector product for one-token batches: y[1, N] = x[1, K] @ W[N, K]^T (+ bias).

At batch 1 a linear layer reads its whole weight to make one row, so its time is the weight's bytes
over memory bandwidth. cuBLAS runs these shapes as GEMMs with small tiles; this kernel streams
the weight with wide loads, each program a few output rows over all of K, so every SM keeps enough
bytes in flight. Dispatch (which batches take it) is the caller's: aio_engine/models/layers.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows = tl.where(in_range, rows, 0)  # the last program's spare rows re-read row 0; never stored
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptr + k + cols)
        else:
            k_mask = k + cols < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k + cols, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=in_range)


def default_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages). Four rows of 1024 columns a program came within 4%
    of the best of 24 configs at each llama-3.1-8b and qwen3-0.6b shape on the H100; eight warps pay
    for long rows and for few programs (benchmarks/RESULTS.md, eleventh session)."""
    return 4, 1024, 8 if k > 4096 or n < 4096 else 4, 2


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] (contiguous last dim), weight [N, K] row-major -> [1, N] in out_dtype (x's by default)."""
    n, k = weight.shape
    if x.shape != (1, k) or weight.stride(1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"gemv takes x [1, {k}] and a row-major weight; got {tuple(x.shape)}, strides {weight.stride()}")
    block_n, block_k, warps, stages = config or default_config(n, k)
    block_k = min(block_k, triton.next_power_of_2(k))
    y = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0), HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T (+ bias): Triton on CUDA, the torch reference elsewhere."""
    return gemv_triton(x, weight, bias) if x.is_cuda else gemv_reference(x, weight, bias)
