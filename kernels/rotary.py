"""Rotary position embedding, neox style (rotate-half), with the cos/sin cache built once.

The cache covers plain rope, linear scaling and Llama-3 scaling; it is indexed by absolute
position, so prefill chunks and decode rows of a flat batch use the same call. On CUDA a Triton
kernel rotates q and k in place; elsewhere the torch reference returns new tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths divided by `factor`, short kept, smooth between."""
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_positions, rotary_dim] float32: cos in the first half, sin in the second."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())  # [max_positions, rotary_dim / 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling


def apply_rotary_reference(positions, query, key, cache):
    cos, sin = cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2]
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot_dim = cos.shape[-1] * 2
        x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        x1, x2 = x_rot.float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, x_pass], dim=-1) if x_pass.numel() else rotated

    return rotate(query), rotate(key)


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, n_heads, cos, sin, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    base = x_ptr + token * stride_t + heads * stride_h + dims
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(base + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   n_q_heads, n_k_heads, HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + dims, mask=dims < HALF, other=0.0)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, n_q_heads, cos, sin, HALF, BLOCK_QH, BLOCK_D)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, n_k_heads, cos, sin, HALF, BLOCK_KH, BLOCK_D)


def apply_rotary_triton(positions, query, key, cache):
    """In place on q [T, Hq, D] and k [T, Hk, D] (views of a fused qkv buffer are fine)."""
    assert query.stride(-1) == 1 and key.stride(-1) == 1
    half = cache.shape[-1] // 2
    num_tokens = positions.shape[0]
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            positions, query, key, cache, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            cache.stride(0), query.shape[1], key.shape[1], HALF=half,
            BLOCK_QH=triton.next_power_of_2(query.shape[1]), BLOCK_KH=triton.next_power_of_2(key.shape[1]),
            BLOCK_D=triton.next_power_of_2(half), num_warps=4,
        )
    return query, key


def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cache: torch.Tensor):
    """Rotate the first rotary_dim features of q [T, Hq, D] and k [T, Hk, D] by their positions."""
    if query.is_cuda:
        return apply_rotary_triton(positions, query, key, cache)
    return apply_rotary_reference(positions, query, key, cache)
