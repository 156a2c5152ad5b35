"""Counter-based Gumbel noise and the fused Gumbel-max draw over a full vocabulary row.

The noise for (row key, token id) is a pure function: two rounds of a 32-bit integer hash
(lowbias32) over the key and the token id, so a seeded request draws the same tokens whatever
else is in the batch and wherever its row sits. Torch and Triton compute the same integers, so
CPU and GPU draw the same noise. The key of a row mixes the request's seed and step (on the host).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MASK32 = 0xFFFFFFFF
_C1, _C2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def _hash32_torch(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on non-negative int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * _C1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _C2) & MASK32
    return x ^ (x >> 16)


def gumbel_noise_reference(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """keys [rows] int64 (64-bit row keys), token_ids [rows, n] -> float32 Gumbel noise [rows, n]."""
    lo = (keys & MASK32)[:, None]
    hi = ((keys >> 32) & MASK32)[:, None]
    h = _hash32_torch(lo ^ _hash32_torch(((token_ids.long() * _GOLDEN) & MASK32) ^ hi))
    # 23 bits and a half: exact in float32, so strictly inside (0, 1). (With 24 bits the top value
    # rounds to u = 1, noise +inf: that token won whatever its logit, NaN where it was masked.)
    u = ((h >> 9).float() + 0.5) / 8388608.0
    return -torch.log(-torch.log(u))


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, keys_ptr, inv_temp_ptr, floor_ptr, out_ptr, stride_row, vocab,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + row)
    lo = key & 0xFFFFFFFF
    hi = (key >> 32) & 0xFFFFFFFF
    inv_temp = tl.load(inv_temp_ptr + row)
    floor = tl.load(floor_ptr + row)  # logits below it are out (min-p), -inf for none
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int64)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < vocab
        logit = tl.load(logits_ptr + row * stride_row + cols, mask=ok, other=float("-inf"))
        h = _hash32(lo ^ _hash32(((cols.to(tl.int64) * 0x9E3779B9) & 0xFFFFFFFF) ^ hi))
        u = ((h >> 9).to(tl.float32) + 0.5) / 8388608.0  # as gumbel_noise_reference
        g = -tl.log(-tl.log(u))
        score = tl.where(ok & (logit >= floor), logit * inv_temp + g, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_idx = tl.where(better, cols.to(tl.int64), best_idx)
    top = tl.max(best, 0)
    # lowest column among equal maxima, as torch.argmax picks
    idx = tl.min(tl.where(best == top, best_idx, vocab), 0)
    tl.store(out_ptr + row, idx)


def gumbel_argmax_reference(logits, keys, inv_temp, floor) -> torch.Tensor:
    ids = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    score = logits * inv_temp[:, None] + gumbel_noise_reference(keys, ids)
    score = score.masked_fill(logits < floor[:, None], float("-inf"))
    return score.argmax(dim=-1)


def gumbel_argmax_triton(logits, keys, inv_temp, floor) -> torch.Tensor:
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _gumbel_argmax_kernel[(rows,)](logits, keys, inv_temp, floor, out, logits.stride(0), vocab,
                                       BLOCK=2048, num_warps=8)
    return out


def gumbel_argmax(
    logits: torch.Tensor,  # [rows, vocab] float32
    keys: torch.Tensor,  # [rows] int64 row keys (seed and step mixed)
    inv_temp: torch.Tensor,  # [rows] float32
    floor: torch.Tensor,  # [rows] float32: logits below are excluded (min-p); -inf for none
) -> torch.Tensor:
    """argmax(logits / T + Gumbel noise) per row: one draw from softmax(logits / T) per row."""
    if logits.is_cuda:
        return gumbel_argmax_triton(logits, keys, inv_temp, floor)
    return gumbel_argmax_reference(logits, keys, inv_temp, floor)
