"""BatchBitmask: one step's token bitmask, filled on the CPU and applied to the logits' rows.

Layout (xgrammar's): int32 [max_rows, words], bit j of word w allows token 32 * w + j. Row r
belongs to logits row r, so only the rows of constrained sequences are filled, copied and
masked; unconstrained rows are never touched.

Widths: the logits are as wide as the model's vocabulary (vocab_size), which is often padded
past the tokenizer's (Qwen3: 151,936 rows, 151,669 tokens). xgrammar fills only the host buffer,
as wide as the grammars' TokenizerInfo (structured/compiler.py): its fill costs time per id, so
the padding ids are kept from it (the embedded 4096-token tokenizer on Qwen3's 151,936 rows:
244 us a row in a JSON string with them, 4 us without). Ids past the host buffer's words are
padding and never allowed: on CUDA the device mask is as wide as the logits, its words past the
host's are zeroed once and never written; on the CPU the padding columns are set to -inf.

The host buffer (pinned on CUDA) is sized on the first fill, to the grammars' vocabulary; the
device mask is allocated once. apply() copies the filled rows non-blocking on the current
stream and masks the logits there, just before sampling.

Ordering on CUDA: fill() for step N+1 needs the tokens of step N on the host, which the
engine gets only after step N's sampling (queued after apply()'s copy) has finished, so the
host buffer is never rewritten under a pending copy. An event guards that all the same.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
import xgrammar as xgr

from .matcher import RequestGrammar, batch_accept_token, fill_stop_row, settle_accepts


class BatchBitmask:
    """Fill rows for one step's constrained sequences, then apply them to that step's logits."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device | str = "cpu", *,
                 fill_threads: int | str = 1) -> None:
        if max_rows < 1 or vocab_size < 1:
            raise ValueError(f"BatchBitmask needs max_rows >= 1 and vocab_size >= 1, got {max_rows}, {vocab_size}")
        self.max_rows, self.vocab_size = max_rows, vocab_size  # vocab_size: the logits' width
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.host = torch.zeros(max_rows, 0, dtype=torch.int32)  # [max_rows, tokenizer words], sized by fill()
        self._rows_host = torch.zeros(max_rows, dtype=torch.int32, pin_memory=on_cuda)  # [max_rows]
        if on_cuda:
            words = (vocab_size + 31) // 32
            self._mask_device = torch.zeros(max_rows, words, dtype=torch.int32, device=self.device)  # [max_rows, words]
            self._rows_device = torch.empty_like(self._rows_host, device=self.device)
            self._uploaded = torch.cuda.Event()
        self._uploading = False
        self._sms: int | None = None  # the device's multiprocessors: the apply kernel's grid
        self._rows: list[int] = []  # the logits rows filled for the current step
        self._rows_sent: list[int] | None = None  # the rows _rows_device holds (CUDA)
        self._copy_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # rows' span -> (device, host) views
        # xgrammar's batch fill runs the rows on its own C++ threads, in one call from Python (its
        # FFI call, taking the matchers' handles, without xgrammar's Python wrapper).
        self._batch = xgr.BatchGrammarMatcher(fill_threads)  # see StructuredOutputsConfig.fill_threads
        self._fill = self._batch._handle.batch_fill_next_token_bitmask  # (handles, bitmask, rows, debug)
        self._worker: FillWorker | None = None  # start_fill's thread (made on first use)
        # An accept handed to start_fill: (grammars, tokens, xgrammar's answer or the slot it comes in).
        self._accepting: tuple | None = None
        self._accept_slot: list = [None]  # the worker's answer: an FFI array, or the accept's error
        self._accept_done = threading.Lock()  # released by the worker once the slot holds the answer
        self._accept_done.acquire()

    @property
    def rows(self) -> list[int]:
        return self._rows

    def fill(self, grammars: Sequence[RequestGrammar], rows: Sequence[int]) -> None:
        """Fill bitmask[rows[i]] for grammars[i] (this step's constrained sequences only).

        A terminated grammar's row allows only its stop tokens. Rows left out of `rows` are not
        masked by the next apply(), whatever the buffer holds for them.
        """
        self.start_fill(grammars, rows, background=False)

    def start_fill(self, grammars: Sequence[RequestGrammar], rows: Sequence[int], background: bool = True,
                   accept: tuple[Sequence[RequestGrammar], Sequence[int]] | None = None) -> None:
        """fill() in the background: xgrammar fills the live rows in a worker thread (its batch
        fill releases the GIL, so the caller's Python runs meanwhile; this call returns once
        the worker is on its way into xgrammar) and the next apply(), upload(), clear() or
        finish_fill() waits for it. Until then nothing may call the grammars' matchers (xgrammar
        moves a matcher's parser through each candidate token while it fills).

        `accept`: (grammars, tokens) that the worker gives xgrammar first (accept_batch's call,
        also without the GIL), the step before's tokens, so that the fill sees them. The caller
        must then call accepted(), which waits for that part only and returns what accept_batch
        would: the caller's Python between the two runs beside xgrammar's accept. A row whose
        grammar a stop token of `accept` terminates is filled as terminated. An accept that
        accepted() was not asked for is booked by the next start_fill()."""
        rows = [int(r) for r in rows]
        if len(rows) != len(grammars):
            raise ValueError(f"fill: {len(grammars)} grammars but {len(rows)} rows")
        if rows and (min(rows) < 0 or max(rows) >= self.max_rows or len(set(rows)) != len(rows)):
            raise ValueError(f"fill: rows must be distinct and in [0, {self.max_rows}), got {rows}")
        self.finish_fill()
        if self._accepting is not None:  # an accept never collected: booked now, xgrammar has it
            self.accepted()
        self._wait_upload()
        stopping: set[int] = set()  # ids of grammars a stop token in `accept` terminates
        if accept is not None:
            accepting, tokens = list(accept[0]), [int(t) for t in accept[1]]
            if len(accepting) != len(tokens):
                raise ValueError(f"accept: {len(accepting)} grammars but {len(tokens)} tokens")
            stopping = {id(g) for g, t in zip(accepting, tokens) if g.stops_at(t)}
            accept_handles = [g._handle for g in accepting]
        if grammars:
            self._fit(grammars[0].vocab_size)
        handles, live_rows = [], []
        for grammar, row in zip(grammars, rows):
            if grammar.is_terminated or id(grammar) in stopping:
                fill_stop_row(self.host, row, grammar.stop_token_ids)
            else:
                handles.append(grammar._handle)
                live_rows.append(row)
        self._rows = rows
        if accept is None and not handles:
            return
        if not background:
            if accept is not None:
                self._accepting = (accepting, tokens, batch_accept_token(accept_handles, tokens, False))
            if handles:
                self._fill(handles, self.host, live_rows, False)
            return
        if self._worker is None:
            self._worker = FillWorker()
        if accept is None:
            self._worker.start(self._fill, (handles, self.host, live_rows, False))
            return
        self._accepting = (accepting, tokens, self._accept_slot)
        self._worker.start(_accept_then_fill, (self._accept_slot, self._accept_done, accept_handles, tokens,
                                               self._fill, handles, self.host, live_rows))

    def accepted(self) -> list[bool]:
        """Wait for the accept start_fill(accept=...) handed the worker (not for the fill after
        it), count the tokens into their grammars; which tokens xgrammar took (accept_batch's
        answer). Its error, if any, raises here."""
        if self._accepting is None:
            raise RuntimeError("accepted: start_fill() was given nothing to accept")
        grammars, tokens, result = self._accepting
        if result is self._accept_slot:  # in the worker
            self._accept_done.acquire()
            result, self._accept_slot[0] = self._accept_slot[0], None
        self._accepting = None
        if isinstance(result, BaseException):
            raise result
        return settle_accepts(grammars, tokens, result)

    @property
    def _filling(self) -> bool:
        """A fill start_fill() began is still to be waited for."""
        return self._worker is not None and self._worker.busy

    def finish_fill(self) -> None:
        """Wait for the fill start_fill() began, if any (its error, if any, raises here)."""
        if self._worker is not None:
            self._worker.finish()

    def clear(self) -> None:
        """No row is masked by the next apply() (a step without constrained sequences)."""
        self.finish_fill()
        self._rows = []

    def apply(self, logits: torch.Tensor) -> None:
        """Set logits[row, token] = -inf for every disallowed token of every filled row, in place.

        logits: [num_rows, vocab_size] on this bitmask's device (any float dtype); a no-op when
        no row was filled.
        """
        mask = self.upload(logits)
        if mask is not None:
            mask(logits)

    def upload(self, logits: torch.Tensor, stream: torch.cuda.Stream | None = None) -> Callable[[torch.Tensor], None] | None:
        """apply() but the masking itself: the filled rows copied to the device (queued on
        `stream`, the current stream by default, which must be current), and the masking
        returned, to run on these logits: None when no row was filled. On CUDA the masking reads
        only this bitmask's device buffers (`graph_key` says which), so a CUDA graph may hold it
        and replay it after each upload (sampling/sampler.py)."""
        self.finish_fill()
        rows = self._rows
        if not rows:
            return None
        top = max(rows) + 1
        shape = logits.shape
        if len(shape) != 2 or shape[1] != self.vocab_size:
            raise ValueError(f"apply: logits must be [rows, {self.vocab_size}], got {list(shape)}")
        if logits.is_cuda != (self.device.type == "cuda"):
            raise ValueError(f"apply: logits are on {logits.device} but the bitmask is for {self.device}")
        if top > shape[0]:
            raise ValueError(f"apply: row {top - 1} is past the {shape[0]} logits rows")
        if not logits.is_cuda:
            return functools.partial(_apply_on_cpu, bitmask=self.host, rows=rows, vocab_size=self.vocab_size)
        if logits.stride(-1) != 1:
            raise ValueError("apply: the logits' rows must be contiguous")
        self._wait_upload()
        # The copies and the masking are queued on the stream, in order: no host sync.
        views = self._copy_views.get(top)
        if views is None:  # the rows' span: usually the one of the step before
            views = self._copy_views[top] = (self._mask_device[:top, : self.host.shape[1]], self.host[:top])
        views[0].copy_(views[1], non_blocking=True)
        count = len(rows)
        if rows != self._rows_sent:  # usually the rows of the step before: on the device already
            self._rows_host[:count].copy_(torch.tensor(rows, dtype=torch.int32))
            self._rows_device[:count].copy_(self._rows_host[:count], non_blocking=True)
            self._rows_sent = rows
        self._uploaded.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        self._uploading = True
        if self._sms is None:
            self._sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return DeviceMask(self, count)

    def _fit(self, vocab_size: int) -> None:
        """Size the host buffer to the grammars' vocabulary (one tokenizer's: once per engine)."""
        if vocab_size > self.vocab_size:
            raise ValueError(f"fill: the grammars' vocabulary ({vocab_size}) is wider than the logits ({self.vocab_size})")
        words = (vocab_size + 31) // 32
        if words == self.host.shape[1]:
            return
        self.host = torch.zeros(self.max_rows, words, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._copy_views.clear()
        if self.device.type == "cuda":
            self._mask_device.zero_()  # no word of a wider vocabulary before may stay behind

    def _wait_upload(self) -> None:
        # Normally already done (see the module docstring); only then may the host buffers change.
        if self._uploading:
            self._uploaded.synchronize()
            self._uploading = False


class FillWorker:
    """A thread that runs one call at a time for its caller, handed over by bare locks.

    start() returns once the worker has the call in hand and is on its way into it (the caller
    waits, its GIL let go, until then): a call that releases the GIL at once (xgrammar's batch
    fill) then runs beside the caller's Python. Without that handshake the worker would get the
    GIL only when the caller next let it go, often much later. Bare locks rather than an executor,
    futures and events: the handover is on every constrained step's path (32 us against 126-153
    us for an executor and an event, measured on the dev machine).
    The thread ends when its owner is collected (the thread itself holds only the locks)."""

    def __init__(self) -> None:
        self._go, self._taken, self._done = threading.Lock(), threading.Lock(), threading.Lock()
        for lock in (self._go, self._taken, self._done):
            lock.acquire()
        self._slot: list = [None, None]  # [(function, args) or None to stop, the call's error]
        self.busy = False
        threading.Thread(target=_serve, args=(self._go, self._taken, self._done, self._slot),
                         name="bitmask-fill", daemon=True).start()
        weakref.finalize(self, _stop, self._go, self._slot)

    def start(self, function: Callable, args: tuple) -> None:
        """Run function(*args) in the worker; finish() waits for it."""
        if self.busy:
            raise RuntimeError("FillWorker.start: the call before is still to be finished")
        self._slot[0] = (function, args)
        self.busy = True
        self._go.release()
        try:
            self._taken.acquire()
        except BaseException:  # (an interrupt): the worker takes the call all the same
            self._taken.acquire()
            raise

    def finish(self) -> None:
        """Wait for the call start() began; its error, if any, raises here."""
        if not self.busy:
            return
        self._done.acquire()
        self.busy = False
        error, self._slot[1] = self._slot[1], None
        if error is not None:
            raise error


def _serve(go: threading.Lock, taken: threading.Lock, done: threading.Lock, slot: list) -> None:
    while True:
        go.acquire()
        call, slot[0] = slot[0], None
        taken.release()
        if call is None:
            return
        try:
            call[0](*call[1])
        except BaseException as error:  # noqa: BLE001 (raised in the caller's thread, at finish())
            slot[1] = error
        done.release()


def _accept_then_fill(slot: list, done: threading.Lock, accept_handles: list, tokens: list[int], fill: Callable,
                      fill_handles: list, bitmask: torch.Tensor, rows: list[int]) -> None:
    """The worker's call for start_fill(accept=...): xgrammar's accept, its answer handed over,
    then the fill. Between the two this thread needs the GIL: it goes on once the caller lets it
    go, at the latest when it waits in accepted() (the engine calls that right after appending
    the tokens), so the fill starts after the longer of the accept and the append."""
    try:
        slot[0] = batch_accept_token(accept_handles, tokens, False)
    except BaseException as error:  # noqa: BLE001 (raised by accepted(); no fill then)
        slot[0] = error
        return
    finally:
        done.release()
    if fill_handles:
        fill(fill_handles, bitmask, rows, False)


def _stop(go: threading.Lock, slot: list) -> None:
    slot[0] = None
    go.release()


class DeviceMask:
    """The masking of one step's uploaded rows on CUDA: xgrammar's Triton kernel (what
    xgr.apply_token_bitmask_inplace runs on CUDA) over the bitmask's device buffers, launched with
    its settings worked out once (its wrapper asks for the device's properties twice and checks the
    arguments on every call, ~0.1 ms of host time a step on the H100). It reads nothing from the
    host: `graph_key` (with the logits' own address, shape and stride) fixes what it launches."""

    __slots__ = ("bitmask", "count", "graph_key")

    def __init__(self, bitmask: BatchBitmask, count: int) -> None:
        self.bitmask, self.count = bitmask, count
        self.graph_key = ("bitmask", bitmask._mask_device.data_ptr(), bitmask._rows_device.data_ptr(), count)

    def __call__(self, logits: torch.Tensor) -> None:
        bm = self.bitmask
        block = 4096  # xgrammar's block: num_warps = block / 32 lanes / (16 / bytes per logit)
        apply_kernel()[(bm._sms,)](
            logits, bm._mask_device, bm._rows_device, self.count, bm.vocab_size, logits.stride(0),
            bm._mask_device.stride(0), bm._sms, block,
            num_warps=block // 32 // (16 // logits.element_size()), num_stages=3)


def _apply_on_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
    width = min(32 * bitmask.shape[1], vocab_size)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows, vocab_size=width)
    if width < vocab_size:
        logits[rows, width:] = float("-inf")  # padding ids


@functools.cache
def apply_kernel():
    """xgrammar's Triton apply kernel, jitted again with its row count not specialized: as xgrammar
    jits it, a count that is a multiple of 16 is a kernel of its own, compiled (~0.25 s, the engine
    loop held) the first time a constrained batch reaches such a count."""
    import triton
    from xgrammar.kernels.apply_token_bitmask_inplace_triton import (
        apply_token_bitmask_inplace_kernel,
    )

    return triton.jit(apply_token_bitmask_inplace_kernel.fn, do_not_specialize=["num_rows"])


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size]: True where the packed int32 bitmask [rows, words] allows the token.

    Ids past the bitmask's words (a model's padding ids) are not allowed.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool()  # [rows, words, 32]
    allowed = bits.flatten(-2)[..., :vocab_size]
    return torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[-1]))


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor,
                            indices: Sequence[int] | None = None) -> None:
    """Plain-torch apply_token_bitmask_inplace: the reference the tests hold xgrammar's and
    BatchBitmask's to. Ids past the bitmask's words are masked too."""
    rows = torch.arange(logits.shape[0]) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
    rows = rows.to(logits.device)
    allowed = unpack_bitmask(bitmask.to(logits.device)[rows], logits.shape[-1])  # [len(rows), vocab]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
