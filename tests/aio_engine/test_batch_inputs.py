"""BlockTables: rows kept across steps must always equal each request's current block list."""

import random

import numpy as np

from aio_engine.batch_inputs import BlockTables
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
