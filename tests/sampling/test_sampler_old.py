"""The batched sampler: greedy rows take the argmax, and sampled rows stay inside their top-k /
top-p / min-p sets while covering them (many draws on crafted logits)."""

from __future__ import annotations

import pytest
import torch

from sampling.params import SamplingParams
from sampling.sampler import Sampler, SamplingBatch, apply_top_k_top_p

VOCAB = 32
DRAWS = 4000


def sample(logits: torch.Tensor, params: list[SamplingParams], seed: int = 0) -> torch.Tensor:
    batch = SamplingBatch.from_params(params, logits.shape[-1], torch.device("cpu"))
    return Sampler(torch.Generator().manual_seed(seed))(logits, batch)


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax():
    logits = random_logits(64, seed=1)
    assert torch.equal(sample(logits, [SamplingParams(temperature=0)] * 64), logits.argmax(-1))


def test_top_k_one_equals_greedy_at_any_temperature():
    logits = random_logits(64, seed=2)
    assert torch.equal(sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 64), logits.argmax(-1))


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = random_logits(2, seed=3).repeat(DRAWS // 2, 1)  # rows alternate between two logit rows
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * (DRAWS // 2)
    tokens = sample(logits, params)
    assert (tokens[0::2] == logits[0].argmax()).all()
    assert tokens[1::2].unique().numel() > 5  # the sampled rows really sample


def crafted() -> torch.Tensor:
    """Probabilities 0.4, 0.3, 0.2, 0.05, 0.05 / (VOCAB - 4) spread over the rest, as logits."""
    probs = torch.full((VOCAB,), 0.05 / (VOCAB - 4))
    probs[[7, 3, 11, 20]] = torch.tensor([0.4, 0.3, 0.2, 0.05])
    return probs.log()


@pytest.mark.parametrize("top_k, allowed", [(1, {7}), (2, {7, 3}), (3, {7, 3, 11}), (4, {7, 3, 11, 20})])
def test_draws_stay_inside_top_k_and_cover_it(top_k, allowed):
    tokens = sample(crafted().repeat(DRAWS, 1), [SamplingParams(temperature=1.0, top_k=top_k)] * DRAWS)
    assert set(tokens.tolist()) == allowed


@pytest.mark.parametrize("top_p, allowed", [(0.35, {7}), (0.6, {7, 3}), (0.85, {7, 3, 11}), (0.92, {7, 3, 11, 20})])
def test_draws_stay_inside_the_top_p_nucleus_and_cover_it(top_p, allowed):
    tokens = sample(crafted().repeat(DRAWS, 1), [SamplingParams(temperature=1.0, top_p=top_p)] * DRAWS)
    assert set(tokens.tolist()) == allowed


def test_top_k_and_top_p_combine_per_row():
    logits = crafted().repeat(DRAWS, 1)
    params = [SamplingParams(temperature=1.0, top_k=3, top_p=0.6), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=1.0)] * (DRAWS // 3)
    tokens = sample(logits[: len(params)], params)
    assert set(tokens[0::3].tolist()) == {7, 3}
    assert set(tokens[1::3].tolist()) == {7, 3}
    assert len(set(tokens[2::3].tolist())) > 6  # no filter: the tail shows up too


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    tokens = sample(crafted().repeat(DRAWS, 1), [SamplingParams(temperature=1.0, min_p=0.4)] * DRAWS)
    assert set(tokens.tolist()) == {7, 3, 11}  # 0.2 >= 0.4 * 0.4; 0.05 is not


def test_draw_frequencies_follow_the_probabilities():
    tokens = sample(crafted().repeat(DRAWS, 1), [SamplingParams(temperature=1.0, top_k=3)] * DRAWS)
    freq = torch.bincount(tokens, minlength=VOCAB).float() / DRAWS
    torch.testing.assert_close(freq[[7, 3, 11]], torch.tensor([4 / 9, 3 / 9, 2 / 9]), atol=0.03, rtol=0)


def test_low_temperature_sharpens_and_high_temperature_flattens():
    logits = crafted().repeat(DRAWS, 1)
    cold = sample(logits, [SamplingParams(temperature=0.1)] * DRAWS)
    hot = sample(logits, [SamplingParams(temperature=5.0)] * DRAWS)
    assert (cold == 7).float().mean() > 0.9
    assert (hot == 7).float().mean() < 0.2


def test_same_generator_seed_gives_the_same_draws():
    logits = random_logits(256, seed=4)
    params = [SamplingParams(temperature=1.0)] * 256
    assert torch.equal(sample(logits, params, seed=5), sample(logits, params, seed=5))
    assert not torch.equal(sample(logits, params, seed=5), sample(logits, params, seed=6))


def test_apply_top_k_top_p_masks_exactly_the_excluded_logits():
    logits = crafted()[None].repeat(2, 1)
    masked = apply_top_k_top_p(logits, torch.tensor([2, VOCAB]), torch.tensor([1.0, 0.85]))
    kept = [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in masked]
    assert kept == [{7, 3}, {7, 3, 11}]
    assert torch.equal(masked[0, [7, 3]], logits[0, [7, 3]])  # kept logits are unchanged
