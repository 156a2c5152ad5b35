"""Host-side input state the runner keeps between steps: staging buffers and block tables.

A decode step changes little from the step before: each running request has one more token and
now and then one more block. What is kept here lets a step copy only that change instead of
rebuilding every row from Python lists.
"""

from __future__ import annotations

import numpy as np
import torch


def kv_slots(tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """The KV-cache slot of each token: its row's block holding `positions` (int64, no overflow)."""
    return tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size


class StagingBuffer:
    """Flat host buffers (pinned on CUDA) and their device twin, all allocated once.

    Each step fills a prefix of the host side through numpy and uploads just that prefix with a
    non-blocking copy. On CUDA two host halves alternate step by step (`flip`), so that filling
    step N+1 never overwrites what step N's copy has not read yet. On CPU host and device are one.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.halves = [torch.zeros(size, dtype=dtype, pin_memory=cuda) for _ in range(2 if cuda else 1)]
        self.device = torch.zeros(size, dtype=dtype, device=device) if cuda else self.halves[0]
        self.flip()

    def flip(self) -> None:
        self.halves.reverse()
        self.host = self.halves[0]
        self.np = self.host.numpy()

    def upload(self, n: int) -> torch.Tensor:
        if self.device is not self.host:
            self.device[:n].copy_(self.host[:n], non_blocking=True)
        return self.device[:n]


class BlockTables:
    """Every scheduled request's block table in a row of one host array, kept across steps.

    A step asks for the rows of its requests (`rows()`): a request seen in the step before keeps
    its row, and only blocks appended since are written (a decode step usually writes none); a
    new request, or one whose block list was replaced (freed and allocated again after a
    preemption), gets its row written whole. Rows of requests the step does not schedule are
    released. Row 0 stays all zeros with one block: the row of CUDA-graph padding.

    Relies on the KV-cache manager's contract: a request's block list only grows, and freeing
    its blocks gives it a new (empty) list.
    """

    PAD_ROW = 0

    def __init__(self, max_seqs: int, max_blocks: int) -> None:
        # The rows of two steps can be live at once (this step's, and the last one's until released).
        num_rows = 2 * max_seqs + 1
        self.table = np.zeros((num_rows, max_blocks), dtype=np.int32)
        self.count = np.zeros(num_rows, dtype=np.int64)  # blocks written per row
        self.count[self.PAD_ROW] = 1
        self.row_of: dict[str, int] = {}  # request id -> row
        self.owner: list[list[int] | None] = [None] * num_rows  # the block list a row was written from
        self.free = list(range(num_rows - 1, 0, -1))

    def rows(self, request_ids: list[str], block_lists: list[list[int]]) -> np.ndarray:
        """The rows of this step's requests (in order), up to date with their block lists."""
        rows = np.empty(len(request_ids), dtype=np.int64)
        kept: dict[str, int] = {}
        row_of, owner, count, table = self.row_of, self.owner, self.count, self.table
        for i, (rid, blocks) in enumerate(zip(request_ids, block_lists)):
            row = row_of.pop(rid, None)
            if row is None:
                row = self.free.pop()
            elif owner[row] is not blocks or len(blocks) < count[row]:
                count[row] = 0  # a new list (the request was preempted): write it whole
            written, now = int(count[row]), len(blocks)
            if now > written:
                table[row, written:now] = blocks[written:]
                count[row] = now
            owner[row] = blocks
            kept[rid] = rows[i] = row
        for row in row_of.values():  # requests not in this step: their rows are free again
            owner[row] = None
            count[row] = 0
            self.free.append(row)
        self.row_of = kept
        return rows


class DecodeInputs:
    """The inputs of the FULL decode graphs, built on the host and sent in one copy per step.

    One host buffer (two pinned halves that alternate, as StagingBuffer's) holds a step's int64
    input ids, positions and KV slots, its int32 context lengths and its block tables packed
    [rows, widest table of the step]; one non-blocking copy sends the used span to its device
    twin, and one device copy spreads the packed tables into `tables`, whose fixed row stride the
    graphs were captured with. A graph of `size` rows reads the first `size` of each (fixed
    addresses). Query start offsets of a decode batch are 0..size: made once, on the device.
    """

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        n = self.max_rows = max_rows
        self.stride = -(-n // 4) * 4  # every part starts 16-byte aligned (as Triton likes its pointers)
        self.offset_lens = 3 * 8 * self.stride
        self.offset_tables = self.offset_lens + 4 * self.stride
        nbytes = self.offset_tables + 4 * n * max_blocks
        pin = device.type == "cuda"
        self.halves = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.host = [self._parts(h.numpy(), np) for h in self.halves]
        self.device = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.input_ids, self.positions, self.slots, self.seq_lens, self.packed = self._parts(self.device, torch)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.query_start_host = list(range(n + 1))
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.turn = 0

    def _parts(self, buf, lib):
        """(input_ids, positions, slots, seq_lens, packed tables) views of a numpy or torch byte buffer."""
        n, m = self.max_rows, self.stride
        i64 = buf[: self.offset_lens].view(lib.int64)
        lens = buf[self.offset_lens : self.offset_lens + 4 * n].view(lib.int32)
        return i64[:n], i64[m : m + n], i64[2 * m : 2 * m + n], lens, buf[self.offset_tables :].view(lib.int32)

    def build(self, seqs, size: int, table_rows: np.ndarray, block_tables: BlockTables, block_size: int):
        """seqs: (one token, position, _) per decode row, padded to `size` rows (one-token rows
        that write no KV, slot -1, and attend to one slot of block 0) -> device (input_ids,
        positions, slot_mapping, query_start, seq_lens, block_tables), and the host's seq_lens."""
        self.turn ^= 1
        ids, pos, slots, lens, packed = self.host[self.turn]
        n = len(seqs)
        ids[:n] = np.fromiter((t[0] for t, _, _ in seqs), dtype=np.int64, count=n)
        pos[:n] = np.fromiter((p for _, p, _ in seqs), dtype=np.int64, count=n)
        ids[n:size] = 0
        pos[n:size] = 0
        if n < size:
            table_rows = np.concatenate([table_rows, np.full(size - n, BlockTables.PAD_ROW, dtype=np.int64)])
        width = max(1, int(block_tables.count[table_rows].max()))
        tables = packed[: size * width].reshape(size, width)
        np.take(block_tables.table[:, :width], table_rows, axis=0, out=tables)
        p = pos[:size]
        slots[:size] = kv_slots(tables, np.arange(size), p, block_size)
        slots[n:size] = -1
        np.add(p, 1, out=lens[:size], casting="unsafe")
        end = self.offset_tables + 4 * size * width
        self.device[:end].copy_(self.halves[self.turn][:end], non_blocking=True)
        self.tables[:size, :width].copy_(self.packed[: size * width].view(size, width), non_blocking=True)
        return (self.input_ids[:size], self.positions[:size], self.slots[:size], self.query_start[: size + 1],
                self.seq_lens[:size], self.tables[:size], lens[:size])
