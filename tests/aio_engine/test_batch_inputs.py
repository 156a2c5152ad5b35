"""BlockTables: rows kept across steps must always equal each request's current block list.
DecodeInputs: the FULL decode graphs' inputs, padded rows included, on the device after one copy."""

import random

import numpy as np
import pytest
import torch

from aio_engine.batch_inputs import BlockTables, DecodeInputs
from aio_engine.kv_cache import KVCacheManager
from aio_engine.request import Request
from sampling.params import SamplingParams


def _check(tables: BlockTables, rows: np.ndarray, lists: list[list[int]]) -> None:
    for row, blocks in zip(rows.tolist(), lists):
        assert tables.count[row] == len(blocks)
        assert tables.table[row, : len(blocks)].tolist() == blocks


def test_rows_follow_appends_new_lists_and_requests_leaving():
    tables = BlockTables(max_seqs=4, max_blocks=16)
    lists = {"a": [3, 4], "b": [7]}
    rows = tables.rows(["a", "b"], [lists["a"], lists["b"]])
    _check(tables, rows, [lists["a"], lists["b"]])
    first = dict(zip("ab", rows.tolist()))

    lists["a"].append(9)  # a decode crossed into a new block: same list, one block more
    rows = tables.rows(["b", "a"], [lists["b"], lists["a"]])
    assert rows.tolist() == [first["b"], first["a"]]  # same rows, any order
    _check(tables, rows, [lists["b"], lists["a"]])

    lists["a"] = [11]  # preempted and readmitted: a new list, shorter
    lists["c"] = [1, 2, 5]
    rows = tables.rows(["a", "c"], [lists["a"], lists["c"]])
    _check(tables, rows, [lists["a"], lists["c"]])
    assert first["b"] in tables.free  # b is not in this step: its row was released



def test_freed_blocks_come_back_as_a_new_list():
    """BlockTables tells a readmitted request by its block list's identity: free() must replace it."""
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    request = Request("r", [1, 2, 3, 4, 5], SamplingParams())
    assert kv.allocate(request, 5)
    before = request.block_ids
    kv.free(request)
    assert request.block_ids is not before


def test_random_steps_never_drift():
    rng = random.Random(0)
    tables = BlockTables(max_seqs=8, max_blocks=64)
    live: dict[str, list[int]] = {}
    for step in range(400):
        for rid in list(live):
            if rng.random() < 0.05:
                del live[rid]  # finished
            elif rng.random() < 0.03:
                live[rid] = [rng.randrange(1000) for _ in range(rng.randrange(1, 5))]  # preempted: a new list
            elif rng.random() < 0.3 and len(live[rid]) < 64:
                live[rid].append(rng.randrange(1000))
        while len(live) < 8 and rng.random() < 0.5:
            live[f"r{step}-{len(live)}"] = [rng.randrange(1000) for _ in range(rng.randrange(1, 10))]
        ids = [rid for rid in live if rng.random() < 0.9]  # some running requests sit a step out
        rng.shuffle(ids)
        rows = tables.rows(ids, [live[rid] for rid in ids])
        assert len(set(rows.tolist())) == len(ids) and BlockTables.PAD_ROW not in rows.tolist()
        _check(tables, rows, [live[rid] for rid in ids])
    assert tables.count[BlockTables.PAD_ROW] == 1 and not tables.table[BlockTables.PAD_ROW].any()


@pytest.mark.parametrize("max_rows", [16, 13])
def test_decode_inputs_match_each_rows_blocks_and_position_and_pad_the_rest(max_rows):
    rng = random.Random(3)
    block_size, max_blocks = 4, 32
    tables = BlockTables(max_seqs=max_rows, max_blocks=max_blocks)
    inputs = DecodeInputs(max_rows, max_blocks, torch.device("cpu"))
    parts = (inputs.input_ids, inputs.positions, inputs.slots, inputs.seq_lens, inputs.packed)
    assert all(p.data_ptr() % 16 == 0 for p in parts)  # each part 16-byte aligned, whatever max_rows
    for step in range(60):  # sizes and widths up and down, so stale data from earlier steps is around
        n = rng.randint(0, max_rows)
        size = rng.choice([s for s in (1, 2, 4, 8, max_rows) if s >= n])
        lists = [rng.sample(range(1, 500), rng.randint(1, max_blocks)) for _ in range(n)]
        positions = [rng.randrange(len(b) * block_size) for b in lists]
        seqs = [([rng.randrange(1000)], p, b) for p, b in zip(positions, lists)]
        rows = tables.rows([f"r{step}-{i}" for i in range(n)], lists)
        ids, pos, slots, query_start, seq_lens, block_tables, lens = inputs.build(seqs, size, rows, tables, block_size)
        assert query_start.tolist() == list(range(size + 1))
        assert ids.tolist() == [t[0] for t, _, _ in seqs] + [0] * (size - n)
        assert pos.tolist() == positions + [0] * (size - n)
        assert slots.tolist() == [b[p // block_size] * block_size + p % block_size for p, b in zip(positions, lists)] \
            + [-1] * (size - n)
        assert seq_lens.tolist() == lens.tolist() == [p + 1 for p in positions] + [1] * (size - n)
        assert block_tables.shape == (size, max_blocks) and block_tables.stride(0) == max_blocks
        for i, b in enumerate(lists):
            assert block_tables[i, : len(b)].tolist() == b
        assert not block_tables[n:, :1].any()  # padding attends to block 0
        # Fixed addresses: a graph captured on these views reads every later step's inputs.
        assert ids.data_ptr() == inputs.input_ids.data_ptr() and block_tables.data_ptr() == inputs.tables.data_ptr()
