"""Draws follow the distribution their parameters define: 20,000 draws on fixed logits, a
chi-square test against softmax(logits / T) after min-p, top-k and top-p, and no token outside
the kept set. Seeds are fixed, so each test's outcome is fixed too."""

from __future__ import annotations

import math

import pytest
import torch

from sampling.params import SamplingParams

from .reference import (
    chi_square_p_value,
    distribution,
    random_logits,
    regularized_gamma_q,
    row,
    sample,
)

VOCAB = 40
DRAWS = 20_000
LOGITS = random_logits(1, VOCAB, seed=21, scale=1.5)[0]


def draw(params: SamplingParams, over: str, device, logits: torch.Tensor = LOGITS, **row_kw) -> torch.Tensor:
    """DRAWS tokens for one logits row: rows of one batch with seeds 0.., or one seed over steps 0.."""
    if over == "rows":
        rows = [row(params, seed=i, **row_kw) for i in range(DRAWS)]
    else:
        rows = [row(params, seed=42, step=i, **row_kw) for i in range(DRAWS)]
    return sample(logits.expand(DRAWS, -1), rows, device).token_ids.cpu()


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor, draws: int = DRAWS) -> None:
    counts = torch.bincount(tokens, minlength=len(probs))
    support = probs > 0
    outside = counts[~support]
    assert outside.sum() == 0, f"tokens outside the kept set: {(~support).nonzero()[outside > 0, 0].tolist()}"
    assert (counts[probs * draws >= 20] > 0).all()  # every token the set keeps shows up
    p_value = chi_square_p_value(counts, probs)
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e}"


CASES = {
    "temperature 1": dict(temperature=1.0),
    "temperature 0.5": dict(temperature=0.5),
    "temperature 2": dict(temperature=2.0),
    "top-k 8": dict(temperature=1.0, top_k=8),
    "top-p 0.7": dict(temperature=1.0, top_p=0.7),
    "top-p 0.9 at T 1.5": dict(temperature=1.5, top_p=0.9),
    "min-p 0.1 at T 0.8": dict(temperature=0.8, min_p=0.1),
    "all filters": dict(temperature=0.9, top_k=12, top_p=0.85, min_p=0.02),
}


@pytest.mark.parametrize("case", list(CASES))
def test_draws_across_rows_follow_the_distribution(case, device):
    params = SamplingParams(**CASES[case])
    probs = distribution(LOGITS, row(params))
    assert_follows(draw(params, "rows", device), probs)


@pytest.mark.parametrize("case", ["temperature 1", "top-k 8", "top-p 0.7", "min-p 0.1 at T 0.8"])
def test_draws_across_steps_of_one_seed_follow_the_distribution(case, device):
    params = SamplingParams(**CASES[case])
    assert_follows(draw(params, "steps", device), distribution(LOGITS, row(params)))


def test_draws_with_penalties_and_bias_follow_the_processed_distribution(device):
    params = SamplingParams(temperature=1.0, top_p=0.95, presence_penalty=0.8, frequency_penalty=0.3,
                            repetition_penalty=1.3, logit_bias={int(LOGITS.argmin()): 4.0})
    history = dict(output_ids=[int(LOGITS.argmax())] * 3 + [5, 6], prompt_ids=[7, 8])
    probs = distribution(LOGITS, row(params, **history))
    assert_follows(draw(params, "rows", device, **history), probs)


def test_the_chi_square_test_rejects_a_wrong_temperature(device):
    tokens = draw(SamplingParams(temperature=1.0), "rows", device)
    wrong = distribution(LOGITS, row(SamplingParams(temperature=1.15)))
    assert chi_square_p_value(torch.bincount(tokens, minlength=VOCAB), wrong) < 1e-6


@pytest.mark.parametrize("dof, statistic, p_value", [
    (1, 3.841459, 0.05), (2, 5.991465, 0.05), (10, 18.307038, 0.05), (10, 23.209251, 0.01), (30, 20.599235, 0.9),
    (39, 62.428121, 0.01), (4, 40.0, math.exp(-20.0) * (1 + 20.0)),
])
def test_chi_square_p_values_match_the_tables(dof, statistic, p_value):
    assert regularized_gamma_q(dof / 2, statistic / 2) == pytest.approx(p_value, rel=1e-5)
