"""Slow, obvious references the sampler tests compare against: one row at a time in float64,
written from the formulas (OpenAI's penalties, HF's repetition penalty, vLLM's filter order),
and a chi-square test that needs no scipy."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from sampling.metadata import SamplingMetadata, SamplingRow
from sampling.params import SamplingParams
from sampling.sampler import Sampler, SamplerOutput

NEG_INF = float("-inf")


def row(params: SamplingParams, seed: int = 0, step: int = 0, output_ids: Sequence[int] = (),
        prompt_ids: Sequence[int] = (), banned_ids: Sequence[int] = ()) -> SamplingRow:
    return SamplingRow(params, seed, step, list(output_ids), list(prompt_ids), list(banned_ids))


def sample(logits: torch.Tensor, rows: list[SamplingRow], device: torch.device | str = "cpu",
           mode: str = "raw_logprobs") -> SamplerOutput:
    """One Sampler call on a copy of float32 logits [rows, vocab], with the metadata built for it."""
    device = torch.device(device)
    md = SamplingMetadata.build(rows, logits.shape[1], device, mode)
    return Sampler()(logits.to(device, torch.float32).clone(), md)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def penalized(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
              output_ids: Sequence[int]) -> torch.Tensor:
    """HF repetition penalty over prompt + output tokens (positive logits divided, negative
    multiplied), then OpenAI's logit -= frequency * count + presence * (count > 0) over output tokens."""
    out = logits.double().clone()
    rep = params.repetition_penalty
    for token in set(prompt_ids) | set(output_ids):
        out[token] = out[token] / rep if out[token] > 0 else out[token] * rep
    for token, count in Counter(output_ids).items():
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    return out


def processed(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """The logits one row is drawn from, float64 [vocab]: allowed ids, logit bias, banned ids and
    penalties; greedy rows stop there. Random rows: / temperature, then min-p, top-k and top-p
    (over what the earlier filters left), dropped tokens at -inf."""
    p = r.params
    x = logits.double().clone()
    if p.allowed_token_ids:
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep[list(p.allowed_token_ids)] = True
        x[~keep] = NEG_INF
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    x[list(r.banned_ids)] = NEG_INF
    x = penalized(x, p, r.prompt_ids if p.repetition_penalty != 1.0 else (), r.output_ids)
    if p.greedy:
        return x
    x = x / p.temperature
    if p.min_p > 0:
        probs = x.softmax(-1)
        x[probs < p.min_p * probs.max()] = NEG_INF
    if 0 < p.top_k < x.numel():
        x[x < x.topk(p.top_k).values[-1]] = NEG_INF
    if p.top_p < 1.0:
        probs, order = x.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        x[order[before >= p.top_p]] = NEG_INF
    return x


def processed_batch(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    return torch.stack([processed(logits[i], r) for i, r in enumerate(rows)])


def distribution(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """The probabilities a random row's draws should follow, float64 [vocab]."""
    return processed(logits, r).softmax(-1)


# --- chi-square goodness of fit ---

def regularized_gamma_q(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a): series below a + 1, Lentz's continued fraction above."""
    if x <= 0:
        return 1.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-15:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_prefix) * h


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """P(statistic >= observed) for draws `counts` [k] from `probs` [k]; the tokens expected fewer
    than min_expected times are pooled into one bin, as the test's approximation needs."""
    total = int(counts.sum())
    expected = probs.double() * total
    big = expected >= min_expected
    observed = counts.double()
    obs_bins = torch.cat([observed[big], observed[~big].sum()[None]])
    exp_bins = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp_bins[-1] < min_expected:  # too little pooled mass for a bin of its own: fold it in
        obs_bins = torch.cat([obs_bins[:-2], obs_bins[-2:].sum()[None]])
        exp_bins = torch.cat([exp_bins[:-2], exp_bins[-2:].sum()[None]])
    statistic = float(((obs_bins - exp_bins) ** 2 / exp_bins).sum())
    dof = len(obs_bins) - 1
    return regularized_gamma_q(dof / 2, statistic / 2)
