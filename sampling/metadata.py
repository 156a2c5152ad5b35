"""SamplingMetadata: the sampling parameters of one step's rows as device tensors.

Built once per step from plain per-row data (no engine types: sampling/ sits below aio_engine/).
Features nobody in the batch uses stay None, and the sampler skips their work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .params import SamplingParams

_MASK63 = (1 << 63) - 1


def row_key(seed: int, step: int) -> int:
    """A 63-bit key for (seed, step): splitmix64 of the pair, so nearby seeds and steps decorrelate."""
    return int(row_keys(np.array([seed], dtype=np.uint64), np.array([step], dtype=np.uint64))[0])


def row_keys(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """row_key over arrays (uint64 arithmetic wraps modulo 2**64, as splitmix64 wants)."""
    u = np.uint64
    with np.errstate(over="ignore"):
        z = seeds * u(0x9E3779B97F4A7C15) + steps * u(0xBF58476D1CE4E5B9) + u(0x94D049BB133111EB)
        z = (z ^ (z >> u(30))) * u(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u(27))) * u(0x94D049BB133111EB)
    return ((z ^ (z >> u(31))) & u(_MASK63)).astype(np.int64)


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row (one request's next token)."""

    params: SamplingParams
    seed: int
    step: int  # tokens this request has generated so far: the counter of its random stream
    output_ids: Sequence[int] = ()
    prompt_ids: Sequence[int] = ()
    banned_ids: Sequence[int] = ()  # this step only: eos before min_tokens, bad-word endings, ...


@dataclass
class SamplingMetadata:
    num_rows: int
    temperature: torch.Tensor  # [rows] float32, 0 for greedy rows
    keys: torch.Tensor  # [rows] int64 random-stream keys
    all_greedy: bool
    top_k: torch.Tensor | None = None  # [rows] int64, vocab where off
    top_p: torch.Tensor | None = None  # [rows] float32
    min_p: torch.Tensor | None = None  # [rows] float32
    candidate_rows: torch.Tensor | None = None  # rows that need top-k / top-p (sorted candidates)
    candidate_k: int = 0  # candidates per row: the largest top-k, or the vocabulary (top-p alone)
    presence: torch.Tensor | None = None  # [rows] float32
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    output_ids: torch.Tensor | None = None  # [rows, longest] int64, vocab where padding
    prompt_ids: torch.Tensor | None = None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, ids, values
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, ids
    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, ids, rows-with-a-list mask
    num_logprobs: int = -1  # the most any row asks for; -1: nobody
    logprobs_mode: str = "raw_logprobs"
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device,
              logprobs_mode: str = "raw_logprobs") -> SamplingMetadata:
        n = len(rows)
        params = [r.params for r in rows]

        def tensor(values, dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        temps = [0.0 if p.greedy else p.temperature for p in params]
        seeds = np.fromiter((r.seed for r in rows), dtype=np.uint64, count=n)
        steps = np.fromiter((r.step for r in rows), dtype=np.uint64, count=n)
        keys = torch.from_numpy(row_keys(seeds, steps)).to(device, non_blocking=True)
        md = cls(num_rows=n, temperature=tensor(temps, torch.float32), keys=keys,
                 all_greedy=all(t == 0.0 for t in temps), logprobs_mode=logprobs_mode)
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        if any(k < vocab_size for k, t in zip(top_ks, temps) if t > 0):
            md.top_k = tensor(top_ks, torch.int64)
        if any(p.top_p < 1.0 for p, t in zip(params, temps) if t > 0):
            md.top_p = tensor([p.top_p for p in params], torch.float32)
        if any(p.min_p > 0.0 for p, t in zip(params, temps) if t > 0):
            md.min_p = tensor([p.min_p for p in params], torch.float32)
        if md.top_k is not None or md.top_p is not None:
            cand = [i for i, (p, k, t) in enumerate(zip(params, top_ks, temps)) if t > 0 and (k < vocab_size or p.top_p < 1.0)]
            top_p_alone = any(params[i].top_p < 1.0 and top_ks[i] == vocab_size for i in cand)
            md.candidate_rows = tensor(cand, torch.int64)
            md.candidate_k = vocab_size if top_p_alone else max(top_ks[i] for i in cand)
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
            md.presence = tensor([p.presence_penalty for p in params], torch.float32)
            md.frequency = tensor([p.frequency_penalty for p in params], torch.float32)
            md.repetition = tensor([p.repetition_penalty for p in params], torch.float32)
            md.output_ids = _padded([r.output_ids for r in rows], vocab_size, device)
            if any(p.repetition_penalty != 1.0 for p in params):
                md.prompt_ids = _padded([r.prompt_ids if r.params.repetition_penalty != 1.0 else () for r in rows],
                                        vocab_size, device)
        bias = [(i, t, b) for i, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()]
        if bias:
            r_, t_, b_ = zip(*bias)
            md.bias = (tensor(r_, torch.int64), tensor(t_, torch.int64), tensor(b_, torch.float32))
        banned = [(i, t) for i, r in enumerate(rows) for t in r.banned_ids]
        if banned:
            r_, t_ = zip(*banned)
            md.banned = (tensor(r_, torch.int64), tensor(t_, torch.int64))
        allowed = [(i, t) for i, p in enumerate(params) if p.allowed_token_ids for t in p.allowed_token_ids]
        if allowed:
            r_, t_ = zip(*allowed)
            md.allowed = (tensor(r_, torch.int64), tensor(t_, torch.int64),
                          tensor([bool(p.allowed_token_ids) for p in params], torch.bool))
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            md.num_logprobs = vocab_size if -1 in wanted else max(wanted)
        return md


def _padded(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max((len(s) for s in seqs), default=1))
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out).to(device, non_blocking=True)

