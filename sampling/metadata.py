"""SamplingMetadata: the sampling parameters of one step's rows as device tensors.

Built once per step from plain per-row data (no engine types: sampling/ sits below aio_engine/).
Per-row numbers come packed from each SamplingParams (computed once per request), are laid out
in one host buffer (pinned on CUDA) and reach the device in one non-blocking copy. Features
nobody in the batch uses stay None and cost nothing: an all-greedy batch without logprobs, bias
or penalties uploads nothing at all. TokenHistories keeps the token ids that penalties need on
the device between steps, so a step uploads only the tokens appended since the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, is_, itemgetter

import numpy as np
import torch

from .params import (
    ALLOWED,
    BIAS,
    LOGPROBS,
    MIN_P,
    PENALTIES,
    RANDOM,
    SAMPLER_COLUMNS,
    TOP_K,
    TOP_P,
    SamplingParams,
)

_MASK63 = (1 << 63) - 1
_COL = {name: i for i, name in enumerate(SAMPLER_COLUMNS)}
TOP_P_WINDOW = 256  # candidates of a top-p row without top-k; wider nuclei take the exact search
MAX_WINDOW_TOP_K = 1024  # a larger top-k takes the exact search instead of widening everyone's window
_banned_ids = attrgetter("banned_ids")
_params, _seed, _step = attrgetter("params"), attrgetter("seed"), attrgetter("step")
_token_ids = attrgetter("token_ids")
_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
          np.dtype(np.bool_): torch.bool}


def row_key(seed: int, step: int) -> int:
    """A 63-bit key for (seed, step): splitmix64 of the pair, so nearby seeds and steps decorrelate."""
    return int(row_keys(np.array([seed], dtype=np.uint64), np.array([step], dtype=np.uint64))[0])


def row_keys(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """row_key over uint64 arrays."""
    return keys_of(seed_terms(seeds), steps)


_U = np.uint64
_SEED, _STEP, _MIX = _U(0x9E3779B97F4A7C15), _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)


def seed_terms(seeds: np.ndarray) -> np.ndarray:
    """The seeds' part of their keys, computed once for a batch that steps on (keys_of)."""
    return seeds * _SEED + _MIX


def keys_of(terms: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """splitmix64 of each (seed, step), from seed_terms: uint64 arithmetic wraps modulo 2**64, as
    splitmix64 wants; in place on one array (this runs for every row every step)."""
    z = steps * _STEP
    z += terms
    z ^= z >> _U(30)
    z *= _STEP
    z ^= z >> _U(27)
    z *= _MIX
    z ^= z >> _U(31)
    z &= _U(_MASK63)
    return z.view(np.int64)


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row (one request's next token)."""

    params: SamplingParams
    seed: int
    step: int  # tokens this request has generated so far: the counter of its random stream
    output_ids: Sequence[int] = ()
    prompt_ids: Sequence[int] = ()
    banned_ids: Sequence[int] = ()  # this step only: eos before min_tokens, bad-word endings, ...
    # The prompt then the output in one list that only ever grows (the runner passes the request's
    # own list). Given, it replaces prompt_ids / output_ids and stays on the device between steps.
    token_ids: Sequence[int] | None = None
    num_prompt_tokens: int = 0


@dataclass
class Penalties:
    """The penalized rows and their token ids (see kernels.sampling.apply_penalties)."""

    ids: torch.Tensor  # [slots, capacity] int32 token ids (TokenHistories)
    ranges: torch.Tensor  # [5, P] int32: logits row, slot, begin, split, end
    factors: torch.Tensor  # [3, P] float32: repetition, frequency, presence
    width: int  # the longest end - begin
    new_ids: torch.Tensor | None = None  # [P] int32: each row's newest token, for the kernel to write at end - 1


@dataclass
class SamplingMetadata:
    num_rows: int
    all_greedy: bool
    inv_temp: torch.Tensor | None = None  # [rows] float32 1/T, 0 for greedy rows; None when all are greedy
    keys: torch.Tensor | None = None  # [rows] int64 random-stream keys; None when all are greedy
    plain_rows: torch.Tensor | None = None  # rows drawn over the whole vocabulary (greedy, or no top-k / top-p)
    num_plain: int = 0
    candidate_rows: torch.Tensor | None = None  # random rows with top-k or top-p: drawn among candidates
    num_candidates: int = 0
    candidate_k: int = 0  # candidates per row: the largest top-k, or TOP_P_WINDOW for top-p alone
    top_p_alone: bool = False  # some candidate row has top-p without top-k (its window needs the row's mass)
    top_k: torch.Tensor | None = None  # [rows] int32, vocab where off
    top_p: torch.Tensor | None = None  # [rows] float32, 1 where off
    floor_offset: torch.Tensor | None = None  # [rows] float32 T*log(min_p): keep logits >= row max + this
    penalties: Penalties | None = None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # flat indices (row * vocab + id), values
    banned: torch.Tensor | None = None  # flat indices
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None  # flat indices, rows-with-a-list mask
    num_logprobs: int = -1  # the most any row asks for; -1: nobody
    logprobs_mode: str = "raw_logprobs"
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device,
              logprobs_mode: str = "raw_logprobs", histories: TokenHistories | None = None,
              arena: UploadArena | None = None) -> SamplingMetadata:
        """`histories` (the Sampler's) keeps penalized rows' token ids on the device across steps;
        `arena` (MetadataCache's) is where the tensors go (a buffer of their own by default)."""
        n, vocab = len(rows), vocab_size
        packed = b"".join([r.params.sampler_row for r in rows])
        table = np.frombuffer(packed, dtype=np.float32).reshape(n, len(SAMPLER_COLUMNS) + 1)
        flags = np.frombuffer(packed, dtype=np.int32).reshape(table.shape)[:, -1]
        used = int(np.bitwise_or.reduce(flags)) if n else 0  # the features anyone in the batch uses
        col = {name: table[:, i] for name, i in _COL.items()}
        md = cls(num_rows=n, all_greedy=not used & RANDOM, logprobs_mode=logprobs_mode)
        up: dict[str, np.ndarray] = {}  # name -> host array, all sent in one copy
        if used & RANDOM:
            up["inv_temp"] = col["inv_temp"]
            up["keys"] = row_keys(np.fromiter([r.seed for r in rows], dtype=np.uint64, count=n),
                                  np.fromiter([r.step for r in rows], dtype=np.uint64, count=n))
            _stage_filters(md, up, col, flags, used, vocab)
        if used & PENALTIES:
            penalized = np.flatnonzero(flags & PENALTIES)
            histories = histories if histories is not None else TokenHistories()
            width = histories.stage(up, rows, penalized, col, torch.device(device))
        _stage_token_lists(up, rows, flags, used, vocab)
        if used & LOGPROBS:
            wanted = col["logprobs"]
            md.num_logprobs = vocab if (wanted == -1).any() else int(wanted.max())
        t = (arena or UploadArena()).send(up, torch.device(device))
        for name in ("inv_temp", "keys", "plain_rows", "candidate_rows", "top_k", "top_p", "floor_offset", "banned"):
            setattr(md, name, t.get(name))
        if "bias_ids" in t:
            md.bias = (t["bias_ids"], t["bias_values"])
        if "allowed_ids" in t:
            md.allowed = (t["allowed_ids"], t["allowed_rows"])
        if used & PENALTIES:
            md.penalties = histories.commit(t, width)
        return md


def _stage_filters(md: SamplingMetadata, up: dict, col: dict, flags: np.ndarray, used: int, vocab: int) -> None:
    if used & (TOP_K | TOP_P):
        top_k = col["top_k"]
        k_on = ((flags & TOP_K) > 0) & (top_k < vocab)
        p_on = (flags & TOP_P) > 0
        candidate = k_on | p_on
        md.num_candidates = int(candidate.sum())
    md.num_plain = md.num_rows - md.num_candidates
    if md.num_candidates:
        up["candidate_rows"] = np.flatnonzero(candidate)
        up["top_k"] = np.where(k_on, top_k, vocab).astype(np.int32)
        window_k = top_k[k_on & (top_k <= MAX_WINDOW_TOP_K)]
        md.top_p_alone = bool((p_on & ~k_on).any())
        md.candidate_k = max(int(window_k.max()) if len(window_k) else 1, TOP_P_WINDOW if md.top_p_alone else 1)
        md.candidate_k = min(md.candidate_k, vocab)
        if p_on.any():
            up["top_p"] = np.where(p_on, col["top_p"], 1.0).astype(np.float32)
        if md.num_plain:
            up["plain_rows"] = np.flatnonzero(~candidate)
    if used & MIN_P:
        up["floor_offset"] = col["floor_offset"]  # -inf where off (greedy rows too)


def _stage_token_lists(up: dict, rows, flags: np.ndarray, used: int, vocab: int) -> None:
    """logit_bias, banned and allowed ids as flat indices (row * vocab + id) into the logits."""
    def flat(row_of, ids) -> np.ndarray:
        ids = [np.asarray(i, dtype=np.int64) for i in ids]
        return np.repeat(np.asarray(row_of, dtype=np.int64) * vocab, [len(i) for i in ids]) + np.concatenate(ids)

    if used & BIAS:
        biased = np.flatnonzero(flags & BIAS)
        ids, values = zip(*[rows[i].params.bias_arrays for i in biased])
        up["bias_ids"], up["bias_values"] = flat(biased, ids), np.concatenate(values)
    banned = list(compress(range(len(rows)), map(_banned_ids, rows)))
    if banned:
        up["banned"] = flat(banned, [rows[i].banned_ids for i in banned])
    if used & ALLOWED:
        listed = np.flatnonzero(flags & ALLOWED)
        up["allowed_ids"] = flat(listed, [rows[i].params.allowed_array for i in listed])
        up["allowed_rows"] = (flags & ALLOWED) > 0


class UploadArena:
    """A device buffer that builds upload into, kept from one build to the next: arrays laid out
    as the last build's (the same names, dtypes and shapes) land at the same device addresses, as
    the same tensors, so a CUDA graph captured over them replays on the next step's (see
    Sampler). One step's arrays are packed into one host buffer (pinned on CUDA, from torch's
    caching host allocator, which keeps a block until the copies reading it are done, so the host
    may run steps ahead) and reach the device in one non-blocking copy, on the current stream:
    the build's readers, queued after it on that stream, see it; the ones queued before it (the
    last step's sampler) have read the last build's."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None  # uint8 on the device
        self.device: torch.device | None = None  # as the builds name it ("cuda" and "cuda:0" differ)
        self.layout: tuple = ()
        self.offsets: list[int] = []
        self.size = 0
        self.views: dict[str, torch.Tensor] = {}

    def send(self, up: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        """`up`'s arrays on the device, as views into the arena (valid until the next send)."""
        if not up:
            return {}
        layout = tuple((name, a.dtype, a.shape) for name, a in up.items())
        if layout != self.layout or device != self.device:
            self._plan(layout, device)
        self._write(0, self.size, self.offsets, up.values(), device)
        return self.views

    def rewrite(self, name: str, a: np.ndarray, device: torch.device) -> torch.Tensor:
        """Write one array of the last send() again, in its place (same dtype and shape), queued
        on the current stream as send() is; its view."""
        offset = self.offsets[[n for n, _, _ in self.layout].index(name)]
        self._write(offset, offset + a.nbytes, [0], [a], device)
        return self.views[name]

    def _write(self, start: int, end: int, offsets: list[int], arrays, device: torch.device) -> None:
        """Pack `arrays` at `offsets` (from `start`) into buf[start:end]: on CUDA through pinned
        memory and one non-blocking copy on the current stream."""
        if device.type == "cuda":
            host = torch.empty(end - start, dtype=torch.uint8, pin_memory=True)
            _pack(host.numpy(), offsets, arrays)
            self.buf[start:end].copy_(host, non_blocking=True)
        else:
            _pack(self.buf.numpy()[start:end], offsets, arrays)

    def _plan(self, layout: tuple, device: torch.device) -> None:
        self.offsets, size = [], 0
        nbytes = [int(np.prod(shape)) * dtype.itemsize for _, dtype, shape in layout]
        for n in nbytes:
            self.offsets.append(size)
            # 16-byte aligned: every dtype's view, and Triton, which compiles a kernel of its own
            # for a pointer that is not (a batch of another size would compile anew).
            size += -(-n // 16) * 16
        if device != self.device or self.buf.numel() < size:
            grown = 2 * self.buf.numel() if device == self.device else 0
            self.buf = torch.empty(max(size, grown, 64), dtype=torch.uint8, device=device)
        self.layout, self.size, self.device = layout, size, device
        self.views = {name: self.buf[offset:offset + n].view(_TORCH[dtype]).view(shape)
                      for (name, dtype, shape), offset, n in zip(layout, self.offsets, nbytes)}


def _pack(buf: np.ndarray, offsets: list[int], arrays) -> None:
    for offset, a in zip(offsets, arrays):
        buf[offset:offset + a.nbytes].view(a.dtype)[:] = a.reshape(-1)


class MetadataCache:
    """The last build's metadata, reused when the next step samples the same rows again.

    A decode step usually samples the requests of the step before, in the same order: then
    everything but the random keys (seed, step) is what it was, and the step uploads only the
    new keys (nothing for an all-greedy batch) and, for penalized rows, the one token each
    request appended since (TokenHistories.advance). "The same rows" means the same
    SamplingParams objects and seeds in the same order; a step with banned ids, or whose
    penalized rows did not each grow by exactly one token, takes a full build; a step with
    banned ids is not kept.

    Full builds upload into one UploadArena. A reuse without penalties rewrites the new keys in
    place there (stream-ordered after the last step's readers): it is laid out as the full build
    before it, so the sampler's graph of that layout serves both, and a batch that comes back
    (the same rows after a change) replays from its first step. A reuse with penalties uploads
    into another arena (its history tensors are its own), so that such steps too see their
    metadata at the same device addresses (a sampler graph replays on them).
    """

    def __init__(self) -> None:
        self.full, self.step = UploadArena(), UploadArena()
        self.md: SamplingMetadata | None = None
        self.params: list[SamplingParams] = []
        self.seeds: list[int] = []
        self.seed_terms = np.zeros(0, dtype=np.uint64)  # seed_terms of the kept rows' seeds
        self.context: tuple = ()
        self.histories: TokenHistories | None = None
        self.hits = 0

    def build(self, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device,
              logprobs_mode: str = "raw_logprobs", histories: TokenHistories | None = None) -> SamplingMetadata:
        params, seeds = list(map(_params, rows)), list(map(_seed, rows))
        context = (vocab_size, str(device), logprobs_mode)
        last = self.md
        # The same params objects (not equal ones: a user's extra_args may hold what == cannot compare).
        if (last is not None and context == self.context and len(params) == len(self.params)
                and all(map(is_, params, self.params)) and seeds == self.seeds and not any(map(_banned_ids, rows))):
            up: dict[str, np.ndarray] = {}
            width = 0
            if last.penalties is None or (histories is not None and histories is self.histories
                                          and (width := histories.advance(up, rows)) is not None):
                self.hits += 1
                md = copy(last)
                if not md.all_greedy:
                    steps = np.fromiter(map(_step, rows), dtype=np.uint64, count=len(rows))
                    up["keys"] = keys_of(self.seed_terms, steps)
                if last.penalties is None:
                    # Only the keys change: written where the full build put its own, so that the
                    # step is laid out as that one (one sampler graph for both, see the class doc).
                    if "keys" in up:
                        md.keys = self.full.rewrite("keys", up["keys"], torch.device(device))
                    return md
                t = self.step.send(up, torch.device(device))
                md.keys = t.get("keys")
                md.penalties = histories.commit(t, width)
                return md
        md = SamplingMetadata.build(rows, vocab_size, device, logprobs_mode, histories, self.full)
        if md.banned is None:
            self.md, self.params, self.seeds, self.context = md, params, seeds, context
            self.seed_terms = seed_terms(np.array(seeds, dtype=np.uint64))
            self.histories = histories
        else:
            self.md = None
        return md


@dataclass
class _LastBuild:
    """TokenHistories' last build, as advance() repeats it."""

    build: int
    lists: list  # each penalized row's token list
    slots: np.ndarray  # int64 (ranges[1], widened for slot * capacity)
    ranges: np.ndarray  # [5, P] int32, as uploaded: logits row, slot, begin, split, end
    factors: np.ndarray  # [3, P] float32
    longest: int  # the largest end
    width: int  # the largest end - begin


class TokenHistories:
    """Token ids of the penalized rows on the device, kept from one build to the next.

    A row that gives its request's token list (SamplingRow.token_ids, appended to in place) keeps
    a slot while it is sampled: each build uploads only what was appended since the last. The
    slot is found by the list's identity (the list is held, so its id stays unique) and freed by
    the first build that does not use it. Rows with separate prompt / output lists are uploaded
    whole, into a slot of their own for one build."""

    def __init__(self) -> None:
        self.slot_of: dict[int, int] = {}  # id(token list) -> slot
        self.owner: list = []  # slot -> its token list, or None
        self.size = np.zeros(0, dtype=np.int64)  # slot -> tokens on the device
        self.prompt = np.zeros(0, dtype=np.int64)  # slot -> prompt tokens among them
        self.stamp = np.zeros(0, dtype=np.int64)  # slot -> the last build that used it (0: free)
        self.free: list[int] = []
        self.builds = 0
        self.ids: torch.Tensor | None = None  # [slots, capacity] int32
        self.last: _LastBuild | None = None  # what advance() needs to repeat the last build

    def _take(self, tokens) -> int:
        if not self.free:
            grown = max(8, 2 * len(self.owner))
            self.free = list(range(grown - 1, len(self.owner) - 1, -1))
            self.owner += [None] * (grown - len(self.owner))
            self.size = np.resize(self.size, grown)
            self.prompt = np.resize(self.prompt, grown)
            self.stamp = np.concatenate([self.stamp, np.zeros(grown - len(self.stamp), dtype=np.int64)])
        slot = self.free.pop()
        self.owner[slot], self.size[slot], self.stamp[slot] = tokens, 0, self.builds
        if tokens is not None:
            self.slot_of[id(tokens)] = slot
        return slot

    def stage(self, up: dict, rows, penalized: np.ndarray, col: dict, device: torch.device) -> int:
        """Stage the penalized rows' new tokens and ranges into `up`; returns the widest range."""
        if self.ids is not None and (self.ids.device.type != device.type
                                     or device.index not in (None, self.ids.device.index)):
            self.__init__()  # another device: start over
        self.builds += 1
        picked = rows if len(penalized) == len(rows) else [rows[i] for i in penalized.tolist()]
        lists = [r.token_ids for r in picked]
        num = len(picked)
        # C-level passes over the rows where possible: this runs for every penalized row every step.
        slots = np.fromiter(map(self.slot_of.get, map(id, lists), repeat(-1)), dtype=np.int64, count=num)
        for j in np.flatnonzero(slots < 0).tolist():  # lists new to this build, and separate lists
            t, r = lists[j], picked[j]
            if t is None:
                lists[j] = [*r.prompt_ids, *r.output_ids]
                slots[j], num_prompt = self._take(None), len(r.prompt_ids)
            else:
                slots[j] = self.slot_of[id(t)] if id(t) in self.slot_of else self._take(t)
                num_prompt = r.num_prompt_tokens
            self.prompt[slots[j]] = num_prompt
        ends = np.fromiter(map(len, lists), dtype=np.int64, count=num)
        old = self.size[slots]
        old[ends < old] = 0  # not the list it was: upload it again
        self.size[slots] = ends
        self.stamp[slots] = self.builds
        for slot in np.flatnonzero((self.stamp > 0) & (self.stamp < self.builds)).tolist():  # unused: free
            if self.owner[slot] is not None:
                del self.slot_of[id(self.owner[slot])]
            self.owner[slot], self.stamp[slot] = None, 0
            self.free.append(slot)
        self._reserve(len(self.owner), int(ends.max()), device)
        grew = np.flatnonzero(ends > old)
        if len(grew):
            start, lengths = old[grew], ends[grew] - old[grew]
            total = int(lengths.sum())
            first = slots[grew] * self.ids.shape[1] + start
            up["history_at"] = np.repeat(first - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
            if total == len(grew) == num:  # the usual step: one new token per row
                new = map(itemgetter(-1), lists)
            else:
                new = [t for j, a in zip(grew.tolist(), start.tolist()) for t in lists[j][a:]]
            up["history_ids"] = np.fromiter(new, dtype=np.int32, count=total)
        factors = np.stack([col["repetition"], col["frequency"], col["presence"]])[:, penalized]
        num_prompt = self.prompt[slots]
        begin = np.where(factors[0] != 1, 0, num_prompt)
        ranges = np.stack([penalized, slots, begin, num_prompt, ends]).astype(np.int32)
        up["penalty_ranges"], up["penalty_factors"] = ranges, factors
        width = int((ends - begin).max())
        self.last = _LastBuild(self.builds, lists, slots, ranges, factors, int(ends.max()), width)
        return width

    def advance(self, up: dict, rows) -> int | None:
        """The last build again, each penalized row's list one token longer (a decode step that
        samples the rows of the step before): stage that token and the ranges into `up` and return
        the widest range; None (nothing staged) where that is not what happened. The token reaches
        the device history when the penalty kernel runs on the metadata (Penalties.new_ids): a
        reuse build must be sampled, as the runner always does, or that slot keeps a stale id."""
        last = self.last
        if last is None or last.build != self.builds:
            return None
        ranges = last.ranges
        picked = rows if ranges.shape[1] == len(rows) else [rows[i] for i in ranges[0].tolist()]
        lists = list(map(_token_ids, picked))
        if not all(map(is_, lists, last.lists)) or last.longest >= self.ids.shape[1]:
            return None
        ends = np.fromiter(map(len, lists), dtype=np.int32, count=len(lists))
        if not (ends == ranges[4] + 1).all():
            return None
        self.builds += 1
        last.build = self.builds
        self.size[last.slots] = ends  # (no stamp: the next full build stamps what it uses, frees the rest)
        ranges[4] = ends  # (the last upload copied it into a buffer of its own)
        last.longest += 1
        last.width += 1
        # The kernel writes each row's new token into the history on the device (Penalties.new_ids).
        up["penalty_new"] = np.fromiter(map(itemgetter(-1), lists), dtype=np.int32, count=len(lists))
        up["penalty_ranges"], up["penalty_factors"] = ranges, last.factors
        return last.width

    def _reserve(self, num_slots: int, longest: int, device: torch.device) -> None:
        ids = self.ids
        if ids is not None and ids.shape[0] >= num_slots and ids.shape[1] >= longest:
            return
        shape = (max(num_slots, 2 * ids.shape[0] if ids is not None else 8),
                 max(longest, 2 * ids.shape[1] if ids is not None else 256))
        self.ids = torch.zeros(shape, dtype=torch.int32, device=device)
        if ids is not None:
            self.ids[:ids.shape[0], :ids.shape[1]] = ids

    def commit(self, t: dict[str, torch.Tensor], width: int) -> Penalties:
        """After the upload: write a full build's new tokens, and describe the ranges."""
        if "history_at" in t:
            self.ids.view(-1).index_copy_(0, t["history_at"], t["history_ids"])
        return Penalties(self.ids, t["penalty_ranges"], t["penalty_factors"], width, t.get("penalty_new"))
