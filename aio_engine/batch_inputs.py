"""Host-side input state the runner keeps between steps: staging buffers and block tables.

A decode step changes little from the step before: each running request has one more token and
now and then one more block. What is kept here lets a step copy only that change instead of
rebuilding every row from Python lists.
"""

from __future__ import annotations

import numpy as np
import torch


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
