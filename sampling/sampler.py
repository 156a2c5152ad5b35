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
    def __init__(self) -> None:
        # Penalized rows' token ids stay on the device between steps; pass this to
        # SamplingMetadata.build so that each step uploads only the new tokens.
        self.histories = TokenHistories()

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata,
                 constrain: Callable[[torch.Tensor], None] | None = None) -> SamplerOutput:
        """float32 logits [rows, vocab] (modified in place) -> SamplerOutput. `constrain` masks
        the logits in place first (the grammars' token bitmask), after raw logprobs are read."""
        raw = None
        if md.num_logprobs >= 0 and md.logprobs_mode.startswith("raw"):
            raw = _as_mode(logits, md.logprobs_mode)
        if constrain is not None:
            constrain(logits)
        apply_logits_processors(logits, md)
        apply_penalties(logits, md)
        processed_mode = md.num_logprobs >= 0 and raw is None
        processed = None
        if md.all_greedy:
            tokens = gumbel_argmax(logits, None, None, None)
            if processed_mode:
                processed = _as_mode(logits, md.logprobs_mode)
        else:
            tokens, cut, cut_id = _draw(logits, md, with_cut_id=processed_mode)
            if processed_mode:
                processed = _as_mode(_processed_logits(logits, md, cut, cut_id), md.logprobs_mode)
        out = SamplerOutput(tokens)
        if md.num_logprobs >= 0:
            _gather_logprobs(out, raw if raw is not None else processed, md.num_logprobs)
        return out


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
        _apply_penalties(logits, p.ids, p.ranges, p.factors, p.width)


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
