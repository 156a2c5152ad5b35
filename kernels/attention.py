"""Paged attention over a flat batch: the one entry point every model's attention goes through.

The flat batch concatenates the new tokens of all scheduled requests: prefill chunks (which
attend causally to their cached prefix plus themselves) and decode rows (one token each).
`AttentionMetadata` describes it; `write_kv` stores the new keys and values by slot, and
`paged_attention` reads them back through each request's block table.

On CUDA one Triton kernel handles the whole flat batch: each program takes a tile of one
request's query tokens times the query heads of one KV head (GQA), walks that request's KV blocks
through its block table with an online softmax, and writes the tile's output. Decode batches use
small tiles and split each context into segments reduced by a second kernel (flash-decoding),
as many as their shape needs to spread ragged contexts evenly over the SMs (`decode_plan`).
Elsewhere the plain-torch reference runs. Nothing in the launch depends on device values, so the
launch can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .cache import write_kv  # noqa: F401  (the attention entry points live together)


@dataclass
class AttentionMetadata:
    """Layout of one flat batch, shared by every attention layer of a step."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: where each request's tokens start
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in context after this step, cached + new
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, for the CPU reference's per-request loop (lists: no device sync needed).
    query_start_loc_host: list[int]
    seq_lens_host: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def _gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return k, v  # [seq_len, num_kv_heads, head_dim]


def paged_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its whole cached context (torch).

    Token t of a request at absolute position p attends to positions [max(0, p - window + 1), p].
    Decode rows are batched into one padded computation; prefill chunks run one by one.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    starts = meta.query_start_loc_host
    decode_rows: list[int] = []
    for i in range(meta.num_seqs):
        q_len = starts[i + 1] - starts[i]
        if q_len == 0:
            continue
        if q_len == 1:
            decode_rows.append(i)
            continue
        seq_len = meta.seq_lens_host[i]
        k, v = _gather_context(kv_cache, meta.block_tables[i], seq_len)
        q = query[starts[i] : starts[i + 1]]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).float(),  # [num_heads, q_len, head_dim]
            k.transpose(0, 1).float().repeat_interleave(group, dim=0),
            v.transpose(0, 1).float().repeat_interleave(group, dim=0),
            attn_mask=mask,
            scale=scale,
        )
        out[starts[i] : starts[i + 1]] = o.transpose(0, 1).to(out.dtype)
    if decode_rows:
        _decode_reference(query, kv_cache, meta, decode_rows, scale, sliding_window, out)
    return out


def _decode_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    rows: list[int],
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
) -> None:
    """All single-token rows at once: gather their contexts padded to the longest."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    device = query.device
    rows_t = torch.tensor(rows, device=device)
    seq_lens = torch.tensor([meta.seq_lens_host[i] for i in rows], device=device)
    token_idx = torch.tensor([meta.query_start_loc_host[i] for i in rows], device=device)
    max_len = int(seq_lens.max())
    pos = torch.arange(max_len, device=device)  # [max_len]
    valid = pos[None, :] < seq_lens[:, None]  # [rows, max_len]
    if sliding_window is not None:
        valid &= pos[None, :] > (seq_lens[:, None] - 1 - sliding_window)
    tables = meta.block_tables[rows_t].long()  # [rows, max_blocks]
    block_of = torch.gather(tables, 1, (pos // block_size).expand(len(rows), -1).clamp(max=tables.shape[1] - 1))
    slots = torch.where(valid, block_of * block_size + pos % block_size, 0)
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    k = flat[0][slots].float()  # [rows, max_len, num_kv_heads, head_dim]
    v = flat[1][slots].float().masked_fill(~valid[:, :, None, None], 0.0)
    q = query[token_idx].float().view(len(rows), num_kv_heads, group, head_dim)
    scores = torch.einsum("rkgd,rlkd->rkgl", q, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("rkgl,rlkd->rkgd", probs, v).reshape(len(rows), num_heads, head_dim)
    out[token_idx] = o.to(out.dtype)


# ----------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _find_seq(query_start_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The request whose query tiles contain global tile `tile`; request i's tiles start at
    query_start[i] // BLOCK_Q + i, an over-count that needs no host-side prefix sum."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend(acc, m_i, l_i, q, q_pos, lo, hi, window, table, k_cache_ptr, v_cache_ptr, kv_head,
            stride_kb, stride_ks, stride_kh, offs_d, d_ok, scale_log2,
            BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over keys [lo, hi). Unmasked tiles skip the causal test."""
    for start in range(lo, hi, TILE_N):
        offs_n = start + tl.arange(0, TILE_N)
        n_ok = offs_n < hi
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        kv_off = block * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks + kv_head * stride_kh  # [TILE_N]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [TILE_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, TILE_N], log2 units
        if MASKED:
            visible = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [TILE_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _split_share(lo, hi, min_split_tiles, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """(keys a split covers, splits used) for keys [lo, hi): the tiles spread over NUM_SPLITS
    splits, at least min_split_tiles tiles each."""
    tiles = tl.cdiv(hi - lo, TILE_N)
    per_split = tl.maximum(tl.cdiv(tiles, NUM_SPLITS), min_split_tiles)
    return per_split * TILE_N, tl.cdiv(tiles, per_split)


@triton.jit
def _store_final(out_ptr, token, head, offs_d, stride_ot, stride_oh, acc, l_i, mask):
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


# The batch's sequence count and block-table width change every step: specializing on them
# (== 1, divisible by 16) would compile new variants in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_ptr, m_ptr, l_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale_log2, num_seqs, window, min_split_tiles,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_mt, stride_mh,
    stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, DECODE: tl.constexpr,
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        # One query token per sequence, token i of sequence i: a program per sequence, no search.
        seq = tl.program_id(0)
        q_start = seq
        q_len = 1
        q_tile = 0
    else:
        # Last tiles first: under the causal mask they have the most keys, so the tail of the grid is short.
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        seq = _find_seq(query_start_ptr, tile, num_seqs, BLOCK_Q)
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        q_tile = tile - (q_start // BLOCK_Q + seq)
        if q_tile * BLOCK_Q >= q_len:
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens cached before this step

    # Rows: BLOCK_Q query tokens x GROUP_P heads (padded to a power of two).
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + offs_m // GROUP_P
    head = kv_head * GROUP + offs_m % GROUP_P
    row_ok = (q_idx < q_len) & (offs_m % GROUP_P < GROUP)
    q_pos = context + q_idx
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    token = (q_start + q_idx).to(tl.int64)

    # Keys this tile attends to: [lo, hi), then this program's share of whole TILE_N tiles.
    first_pos = context + q_tile * BLOCK_Q
    hi = tl.minimum(seq_len, first_pos + BLOCK_Q)
    lo = tl.maximum(first_pos - window + 1, 0)
    lo = (lo // TILE_N) * TILE_N
    if NUM_SPLITS > 1:
        # Segments of at least min_split_tiles tiles: a short context fills fewer splits, so a
        # graph's fixed split count does not cut short ones into crumbs. Unused splits stop here
        # (nothing stored); a context one split covers is finished by it (no reduction).
        per_split, used = _split_share(lo, hi, min_split_tiles, TILE_N, NUM_SPLITS)
        if split >= used:
            return
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)

    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if HAS_WINDOW:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, lo, hi, window, table, k_cache_ptr, v_cache_ptr, kv_head,
                                stride_kb, stride_ks, stride_kh, offs_d, d_ok, scale_log2,
                                BLOCK_SIZE, TILE_N, True, DOT_PRECISION)
    else:
        # Whole tiles before the first query position are visible to every row: no mask there.
        mid = tl.minimum(tl.maximum((first_pos // TILE_N) * TILE_N, lo), hi)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, lo, mid, window, table, k_cache_ptr, v_cache_ptr, kv_head,
                                stride_kb, stride_ks, stride_kh, offs_d, d_ok, scale_log2,
                                BLOCK_SIZE, TILE_N, False, DOT_PRECISION)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, mid, hi, window, table, k_cache_ptr, v_cache_ptr, kv_head,
                                stride_kb, stride_ks, stride_kh, offs_d, d_ok, scale_log2,
                                BLOCK_SIZE, TILE_N, True, DOT_PRECISION)

    store_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        _store_final(out_ptr, token, head, offs_d, stride_ot, stride_oh, acc, l_i, store_mask)
    elif used == 1:
        _store_final(out_ptr, token, head, offs_d, stride_ot, stride_oh, acc, l_i, store_mask)
    else:  # unnormalized partials, reduced by _reduce_splits_kernel
        tl.store(part_ptr + token[:, None] * stride_pt + head[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                 acc, mask=store_mask)
        ml = token * stride_mt + head * stride_mh + split
        tl.store(m_ptr + ml, m_i, mask=row_ok)
        tl.store(l_ptr + ml, l_i, mask=row_ok)


@triton.jit
def _reduce_splits_kernel(part_ptr, m_ptr, l_ptr, out_ptr, seq_lens_ptr, window, min_split_tiles,
                          stride_pt, stride_ph, stride_ps, stride_mt, stride_mh, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
                          NUM_SPLITS: tl.constexpr):
    """Combines a decode row's split partials; rows one split covered were finished by it."""
    token = tl.program_id(0).to(tl.int64)  # a decode batch: token i is sequence i's
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + token)
    lo = (tl.maximum(seq_len - window, 0) // TILE_N) * TILE_N
    _, used = _split_share(lo, seq_len, min_split_tiles, TILE_N, NUM_SPLITS)
    if used == 1:
        return
    splits = tl.arange(0, NUM_SPLITS)
    live = splits < used
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + token * stride_mt + head * stride_mh + splits, mask=live, other=float("-inf"))
    sums = tl.load(l_ptr + token * stride_mt + head * stride_mh + splits, mask=live, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    denom = tl.sum(sums * w, 0)
    part = tl.load(part_ptr + token * stride_pt + head * stride_ph + splits[:, None] * stride_ps + offs_d[None, :],
                   mask=live[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(part * w[:, None], 0) / denom
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def decode_plan(num_seqs: int, num_kv_heads: int) -> tuple[int, int, int]:
    """(splits, keys per tile, least tiles a split covers) of a decode batch, from its shape alone
    (a CUDA graph replays one plan for every context length). Rows are (sequence, KV head) pairs,
    counted with the sequences rounded up to a power of two: a batch and the CUDA-graph size it is
    padded to (never past that power of two while the capture grid holds the powers of two) share
    a plan, so graphed and eager steps add in the same order, whatever the head count.
    Over 64 rows: about 2048 programs (~16 per SM of the H100), splits of at least two tiles,
    64-key tiles over 128 rows; up to 64 rows about 512 programs (short splits cost more than they
    spread), and up to 32 rows (a few sequences, latency-bound) splits down to one tile. Splits are
    a power of two up to 32. Measured on ragged batches on the H100, contexts uniform in 100-600,
    100-2048 and 1000-4000 (benchmarks/RESULTS.md, eleventh session)."""
    rows = (1 << max(0, num_seqs - 1).bit_length()) * max(1, num_kv_heads)
    want = (2048 if rows > 64 else 512) // rows
    splits = 1 if want < 2 else min(32, 1 << (want.bit_length() - 1))
    return splits, 64 if rows > 128 else 32, 2 if rows > 32 else 1


# (rows per program, keys per tile, warps, pipeline stages) for batches with and without prefill;
# a decode batch's keys per tile come from decode_plan.
DECODE_CONFIG = (16, 32, 4, 3)
PREFILL_CONFIG = (128, 32, 4, 3)


def paged_attention_triton(query, kv_cache, meta, scale, sliding_window=None, out=None, num_splits=None,
                           config: tuple[int, int, int, int] | None = None, min_split: int | None = None):
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    num_seqs = meta.block_tables.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    decode = meta.max_query_len == 1
    block_m, tile_n, warps, stages = config or (DECODE_CONFIG if decode else PREFILL_CONFIG)
    splits, min_split_tiles = 1, 1
    if decode:
        plan_splits, plan_tile, min_split_tiles = decode_plan(num_seqs, num_kv_heads)
        splits = plan_splits if num_splits is None else num_splits
        tile_n = tile_n if config else plan_tile
    if head_dim > 128:
        block_m = min(block_m, 64)
    block_q = max(1, block_m // group_p)
    if min_split is not None:
        min_split_tiles = triton.cdiv(min_split, tile_n)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    # A decode batch's sequence i is its token i: one program per sequence. Otherwise a request's
    # query tiles start at query_start[i] // block_q + i, an over-count the kernel searches.
    grid = (num_seqs if decode else num_tokens // block_q + num_seqs, num_kv_heads, splits)
    window = sliding_window if sliding_window else 1 << 30
    if splits > 1:
        part = torch.empty(num_tokens, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
        m = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=query.device)
        sums = torch.empty_like(m)
        part_strides, m_strides = (part.stride(0), part.stride(1), part.stride(2)), (m.stride(0), m.stride(1))
    else:
        part = m = sums = out
        part_strides, m_strides = (0, 0, 0), (0, 0)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, part, m, sums, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale * 1.4426950408889634, num_seqs, window, min_split_tiles,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), *part_strides, *m_strides,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, TILE_N=tile_n, NUM_SPLITS=splits,
        HAS_WINDOW=bool(sliding_window), DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DECODE=decode, num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        _reduce_splits_kernel[(num_tokens, num_heads)](
            part, m, sums, out, meta.seq_lens, window, min_split_tiles, *part_strides, *m_strides,
            out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            TILE_N=tile_n, NUM_SPLITS=splits, num_warps=4,
        )
    return out


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached context plus themselves.

    Token t of a request at absolute position p attends to positions [max(0, p - window + 1), p].
    """
    if query.is_cuda:
        return paged_attention_triton(query, kv_cache, meta, scale, sliding_window, out)
    return paged_attention_reference(query, kv_cache, meta, scale, sliding_window, out)
