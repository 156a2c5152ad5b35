"""The batched sampler: one pass over the logits of all sampling rows of a step.

Greedy rows take the argmax; the others apply temperature, top-k, top-p and min-p and draw with
the exponential-race (Gumbel-max) trick, which needs no sort and no host sync. Issue 4 adds
penalties, logit bias, seeded counter-based draws and logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per step by the runner."""

    temperature: torch.Tensor  # [rows] float32, 0 for greedy rows
    top_k: torch.Tensor  # [rows] int64, vocab size where off
    top_p: torch.Tensor  # [rows] float32
    min_p: torch.Tensor  # [rows] float32
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], vocab_size: int, device: torch.device) -> SamplingBatch:
        temps = [0.0 if p.greedy else p.temperature for p in params]
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32).to(device, non_blocking=True),
            top_k=torch.tensor(top_k, dtype=torch.int64).to(device, non_blocking=True),
            top_p=torch.tensor(top_p, dtype=torch.float32).to(device, non_blocking=True),
            min_p=torch.tensor(min_p, dtype=torch.float32).to(device, non_blocking=True),
            all_greedy=all(t == 0.0 for t in temps),
            any_top_k=any(k < vocab_size for k in top_k),
            any_top_p=any(p < 1.0 for p in top_p),
            any_min_p=any(p > 0.0 for p in min_p),
        )


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """float32 logits [rows, vocab] -> sampled ids [rows] int64."""
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy
        temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
        logits = logits / temperature[:, None]
        if batch.any_top_k or batch.any_top_p:
            logits = apply_top_k_top_p(logits, batch.top_k if batch.any_top_k else None,
                                       batch.top_p if batch.any_top_p else None)
        probs = torch.softmax(logits, dim=-1)
        if batch.any_min_p:
            threshold = probs.max(dim=-1, keepdim=True).values * batch.min_p[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p without a sort or sync.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(batch.temperature > 0, sampled, greedy)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) the logits outside each row's top-k and top-p nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        # Keep the last top_k entries of the ascending sort.
        kth = sorted_logits.gather(1, (vocab - top_k.clamp(1, vocab))[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        drop = cumulative <= (1 - top_p[:, None])
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
