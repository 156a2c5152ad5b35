"""Sampling kernels: counter-based Gumbel noise, the Gumbel-max (or argmax) draw over whole rows,
and sparse penalties. Top-k / top-p selection lives in kernels/sampling_topk.py.

The noise for (row key, token id) is a pure function: two rounds of a 32-bit integer hash
(lowbias32) over the key and the token id, so a seeded request draws the same tokens whatever
else is in the batch and wherever its row sits. Torch and Triton compute the same integers, so
CPU and GPU draw the same noise. The key of a row mixes the request's seed and step (on the host).

Each Triton kernel has a plain-torch reference with the same contract; the public functions
dispatch on the tensors' device. Per-row inputs are indexed by logits row; `rows` (int64 [m])
picks the rows a call works on (None: all), and results land in `out[row]`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MASK32 = 0xFFFFFFFF
_C1, _C2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9
NEG_INF = float("-inf")
_PROGRAMS = 1024  # programs a whole-row draw aims for (rows x splits), enough to fill an H100
# The penalty kernel's placeholder while it counts (no real logit is ever exactly -2**24).
_SENTINEL: tl.constexpr = tl.constexpr(-16777216.0)
_SENTINEL_BITS: tl.constexpr = tl.constexpr(-880803840)  # its float32 bits, as an int32


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


def _select(rows, n, device):
    return torch.arange(n, device=device) if rows is None else rows


# --- Triton helpers ---

@triton.jit
def _hash32(x):
    # uint32 arithmetic wraps modulo 2**32: the same integers as the reference's int64 & MASK32,
    # at one instruction per multiply (int64 multiplies are emulated on the GPU).
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _gumbel(key, cols):
    lo = (key & 0xFFFFFFFF).to(tl.uint32)
    hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    h = _hash32(lo ^ _hash32((cols.to(tl.uint32) * 0x9E3779B9) ^ hi))
    u = ((h >> 9).to(tl.float32) + 0.5) / 8388608.0  # as gumbel_noise_reference
    return -tl.log(-tl.log(u))


@triton.jit
def _row_of(rows_ptr, i, HAS_ROWS: tl.constexpr):
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i.to(tl.int64)
    return row


# --- the draw over whole rows: Gumbel-max for random rows, argmax for greedy ones ---

@triton.jit
def _scan(row_ptr, start, stop, key, inv_temp, floor, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    for s in range(start, stop, BLOCK):
        cols = s + tl.arange(0, BLOCK)
        ok = cols < stop
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf"))
        if NOISE:
            score = x * inv_temp + _gumbel(key, cols)
        else:
            score = x
        score = tl.where(ok & (x >= floor), score, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        arg = tl.where(better, cols, arg)
    return best, arg


@triton.jit
def _draw_split_kernel(logits_ptr, stride, rows_ptr, skip_ptr, keys_ptr, inv_temp_ptr, floor_ptr, best_ptr, arg_ptr,
                       vocab, span, HAS_ROWS: tl.constexpr, HAS_SKIP: tl.constexpr, NOISE: tl.constexpr,
                       HAS_FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    # One split of one row: its best score and (lowest) column; _draw_combine_kernel picks among splits.
    i = tl.program_id(0)
    split = tl.program_id(1)
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr + i) == 0
    if run:
        row = _row_of(rows_ptr, i, HAS_ROWS)
        start = split * span
        stop = tl.minimum(start + span, vocab)
        floor = float("-inf")
        if HAS_FLOOR:
            floor = tl.load(floor_ptr + row)
        row_ptr = logits_ptr + row * stride
        if NOISE:
            inv_temp = tl.load(inv_temp_ptr + row)
            key = tl.load(keys_ptr + row)
            if inv_temp > 0:
                best, arg = _scan(row_ptr, start, stop, key, inv_temp, floor, True, BLOCK)
            else:  # a greedy row beside random ones
                best, arg = _scan(row_ptr, start, stop, key, inv_temp, floor, False, BLOCK)
        else:
            best, arg = _scan(row_ptr, start, stop, 0, 1.0, floor, False, BLOCK)
        top = tl.max(best, 0)
        out = i * tl.num_programs(1) + split
        tl.store(best_ptr + out, top)
        tl.store(arg_ptr + out, tl.min(tl.where(best == top, arg, vocab), 0))


@triton.jit(do_not_specialize=["splits"])  # the splits follow the rows: one kernel for every batch
def _draw_combine_kernel(best_ptr, arg_ptr, rows_ptr, skip_ptr, out_ptr, splits, vocab, HAS_ROWS: tl.constexpr,
                         HAS_SKIP: tl.constexpr, BLOCK_S: tl.constexpr):
    i = tl.program_id(0)
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr + i) == 0
    if run:
        s = tl.arange(0, BLOCK_S)
        best = tl.load(best_ptr + i * splits + s, mask=s < splits, other=float("-inf"))
        arg = tl.load(arg_ptr + i * splits + s, mask=s < splits, other=vocab)
        top = tl.max(best, 0)
        idx = tl.min(tl.where(best == top, arg, vocab), 0)  # the lowest column among equal maxima, as argmax
        tl.store(out_ptr + _row_of(rows_ptr, i, HAS_ROWS), idx.to(tl.int64))


def gumbel_argmax_reference(logits, keys, inv_temp, floor, rows=None, out=None, skip=None) -> torch.Tensor:
    n, vocab = logits.shape
    x = logits if rows is None else logits.index_select(0, rows)
    r = _select(rows, n, logits.device)
    if keys is None:  # every row greedy
        score = x
    else:
        it = inv_temp[r][:, None]
        noise = gumbel_noise_reference(keys[r], torch.arange(vocab, device=x.device).expand(x.shape[0], -1))
        score = torch.where(it > 0, x * it + noise, x)
    if floor is not None:
        score = score.masked_fill(x < floor[r][:, None], NEG_INF)
    tokens = score.argmax(dim=-1)
    if out is None:
        out = torch.zeros(n, dtype=torch.int64, device=logits.device)
    if skip is not None:
        tokens = torch.where(skip, out[r], tokens)
    return out.index_copy_(0, r, tokens)


def gumbel_argmax_triton(logits, keys, inv_temp, floor, rows=None, out=None, skip=None) -> torch.Tensor:
    n, vocab = logits.shape
    m = n if rows is None else rows.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if m == 0 or vocab == 0:
        return out
    block = 4096 if vocab >= 4096 else triton.next_power_of_2(vocab)
    # Split rows so that the grid fills the GPU: one program per row of 152k logits leaves
    # the memory system idle (each program waits on one load at a time).
    splits = max(1, min(triton.cdiv(vocab, block), triton.cdiv(_PROGRAMS, m)))
    span = triton.cdiv(triton.cdiv(vocab, splits), block) * block
    splits = triton.cdiv(vocab, span)
    best = torch.empty(m, splits, dtype=torch.float32, device=logits.device)
    arg = torch.empty(m, splits, dtype=torch.int32, device=logits.device)
    flags = dict(HAS_ROWS=rows is not None, HAS_SKIP=skip is not None)
    _draw_split_kernel[(m, splits)](logits, logits.stride(0), rows, skip, keys, inv_temp, floor, best, arg, vocab,
                                    span, NOISE=keys is not None, HAS_FLOOR=floor is not None, BLOCK=block,
                                    num_warps=8, **flags)
    most = triton.cdiv(vocab, block)  # the splits of a single row: one block size whatever the rows
    _draw_combine_kernel[(m,)](best, arg, rows, skip, out, splits, vocab, BLOCK_S=triton.next_power_of_2(most),
                               num_warps=1, **flags)
    return out


def gumbel_argmax(
    logits: torch.Tensor,  # [rows, vocab] float32
    keys: torch.Tensor | None,  # [rows] int64 row keys (seed and step mixed); None: every row greedy
    inv_temp: torch.Tensor | None,  # [rows] float32, 0 for a greedy row (plain argmax)
    floor: torch.Tensor | None,  # [rows] float32: logits below are excluded (min-p); None for none
    rows: torch.Tensor | None = None,  # the rows to draw (None: all)
    out: torch.Tensor | None = None,  # [rows] int64, written at `rows`
    skip: torch.Tensor | None = None,  # [len(rows)] bool: rows to leave alone
) -> torch.Tensor:
    """argmax(logits / T + Gumbel noise) per row: one draw from softmax(logits / T) per row.

    Every row greedy, nothing else asked: torch's argmax, one launch (H100, 256 x 151,936: 12 us of
    host time against 94 us for the split kernel's two Triton launches, 83 vs 70 us on the GPU)."""
    if keys is None and floor is None and rows is None and out is None and skip is None:
        return logits.argmax(dim=-1)
    if logits.is_cuda:
        return gumbel_argmax_triton(logits, keys, inv_temp, floor, rows, out, skip)
    return gumbel_argmax_reference(logits, keys, inv_temp, floor, rows, out, skip)


# --- penalties over the tokens each row has seen, without [rows, vocab] tensors ---

# The sizes that change from step to step (rows, the longest history) are not specialized on,
# and the block is fixed: a new value never compiles a new kernel on the engine loop (a block of
# next_power_of_2(width) compiled once per power of two as histories grew, ~50 ms each, measured).
@triton.jit(do_not_specialize=["num", "width", "ids_stride"])
def _penalty_kernel(logits_ptr, stride, ids_ptr, ids_stride, ranges_ptr, factors_ptr, new_ptr, saved_ptr, num, width,
                    HAS_NEW: tl.constexpr, BLOCK: tl.constexpr):
    # One program per penalized row (rows never share a logits row), in three passes over its
    # range, each seeing every write of the one before (a block barrier between them):
    # 1: swap each of the row's logits for -2**24; the one entry per logit that gets the real value
    #    back is its writer (repeated ids get the sentinel), so nothing needs deduplicating;
    # 2: add 1 per output occurrence (the count, exact in float32 whatever the atomics' order);
    # 3: the writer reads the count and writes the penalized logit.
    i = tl.program_id(0)
    begin = tl.load(ranges_ptr + 2 * num + i)
    split = tl.load(ranges_ptr + 3 * num + i)
    end = tl.load(ranges_ptr + 4 * num + i)
    history = ids_ptr + tl.load(ranges_ptr + num + i).to(tl.int64) * ids_stride
    if HAS_NEW:  # the token the row's request appended since the last build: the history's last
        tl.store(history + end - 1, tl.load(new_ptr + i))
        tl.debug_barrier()
    row = logits_ptr + tl.load(ranges_ptr + i).to(tl.int64) * stride
    saved = saved_ptr + i.to(tl.int64) * width - begin  # saved[pos] for pos in [begin, end)
    for start in range(begin, end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        ok = pos < end
        bits = (row + tl.load(history + pos, mask=ok, other=0)).to(tl.pointer_type(tl.int32))
        old = tl.atomic_xchg(bits, tl.full([BLOCK], _SENTINEL_BITS, tl.int32), mask=ok)  # (the interpreter
        tl.store(saved + pos, old.to(tl.float32, bitcast=True), mask=ok)  # exchanges integers only)
    tl.debug_barrier()
    for start in range(tl.maximum(begin, split), end, BLOCK):  # output tokens only
        pos = start + tl.arange(0, BLOCK)
        ok = pos < end
        tl.atomic_add(row + tl.load(history + pos, mask=ok, other=0), tl.full([BLOCK], 1.0, tl.float32), mask=ok)
    tl.debug_barrier()
    rep = tl.load(factors_ptr + i)
    frequency, presence = tl.load(factors_ptr + num + i), tl.load(factors_ptr + 2 * num + i)
    for start in range(begin, end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        ok = pos < end
        at = row + tl.load(history + pos, mask=ok, other=0)
        x = tl.load(saved + pos, mask=ok, other=_SENTINEL)
        writer = ok & (x.to(tl.int32, bitcast=True) != _SENTINEL_BITS)
        count = tl.load(at, mask=writer) - _SENTINEL
        x = tl.where(x > 0, x / rep, x * rep)
        x = x - (frequency * count + presence * (count > 0).to(tl.float32))
        tl.store(at, x, mask=writer)


def apply_penalties_reference(logits, ids, ranges, factors, width, new_ids=None):
    vocab = logits.shape[1]
    rows, slots, begin, split, end = ranges.long()
    if new_ids is not None:
        ids[slots, end - 1] = new_ids.to(ids.dtype)
    repetition, frequency, presence = factors[:, :, None]
    pos = begin[:, None] + torch.arange(max(width, 1), device=logits.device)  # [P, width]
    inside = pos < end[:, None]
    tokens = ids[slots[:, None], pos.clamp(max=ids.shape[1] - 1)].long()
    # Dense over [P, vocab + 1]: the last column catches the padding. (The torch path is the CPU's.)
    counts = torch.zeros(len(rows), vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, torch.where(inside & (pos >= split[:, None]), tokens, vocab),
                        torch.ones_like(tokens, dtype=logits.dtype))
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, torch.where(inside, tokens, vocab), True)
    counts, seen = counts[:, :vocab], seen[:, :vocab]
    x = logits.index_select(0, rows)
    x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    x = x - (frequency * counts + presence * (counts > 0))
    logits.index_copy_(0, rows, x)


def apply_penalties_triton(logits, ids, ranges, factors, width, new_ids=None, block: int = 512):
    num = ranges.shape[1]
    if num == 0 or width == 0:
        return
    saved = torch.empty(num, width, dtype=torch.float32, device=logits.device)
    _penalty_kernel[(num,)](logits, logits.stride(0), ids, ids.stride(0), ranges, factors, new_ids, saved, num, width,
                            HAS_NEW=new_ids is not None, BLOCK=block, num_warps=4)


def apply_penalties(
    logits: torch.Tensor,  # [rows, vocab] float32, changed in place
    ids: torch.Tensor,  # [slots, capacity] int32 token ids
    ranges: torch.Tensor,  # [5, P] int32 per penalized row: logits row, slot, begin, split, end; the row's
    # tokens are ids[slot, begin:end], those before split prompt tokens (repetition only)
    factors: torch.Tensor,  # [3, P] float32: repetition (1: off), frequency, presence
    width: int,  # the longest end - begin
    new_ids: torch.Tensor | None = None,  # [P] int32: written at ids[slot, end - 1] first (the step's new token)
) -> None:
    """HF's repetition penalty over every token in the range (positive logits divided, negative
    multiplied), then OpenAI's logit -= frequency * count + presence * (count > 0) over the output
    tokens, each distinct token once. (A logit of exactly -2**24 is not supported on CUDA.)"""
    fn = apply_penalties_triton if logits.is_cuda else apply_penalties_reference
    fn(logits, ids, ranges, factors, width, new_ids)
