"""The batched sampler: one pass over a step's logits for every sampling row.

Order, as vLLM applies it: allowed-token lists, banned tokens (min_tokens, bad words) and
logit_bias; then repetition / frequency / presence penalties; greedy rows take the argmax of
that. Random rows divide by their temperature, keep what min-p, top-k and top-p allow, and draw
by Gumbel-max with counter-based noise keyed by (seed, step, token id), so a seeded request's
tokens do not depend on the batch. No host sync here: the caller copies the ids out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.sampling import gumbel_argmax, gumbel_noise_reference

from .metadata import SamplingMetadata

NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [rows] int64
    # With logprobs: the sampled token then the top-N, their values, and the sampled token's rank.
    logprob_ids: torch.Tensor | None = None  # [rows, N + 1] int64
    logprob_values: torch.Tensor | None = None  # [rows, N + 1] float32
    sampled_rank: torch.Tensor | None = None  # [rows] int64, 1 = the most likely


class Sampler:
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
        greedy = logits.argmax(dim=-1)
        processed = None
        if md.all_greedy:
            tokens = greedy
            if md.num_logprobs >= 0 and raw is None:
                processed = _as_mode(logits, md.logprobs_mode)
        else:
            temperature = md.temperature
            inv_temp = torch.where(temperature > 0, 1.0 / temperature.clamp(min=1e-6), 1.0)
            floor = torch.full_like(inv_temp, NEG_INF)
            if md.min_p is not None:
                # z = logit / T stays if z >= max z + log(min_p), i.e. logit >= max + T log(min_p)
                log_min_p = torch.log(md.min_p.clamp(min=1e-30))
                floor = torch.where(md.min_p > 0, logits.max(dim=-1).values + log_min_p / inv_temp, floor)
            tokens = gumbel_argmax(logits, md.keys, inv_temp, floor)
            if md.candidate_rows is not None:
                rows = md.candidate_rows
                picked = _sample_candidates(logits[rows] * inv_temp[rows, None], md, rows, floor[rows] * inv_temp[rows])
                tokens.index_copy_(0, rows, picked)
            tokens = torch.where(temperature > 0, tokens, greedy)
            if md.num_logprobs >= 0 and raw is None:
                processed = _as_mode(_processed_logits(logits, md, inv_temp, floor), md.logprobs_mode)
        out = SamplerOutput(tokens)
        if md.num_logprobs >= 0:
            _gather_logprobs(out, raw if raw is not None else processed, md.num_logprobs)
        return out


def _as_mode(logits: torch.Tensor, mode: str) -> torch.Tensor:
    return logits.log_softmax(dim=-1) if mode.endswith("logprobs") else logits.clone()


def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> None:
    # Flat indices and index_* ops: `t[rows, ids] = scalar` would copy the scalar from the host.
    vocab = logits.shape[1]
    flat = logits.view(-1)
    if md.allowed is not None:
        rows, ids, has_list = md.allowed
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.view(-1).index_fill_(0, rows * vocab + ids, True)
        keep |= ~has_list[:, None]
        logits.masked_fill_(~keep, NEG_INF)
    if md.bias is not None:
        rows, ids, values = md.bias
        flat.index_add_(0, rows * vocab + ids, values)
    if md.banned is not None:
        rows, ids = md.banned
        flat.index_fill_(0, rows * vocab + ids, NEG_INF)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Repetition (prompt and output tokens, HF's formula), then OpenAI frequency and presence."""
    if md.output_ids is None:
        return
    rows, vocab = logits.shape
    counts = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, md.output_ids, torch.ones_like(md.output_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]  # the last column caught the padding
    seen = counts > 0
    if md.prompt_ids is not None:
        in_prompt = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
        in_prompt.scatter_(1, md.prompt_ids, True)
        rep_seen = seen | in_prompt[:, :vocab]
        rep = md.repetition[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(rep_seen, penalized, logits))
    logits -= md.frequency[:, None] * counts + md.presence[:, None] * seen


def _keep_candidates(vals: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Sorted (descending) scaled logits of candidate rows -> the same with dropped ones at -inf."""
    k = vals.shape[1]
    if md.top_k is not None:
        position = torch.arange(k, device=vals.device)[None, :]
        vals = vals.masked_fill(position >= md.top_k[rows, None], NEG_INF)
    vals = vals.masked_fill(vals < floor[:, None], NEG_INF)
    if md.top_p is not None:
        probs = vals.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        vals = vals.masked_fill(before >= md.top_p[rows, None], NEG_INF)  # the first always stays
    return vals


def _sample_candidates(scaled: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Top-k / top-p rows: draw among the sorted candidates, noise keyed by token id."""
    if md.candidate_k >= scaled.shape[1]:
        vals, ids = scaled.sort(dim=-1, descending=True)
    else:
        vals, ids = scaled.topk(md.candidate_k, dim=-1)
    vals = _keep_candidates(vals, md, rows, floor)
    choice = (vals + gumbel_noise_reference(md.keys[rows], ids)).argmax(dim=-1, keepdim=True)
    return ids.gather(1, choice).squeeze(1)


def _processed_logits(logits: torch.Tensor, md: SamplingMetadata, inv_temp: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """The distribution random rows actually draw from (greedy rows: penalized logits)."""
    scaled = logits * inv_temp[:, None]
    scaled = scaled.masked_fill(logits < floor[:, None], NEG_INF)
    if md.candidate_rows is not None:
        rows = md.candidate_rows
        vals, ids = scaled[rows].sort(dim=-1, descending=True)
        kept = _keep_candidates(vals, md, rows, floor[rows] * inv_temp[rows])
        scaled.index_copy_(0, rows, torch.full_like(vals, NEG_INF).scatter(1, ids, kept))
    return torch.where(md.temperature[:, None] > 0, scaled, logits)


def _gather_logprobs(out: SamplerOutput, values: torch.Tensor, n: int) -> None:
    sampled = values.gather(1, out.token_ids[:, None])  # [rows, 1]
    top_values, top_ids = values.topk(min(n, values.shape[1]), dim=-1) if n > 0 else (values[:, :0], out.token_ids[:, None][:, :0])
    out.logprob_ids = torch.cat([out.token_ids[:, None], top_ids], dim=1)
    out.logprob_values = torch.cat([sampled, top_values], dim=1)
    out.sampled_rank = (values > sampled).sum(dim=-1) + 1


