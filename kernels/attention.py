"""Paged attention over a flat batch: the one entry point every model's attention goes through.

The flat batch concatenates the new tokens of all scheduled requests: prefill chunks (which
attend causally to their cached prefix plus themselves) and decode rows (one token each).
`AttentionMetadata` describes it; `write_kv` stores the new keys and values by slot, and
`paged_attention` reads them back through each request's block table.

This file holds the plain-torch reference used on CPU. Issue 3 adds the Triton kernels that the
same entry points dispatch to on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]
) -> None:
    """Store the new keys and values at their slots (reference)."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def _gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    return k, v  # [seq_len, num_kv_heads, head_dim]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its whole cached context (reference).

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
