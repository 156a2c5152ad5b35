"""The batched sampler: one pass over a step's logits for every sampling row.

Order, as vLLM applies it: allowed-token lists, banned tokens (min_tokens, bad words) and
logit_bias; then repetition / frequency / presence penalties; greedy rows take the argmax of
that. Random rows divide by their temperature, keep what min-p, top-k and top-p allow, and draw
by Gumbel-max with counter-based noise keyed by (seed, step, token id), so a seeded request's
tokens do not depend on the batch. Rows without top-k / top-p (greedy ones too) are drawn in one
pass over the logits; top-k / top-p rows draw among their exact top-N candidates, and the rows
those cannot settle take an exact search (kernels/sampling_topk.py). No host sync here: the
caller copies the ids out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.sampling import apply_penalties as _apply_penalties
from kernels.sampling import gumbel_argmax
from kernels.sampling_topk import draw_candidates, draw_unsettled, top_candidates

from .metadata import SamplingMetadata, TokenHistories

NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [rows] int64
    # With logprobs: the sampled token then the top-N, their values, and the sampled token's rank.
    logprob_ids: torch.Tensor | None = None  # [rows, N + 1] int64
    logprob_values: torch.Tensor | None = None  # [rows, N + 1] float32
    sampled_rank: torch.Tensor | None = None  # [rows] int64, 1 = the most likely


class Sampler:
    """The sampler of a runner. With `cuda_graphs`, a step without logprobs whose logits and
    metadata sit where the step before's did (a decode batch replaying a FULL graph, its metadata
    from a MetadataCache, which keeps addresses from step to step) replays a CUDA graph of the
    sampling: one launch instead of a dozen kernels and their host time (see SamplerGraphs)."""

    def __init__(self, cuda_graphs: bool = False, max_graphs: int = 64) -> None:
        # Penalized rows' token ids stay on the device between steps; pass this to
        # SamplingMetadata.build so that each step uploads only the new tokens.
        self.histories = TokenHistories()
        self.graphs = SamplerGraphs(max_graphs) if cuda_graphs else None

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata,
                 constrain: Callable[[torch.Tensor], None] | None = None) -> SamplerOutput:
        """float32 logits [rows, vocab] (modified in place) -> SamplerOutput. `constrain` masks
        the logits in place first (the grammars' token bitmask), after raw logprobs are read; one
        with a `graph_key` (its launch reads only the device buffers that key names, e.g.
        structured.bitmask.DeviceMask) goes into the sampler's CUDA graph with the rest."""
        raw = None
        if md.num_logprobs >= 0 and md.logprobs_mode.startswith("raw"):
            raw = _as_mode(logits, md.logprobs_mode)
        if md.num_logprobs < 0:
            if self.graphs is not None and logits.is_cuda:
                return SamplerOutput(self.graphs.run(logits, md, constrain))
            return SamplerOutput(_draw_tokens(logits, md, constrain))
        if constrain is not None:
            constrain(logits)
        tokens, cut, cut_id = _process_and_draw(logits, md, with_cut_id=raw is None)
        values = raw
        if raw is None:  # processed: the distribution drawn from (greedy rows: the penalized logits)
            values = _as_mode(logits if cut is None else _processed_logits(logits, md, cut, cut_id), md.logprobs_mode)
        out = SamplerOutput(tokens)
        _gather_logprobs(out, values, md.num_logprobs)
        return out


def _process_and_draw(logits: torch.Tensor, md: SamplingMetadata, with_cut_id: bool = False):
    """Logits processors and penalties in place, then the draw: (tokens, cut, cut_id) as _draw
    gives them (None, None for an all-greedy batch)."""
    apply_logits_processors(logits, md)
    apply_penalties(logits, md)
    if md.all_greedy:
        return gumbel_argmax(logits, None, None, None), None, None
    return _draw(logits, md, with_cut_id)


def _draw_tokens(logits: torch.Tensor, md: SamplingMetadata, constrain=None) -> torch.Tensor:
    """A step without logprobs, from the logits (masked first by `constrain`) to the token ids:
    what a graph holds."""
    if constrain is not None:
        constrain(logits)
    return _process_and_draw(logits, md)[0]


class SamplerGraphs:
    """CUDA graphs of _draw_tokens, each for one layout of a step: the addresses, shapes and
    strides of the logits and of every metadata tensor, the metadata's host numbers (the
    penalty width by bucket), and the grammars' masking when it can be captured (its
    graph_key). A graph reads its inputs where they were at capture, so a step whose
    tensors all sit at those addresses replays it with whatever they hold now, the first step
    of a batch that comes back among them. A new layout is captured the third step in a row it
    comes (a steady decode batch: a full metadata build and two reuses, laid out alike), after
    eager runs have compiled the kernels, so that a batch that lasts two steps (common while
    requests come and go) costs no capture; at most `max_graphs` are kept (the least recently
    used goes), in one memory pool whose scratch they share. The graph's token ids are copied out at each replay, so no step's result is
    overwritten by a later replay."""

    CAPTURE_AT = 3  # a new layout is captured the third step in a row it comes

    def __init__(self, max_graphs: int) -> None:
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = OrderedDict()  # -> its token ids
        self.last_key: tuple | None = None
        self.streak = 0  # steps in a row laid out as last_key
        self.pool = None
        self.captures = self.replays = 0

    def run(self, logits: torch.Tensor, md: SamplingMetadata, constrain=None) -> torch.Tensor:
        """_draw_tokens(logits, md, constrain), replayed from a graph where one fits; a
        `constrain` without a graph_key runs before it, eagerly."""
        masked_in_graph = getattr(constrain, "graph_key", None)
        if constrain is not None and masked_in_graph is None:
            constrain(logits)
            constrain = None
        key = _layout(logits, md) + (masked_in_graph,)
        self.streak = self.streak + 1 if key == self.last_key else 1
        self.last_key = key
        entry = self.graphs.get(key)
        if entry is None:
            if self.streak < self.CAPTURE_AT:
                return _draw_tokens(logits, md, constrain)
            entry = self._capture(logits, md, key, constrain)
        else:
            self.graphs.move_to_end(key)
        graph, tokens = entry
        graph.replay()
        self.replays += 1
        return tokens.clone()

    def _capture(self, logits: torch.Tensor, md: SamplingMetadata, key: tuple, constrain=None):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        # Capture needs a stream of its own making; the default stream's work is ordered before.
        side = stream if stream != torch.cuda.default_stream(stream.device) else torch.cuda.Stream(stream.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                tokens = _draw_tokens(logits, md, constrain)
            finally:
                graph.capture_end()
        stream.wait_stream(side)
        self.graphs[key] = entry = (graph, tokens)
        self.captures += 1
        return entry


def _tensor_key(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), t.shape, t.stride())


def _layout(logits: torch.Tensor, md: SamplingMetadata) -> tuple:
    """Everything _draw_tokens reads from the host: the tensors' places, the metadata's numbers."""
    p = md.penalties
    tensors = (logits, md.inv_temp, md.keys, md.plain_rows, md.candidate_rows, md.top_k, md.top_p, md.floor_offset,
               md.banned, *(md.bias or (None, None)), *(md.allowed or (None, None)),
               *((p.ids, p.ranges, p.factors, p.new_ids) if p is not None else (None,) * 4))
    numbers = (md.all_greedy, md.num_plain, md.num_candidates, md.candidate_k, md.top_p_alone,
               None if p is None else _width_bucket(p.width))
    return numbers + tuple(map(_tensor_key, tensors))


def _width_bucket(width: int) -> int:
    """The penalty kernel's scratch width: a power of two (at least 256), so that histories
    growing by a token a step keep one layout for long."""
    return max(256, 1 << (width - 1).bit_length())


def _draw(logits: torch.Tensor, md: SamplingMetadata, with_cut_id: bool):
    """Tokens for a batch with random rows, and each row's kept set as a cut (see draw_candidates)."""
    n, vocab = logits.shape
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    floor = None
    if md.floor_offset is not None:  # min-p: logits below max + T*log(min_p) are out
        floor = logits.amax(dim=-1) + md.floor_offset
    if md.num_plain:
        rows = md.plain_rows if md.num_candidates else None
        gumbel_argmax(logits, md.keys, md.inv_temp, floor, rows, tokens)
    # Each row's kept set as a cut (for processed logprobs): plain rows keep what the floor keeps;
    # candidate rows get theirs from the draw.
    cut = cut_id = None
    if with_cut_id:
        cut = floor.clone() if floor is not None else torch.full((n,), NEG_INF, device=logits.device)
        cut_id = torch.full((n,), vocab, dtype=torch.int64, device=logits.device)
    if md.num_candidates:
        rows = md.candidate_rows if md.num_plain else None
        if cut is None:
            cut = torch.empty(n, device=logits.device)
        cand, exact, mass = top_candidates(logits, md.candidate_k, rows, md.inv_temp, floor, md.top_p_alone)
        ok = draw_candidates(cand, exact, rows, md.keys, md.inv_temp, floor, md.top_k, md.top_p, mass, vocab, tokens,
                             cut, cut_id)
        # The rows the window could not settle: an exact search for their edge, a whole-row draw.
        draw_unsettled(logits, rows, ok, md.keys, md.inv_temp, floor, md.top_k, md.top_p, tokens, cut)
    return tokens, cut, cut_id


def _as_mode(logits: torch.Tensor, mode: str) -> torch.Tensor:
    return logits.log_softmax(dim=-1) if mode.endswith("logprobs") else logits.clone()


def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> None:
    # Flat indices and index_* ops: `t[rows, ids] = scalar` would copy the scalar from the host.
    flat = logits.view(-1)
    if md.allowed is not None:
        ids, has_list = md.allowed
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.view(-1).index_fill_(0, ids, True)
        keep |= ~has_list[:, None]
        logits.masked_fill_(~keep, NEG_INF)
    if md.bias is not None:
        ids, values = md.bias
        flat.index_add_(0, ids, values)
    if md.banned is not None:
        flat.index_fill_(0, md.banned, NEG_INF)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Repetition (prompt and output tokens, HF's formula), then OpenAI frequency and presence."""
    p = md.penalties
    if p is not None:
        # On CUDA the kernel's scratch is as wide as the width's bucket: one layout for a sampler graph.
        _apply_penalties(logits, p.ids, p.ranges, p.factors, _width_bucket(p.width) if logits.is_cuda else p.width,
                         p.new_ids)


def _processed_logits(logits: torch.Tensor, md: SamplingMetadata, cut: torch.Tensor,
                      cut_id: torch.Tensor) -> torch.Tensor:
    """The distribution random rows actually draw from (greedy rows: penalized logits): a row keeps
    logits above its cut, and those equal to it at ids up to cut_id."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    keep = (logits > cut[:, None]) | ((logits == cut[:, None]) & (cols <= cut_id[:, None]))
    scaled = (logits * md.inv_temp[:, None]).masked_fill_(~keep, NEG_INF)
    return torch.where(md.inv_temp[:, None] > 0, scaled, logits)


def _gather_logprobs(out: SamplerOutput, values: torch.Tensor, n: int) -> None:
    sampled = values.gather(1, out.token_ids[:, None])  # [rows, 1]
    top_values, top_ids = values.topk(min(n, values.shape[1]), dim=-1) if n > 0 else (values[:, :0], out.token_ids[:, None][:, :0])
    out.logprob_ids = torch.cat([out.token_ids[:, None], top_ids], dim=1)
    out.logprob_values = torch.cat([sampled, top_values], dim=1)
    out.sampled_rank = (values > sampled).sum(dim=-1) + 1
