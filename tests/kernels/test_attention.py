"""paged_attention against dense causal attention computed per request, and write_kv by slot.

Contexts live in blocks picked at random from a cache whose other slots hold NaN, and the
output is NaN before the run: a kernel that reads outside a request's context, or leaves a row
unwritten, fails."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.attention import AttentionMetadata
from tests.kernels.conftest import require_dtype

NAN = float("nan")
# (tokens already cached, new tokens) per request: prefill chunks over cached prefixes, fresh
# prefills and decode rows, mixed in one flat batch.
MIXED = [(0, 9), (13, 7), (29, 1), (0, 1), (5, 1), (2, 6), (40, 1), (17, 3)]


def dense_attention(q, k, v, first_position: int, scale: float, window: int | None) -> torch.Tensor:
    """q [new, H, D] at positions first_position.., k/v [total, KVH, D] -> [new, H, D], in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(first_position, first_position + q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    probs = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def build_case(requests, block_size, num_heads, num_kv_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    totals = [cached + new for cached, new in requests]
    blocks_per = [-(-t // block_size) for t in totals]
    num_blocks = sum(blocks_per) + 5  # some blocks belong to nobody
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(requests), max(blocks_per), dtype=torch.int32)
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), NAN, dtype=dtype)
    queries, keys, values, slots = [], [], [], []
    for i, (total, n_blocks) in enumerate(zip(totals, blocks_per)):
        table = [order.pop() for _ in range(n_blocks)]
        tables[i, :n_blocks] = torch.tensor(table, dtype=torch.int32)
        k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
        positions = torch.arange(total)
        slot = torch.tensor(table)[positions // block_size] * block_size + positions % block_size
        cache.view(2, -1, num_kv_heads, head_dim)[0, slot] = k
        cache.view(2, -1, num_kv_heads, head_dim)[1, slot] = v
        keys.append(k)
        values.append(v)
        cached, new = requests[i]
        queries.append(torch.randn(new, num_heads, head_dim, generator=gen).to(dtype))
        slots.append(slot[cached:])
    lens = [new for _, new in requests]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(totals, dtype=torch.int32), block_tables=tables,
        max_query_len=max(lens), max_seq_len=max(totals), query_start_loc_host=starts, seq_lens_host=totals)
    return torch.cat(queries), keys, values, cache, meta


@pytest.mark.parametrize("window", [None, 5, 16])
@pytest.mark.parametrize("block_size, num_heads, num_kv_heads, head_dim", [
    (4, 4, 2, 16),  # GQA
    (8, 4, 4, 8),  # MHA
    (1, 6, 1, 32),  # MQA, a block per token
    (16, 8, 2, 64),
])
def test_paged_attention_matches_dense_causal_attention(block_size, num_heads, num_kv_heads, head_dim, window, impl):
    query, keys, values, cache, meta = build_case(MIXED, block_size, num_heads, num_kv_heads, head_dim,
                                                  torch.float32, seed=block_size * 100 + head_dim)
    scale = head_dim ** -0.5
    out = torch.full_like(query, NAN)
    result = impl.paged_attention(query, cache, meta, scale, window, out=out)
    assert result.data_ptr() == out.data_ptr()
    starts = meta.query_start_loc_host
    for i, (cached, _) in enumerate(MIXED):
        expected = dense_attention(query[starts[i]:starts[i + 1]], keys[i], values[i], cached, scale, window)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), expected, atol=2e-5, rtol=1e-4,
                                   msg=lambda m, i=i: f"request {i} {MIXED[i]}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_in_half_precision_stays_close_to_float64(dtype, impl):
    require_dtype(impl, dtype)
    query, keys, values, cache, meta = build_case(MIXED, 8, 4, 2, 32, dtype, seed=7)
    out = impl.paged_attention(query, cache, meta, 32 ** -0.5, None, out=torch.full_like(query, NAN))
    assert out.dtype == dtype
    starts = meta.query_start_loc_host
    for i, (cached, _) in enumerate(MIXED):
        expected = dense_attention(query[starts[i]:starts[i + 1]], keys[i], values[i], cached, 32 ** -0.5, None)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), expected, atol=2e-2, rtol=2e-2)


def test_paged_attention_without_out_allocates_one(impl):
    query, keys, values, cache, meta = build_case([(3, 1), (0, 4)], 4, 2, 1, 8, torch.float32, seed=3)
    out = impl.paged_attention(query, cache, meta, 0.5)
    expected = dense_attention(query[1:], keys[1], values[1], 0, 0.5, None)
    torch.testing.assert_close(out[1:].double(), expected, atol=2e-5, rtol=1e-4)
    assert not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_stores_each_token_at_its_slot_and_nowhere_else(dtype, impl):
    require_dtype(impl, dtype)
    gen = torch.Generator().manual_seed(11)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 4, 2, 8
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), NAN, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:10]
    key = torch.randn(10, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(10, num_kv_heads, head_dim, generator=gen)
    impl.write_kv(key, value, cache, slots)
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    assert torch.equal(flat[0, slots], key.to(dtype))
    assert torch.equal(flat[1, slots], value.to(dtype))
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert flat[:, untouched].isnan().all()
    # block b, offset o is slot b * block_size + o
    b, o = divmod(int(slots[0]), block_size)
    assert torch.equal(cache[0, b, o], key[0].to(dtype))


@pytest.mark.parametrize("num_splits, min_split, window", [(1, 128, None), (2, 32, None), (4, 32, None), (8, 32, None),
                                                           (8, 64, None), (4, 128, None), (4, 32, 40), (8, 32, 100)])
def test_split_k_decode_matches_dense_attention(num_splits, min_split, window):
    """Split-K is a property of the Triton kernel: only its launcher is run here (no `impl`). With a
    minimum split length some contexts fill fewer splits than the launch has (the unused ones store
    nothing; a context one split covers is finished by it, the reduction skips it), and a sliding
    window starts the splits at its first key."""
    decodes = [(37, 1), (0, 1), (190, 1), (12, 1)]
    query, keys, values, cache, meta = build_case(decodes, 8, 6, 2, 16, torch.float32, seed=num_splits)
    from kernels.attention import paged_attention_triton

    out = paged_attention_triton(query, cache, meta, 0.25, window, out=torch.full_like(query, NAN), num_splits=num_splits,
                                 config=(16, 32, 4, 3), min_split=min_split)
    again = paged_attention_triton(query, cache, meta, 0.25, window, out=torch.full_like(query, NAN),
                                   num_splits=num_splits, config=(16, 32, 4, 3), min_split=min_split)
    assert torch.equal(out, again)  # a fixed order of combination: the same bits every launch
    for i, (cached, _) in enumerate(decodes):
        expected = dense_attention(query[i:i + 1], keys[i], values[i], cached, 0.25, window)
        torch.testing.assert_close(out[i:i + 1].double(), expected, atol=2e-5, rtol=1e-4)


def test_write_kv_skips_padding_slots(impl):
    cache = torch.full((2, 3, 4, 1, 8), NAN)
    key, value = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    impl.write_kv(key, value, cache, torch.tensor([5, -1, 0]))
    flat = cache.view(2, -1, 1, 8)
    assert torch.equal(flat[0, 5], key[0]) and torch.equal(flat[1, 0], value[2])
    written = torch.zeros(12, dtype=torch.bool)
    written[[0, 5]] = True
    assert flat[:, ~written].isnan().all()


@pytest.mark.parametrize("num_kv_heads", [1, 2, 3, 4, 5, 8, 10, 12, 16, 40])
def test_decode_plan_of_a_batch_is_the_plan_of_its_cuda_graph_size(num_kv_heads):
    """A decode batch padded to the next capture size (the default grid, and one that skips sizes)
    gets the plan of its own size, so graphed and eager steps of the same requests add in the same
    order; for power-of-two head counts the plan is the one measured (the rows' thresholds)."""
    from aio_engine.config import default_capture_sizes
    from kernels.attention import decode_plan

    plans = set()
    for sizes in (default_capture_sizes(8192), [1, 2, 4, 8, 16, 24, 32, 64, 128, 256, 264]):
        for n in range(1, sizes[-1] + 1):
            padded = next(s for s in sizes if s >= n)
            assert decode_plan(n, num_kv_heads) == decode_plan(padded, num_kv_heads), (n, padded)
            plans.add(decode_plan(n, num_kv_heads))
    assert len(plans) >= 4  # the plan does change with the batch
    if num_kv_heads == 8:  # qwen3-0.6b and llama-3.1-8b: the plans of benchmarks/RESULTS.md's table
        assert [decode_plan(n, 8) for n in (1, 8, 32, 64, 128, 256)] == [
            (32, 32, 1), (8, 32, 2), (8, 64, 2), (4, 64, 2), (2, 64, 2), (1, 64, 2)]
