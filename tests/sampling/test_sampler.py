"""The batched sampler on crafted logits: exact outcomes (greedy, top-k 1, logit bias, allowed and
banned ids, penalties, logprobs in every mode) and seeded draws that do not depend on the batch.

Every test takes the `device` fixture (tests/sampling/conftest.py: the CPU); tests/gpu collects
the same functions again on CUDA."""

from __future__ import annotations

import pytest
import torch

from sampling.metadata import (
    MAX_WINDOW_TOP_K,
    TOP_P_WINDOW,
    SamplingMetadata,
    SamplingRow,
    TokenHistories,
    row_key,
)
from sampling.params import SamplingParams
from sampling.sampler import apply_penalties

from .reference import distribution, penalized, processed_batch, random_logits, row, sample
from .test_distribution import assert_follows

VOCAB = 64
MODES = ["raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits"]


def tokens_of(logits: torch.Tensor, rows, device) -> torch.Tensor:
    return sample(logits, rows, device).token_ids.cpu()


def test_greedy_rows_take_the_argmax(device):
    logits = random_logits(48, 1000, seed=1)
    rows = [row(SamplingParams(temperature=0), seed=i) for i in range(48)]
    assert torch.equal(tokens_of(logits, rows, device), logits.argmax(-1))


def test_greedy_rows_take_the_argmax_beside_sampled_rows(device):
    logits = random_logits(48, 1000, seed=2, scale=1.0)
    rows = [row(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=20 if i % 3 == 0 else 0), seed=i)
            for i in range(48)]
    tokens = tokens_of(logits, rows, device)
    assert torch.equal(tokens[0::2], logits[0::2].argmax(-1))
    assert (tokens[1::2] != logits[1::2].argmax(-1)).sum() > 12  # the others really draw


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_top_k_one_equals_greedy(temperature, top_p, device):
    logits = random_logits(64, 1000, seed=3, scale=1.0)
    rows = [row(SamplingParams(temperature=temperature, top_k=1, top_p=top_p), seed=i) for i in range(64)]
    assert torch.equal(tokens_of(logits, rows, device), logits.argmax(-1))


FILTERS = [{}, dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(temperature=0.0)]


@pytest.mark.parametrize("extra", FILTERS)
def test_logit_bias_of_minus_100_never_samples_the_token(extra, device):
    logits = random_logits(2000, VOCAB, seed=4, scale=1.0)
    logits[:, 7] += 6.0  # every row's favourite by far
    biased = [row(SamplingParams(**{"temperature": 1.0, **extra, "logit_bias": {7: -100}}), seed=i) for i in range(2000)]
    unbiased = [row(SamplingParams(**{"temperature": 1.0, **extra}), seed=i) for i in range(2000)]
    assert (tokens_of(logits, unbiased, device) == 7).float().mean() > 0.7
    assert (tokens_of(logits, biased, device) != 7).all()


@pytest.mark.parametrize("extra", [*FILTERS, dict(temperature=2.0, top_p=0.5)])
def test_logit_bias_of_plus_100_always_samples_the_token(extra, device):
    logits = random_logits(2000, VOCAB, seed=5)
    logits[:, 11] = logits.min(-1).values  # every row's least likely token
    rows = [row(SamplingParams(**{"temperature": 1.0, **extra, "logit_bias": {11: 100}}), seed=i) for i in range(2000)]
    assert (tokens_of(logits, rows, device) == 11).all()


def test_allowed_token_ids_hold_every_draw_and_leave_other_rows_alone(device):
    lists = [[3, 9, 40], [0], [63, 1]]
    n = 1200
    logits = random_logits(n, VOCAB, seed=6, scale=1.0)
    rows = [row(SamplingParams(temperature=0.0 if i % 5 == 0 else 1.0,
                               allowed_token_ids=lists[i % 4] if i % 4 < 3 else None), seed=i) for i in range(n)]
    tokens = tokens_of(logits, rows, device)
    for i, r in enumerate(rows):
        allowed = r.params.allowed_token_ids
        if allowed is None:
            continue
        assert tokens[i].item() in allowed, (i, allowed)
        if r.params.greedy:
            assert tokens[i].item() == allowed[int(logits[i, allowed].argmax())]
    assert {t for i, t in enumerate(tokens.tolist()) if i % 4 == 0 and i % 5} == {3, 9, 40}
    free = [t for i, t in enumerate(tokens.tolist()) if i % 4 == 3]
    assert len(set(free) - {0, 1, 3, 9, 40, 63}) > 20  # rows without a list draw from everywhere


def test_banned_ids_are_never_drawn(device):
    n = 1000
    logits = random_logits(n, VOCAB, seed=7, scale=1.0)
    top3 = logits.topk(3).indices
    rows = [row(SamplingParams(temperature=0.0 if i % 2 else 1.0), seed=i, banned_ids=top3[i].tolist()) for i in range(n)]
    tokens = tokens_of(logits, rows, device)
    assert not (tokens[:, None] == top3).any()
    assert torch.equal(tokens[1::2], logits[1::2].topk(4).indices[:, 3])  # greedy: the best one left


# logits [2, -1, 0.5, 3]; output tokens 0, 0, 0, 1; prompt token 2. Worked by hand from the formulas.
@pytest.mark.parametrize("params, expected", [
    (dict(frequency_penalty=0.5), [2 - 0.5 * 3, -1 - 0.5, 0.5, 3.0]),
    (dict(presence_penalty=0.5), [2 - 0.5, -1 - 0.5, 0.5, 3.0]),
    (dict(frequency_penalty=-0.5, presence_penalty=-1.0), [2 + 1.5 + 1.0, -1 + 0.5 + 1.0, 0.5, 3.0]),
    (dict(repetition_penalty=2.0), [2 / 2, -1 * 2, 0.5 / 2, 3.0]),  # prompt tokens count for repetition
    (dict(repetition_penalty=0.5), [2 / 0.5, -1 * 0.5, 0.5 / 0.5, 3.0]),
    (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.5),
     [2 / 2 - 1.5 - 0.5, -1 * 2 - 0.5 - 0.5, 0.5 / 2, 3.0]),  # repetition first, then OpenAI's
])
def test_penalties_on_hand_worked_logits(params, expected, device):
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    rows = [row(SamplingParams(temperature=0, **params), output_ids=[0, 0, 0, 1], prompt_ids=[2])]
    got = logits.to(device).clone()
    apply_penalties(got, SamplingMetadata.build(rows, 4, torch.device(device)))
    torch.testing.assert_close(got.cpu(), torch.tensor([expected]))


def random_penalty_rows(n: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return round(low + (high - low) * torch.rand((), generator=gen).item(), 3)

    rows = []
    for i in range(n):
        params = SamplingParams(
            temperature=0,
            presence_penalty=uniform(-2, 2) if i % 4 != 1 else 0.0,
            frequency_penalty=uniform(-2, 2) if i % 4 != 2 else 0.0,
            repetition_penalty=uniform(0.5, 2.0) if i % 4 != 3 else 1.0,
        )
        hot = torch.randint(0, VOCAB, (6,), generator=gen)  # few distinct ids, so they repeat
        output = hot[torch.randint(0, 6, (int(torch.randint(0, 30, (), generator=gen)),), generator=gen)].tolist()
        prompt = torch.randint(0, VOCAB, (int(torch.randint(0, 20, (), generator=gen)),), generator=gen).tolist()
        rows.append(row(params, seed=i, output_ids=output, prompt_ids=prompt))
    return rows


def test_penalties_match_the_reference_formula(device):
    rows = random_penalty_rows(24, seed=8)
    logits = random_logits(len(rows), VOCAB, seed=8)
    got = logits.to(device).clone()
    apply_penalties(got, SamplingMetadata.build(rows, VOCAB, torch.device(device)))
    expected = torch.stack([penalized(logits[i], r.params, r.prompt_ids, r.output_ids) for i, r in enumerate(rows)])
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-5, rtol=1e-6)
    assert (expected != logits.double()).any(dim=-1).all()  # every row was penalized somewhere
    # Greedy rows take the argmax of the penalized logits, not of the raw ones.
    tokens = tokens_of(logits, rows, device)
    assert torch.equal(tokens, expected.argmax(-1))
    assert not torch.equal(tokens, logits.argmax(-1))


def mixed_rows(logprobs: int) -> list:
    """Greedy and random rows with every filter, penalties, bias, banned and allowed ids."""
    def sp(**kw) -> SamplingParams:
        return SamplingParams(logprobs=logprobs, **kw)

    output, prompt = [4, 4, 4, 9, 17, 30], [30, 31, 4, 50]
    return [
        row(sp(temperature=0)),
        row(sp(temperature=0.7), seed=1),
        row(sp(temperature=1.3, top_k=5), seed=2),
        row(sp(temperature=1.0, top_p=0.8), seed=3),
        row(sp(temperature=0.9, min_p=0.1), seed=4),
        row(sp(temperature=1.0, top_k=10, top_p=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
               repetition_penalty=1.2), seed=5, output_ids=output, prompt_ids=prompt),
        row(sp(temperature=0, repetition_penalty=1.5, frequency_penalty=0.4, logit_bias={3: 2.5, 8: -1.0}),
            output_ids=output, prompt_ids=prompt, banned_ids=[12]),
        row(sp(temperature=1.0, allowed_token_ids=[2, 5, 33, 60, 61, 62]), seed=7),
        row(sp(temperature=0.5, logit_bias={20: 4.0}, top_p=0.95), seed=8, banned_ids=[1, 2, 3]),
        row(sp(temperature=0, top_k=3, allowed_token_ids=[10, 11, 12, 13]), seed=9),  # greedy: top-k unused
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", ["mixed", "all_greedy"])
def test_logprobs_are_of_the_logits_the_mode_names(mode, batch, device):
    rows = mixed_rows(logprobs=5)
    if batch == "all_greedy":
        rows = [r for r in rows if r.params.greedy]
    logits = random_logits(len(rows), VOCAB, seed=9)
    out = sample(logits, rows, device, mode)
    tokens = out.token_ids.cpu()
    kept = processed_batch(logits, rows)
    assert kept.gather(1, tokens[:, None]).isfinite().all()  # every draw lies inside its row's kept set
    reference = logits.double() if mode.startswith("raw") else kept
    if mode.endswith("logprobs"):
        reference = reference.log_softmax(-1)
    ids, values, ranks = out.logprob_ids.cpu(), out.logprob_values.cpu().double(), out.sampled_rank.cpu()
    assert ids.shape == values.shape == (len(rows), 6)
    assert torch.equal(ids[:, 0], tokens)  # the sampled token first
    chosen = reference.gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(values[:, 0], chosen, atol=1e-4, rtol=1e-5)
    top_values, top_ids = reference.topk(5)
    torch.testing.assert_close(values[:, 1:], top_values, atol=1e-4, rtol=1e-5)
    finite = top_values.isfinite()  # past a row's kept set the ids tie at -inf, in any order
    assert torch.equal(ids[:, 1:][finite], top_ids[finite])
    assert torch.equal(ranks, (reference > chosen[:, None]).sum(-1) + 1)


def test_logprobs_zero_returns_the_sampled_token_alone(device):
    rows = [row(SamplingParams(temperature=1.0, logprobs=0), seed=i) for i in range(4)]
    logits = random_logits(4, VOCAB, seed=10)
    out = sample(logits, rows, device)
    assert out.logprob_ids.shape == (4, 1)
    torch.testing.assert_close(out.logprob_values.cpu()[:, 0],
                               logits.log_softmax(-1).gather(1, out.token_ids.cpu()[:, None])[:, 0])


def test_without_logprobs_nothing_is_gathered(device):
    out = sample(random_logits(3, VOCAB, seed=11), [row(SamplingParams(), seed=i) for i in range(3)], device)
    assert out.logprob_ids is None and out.logprob_values is None and out.sampled_rank is None


def draws(logits: torch.Tensor, params: SamplingParams, seed: int, others: list, position: int, device) -> list[int]:
    """The target row's tokens over 8 steps, in a batch of `others` with the target at `position`."""
    tokens = []
    for step in range(8):
        rows = list(others)
        rows.insert(position, row(params, seed=seed, step=step))
        batch = torch.cat([logits[1:position + 1], logits[:1], logits[position + 1:len(rows)]])
        tokens.append(tokens_of(batch, rows, device)[position].item())
    return tokens


def random_others(n: int, seed: int) -> list:
    """Rows with every kind of parameter, so the batch takes every path of the sampler."""
    gen = torch.Generator().manual_seed(seed)
    kinds = [
        dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.2, top_p=0.6),
        dict(temperature=1.0, min_p=0.2), dict(temperature=0.9, top_k=500, top_p=0.9, presence_penalty=1.0),
        dict(temperature=1.0, logit_bias={5: 3.0}, allowed_token_ids=list(range(100))), dict(temperature=1.0, top_k=2),
    ]
    return [row(SamplingParams(**kinds[int(torch.randint(0, len(kinds), (), generator=gen))], logprobs=2),
                seed=int(torch.randint(0, 2**40, (), generator=gen)), step=i, output_ids=[1, 2, 2], prompt_ids=[7])
            for i in range(n)]


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=50, top_p=0.95),
    dict(temperature=1.5, min_p=0.05), dict(temperature=1.0, top_k=7),
])
def test_a_seeded_row_draws_the_same_tokens_whatever_the_batch(params, device):
    logits = random_logits(33, 1000, seed=12, scale=1.0)  # row 0: the target's logits
    params = SamplingParams(**params)
    alone = draws(logits, params, 1234, [], 0, device)
    others = random_others(32, seed=13)
    for position in (0, 16, 32):
        assert draws(logits, params, 1234, others, position, device) == alone, position
    assert draws(logits, params, 1235, [], 0, device) != alone  # another seed: other tokens


def test_row_keys_differ_for_nearby_seeds_and_steps():
    keys = {row_key(seed, step) for seed in range(200) for step in range(200)}
    assert len(keys) == 200 * 200
    assert all(0 <= k < 2**63 for k in keys)


def test_features_nobody_uses_stay_off(device):
    device = torch.device(device)
    md = SamplingMetadata.build([row(SamplingParams(temperature=1.0)), row(SamplingParams(temperature=0))], 100, device)
    assert not md.all_greedy and md.num_logprobs == -1
    assert all(getattr(md, name) is None for name in ("top_k", "top_p", "floor_offset", "candidate_rows", "plain_rows",
                                                      "penalties", "bias", "banned", "allowed"))
    # Greedy rows ignore the filters: top-k, top-p and min-p of greedy rows set up nothing, and an
    # all-greedy batch uploads nothing at all (no temperatures, no random-stream keys).
    md = SamplingMetadata.build([row(SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.1))], 100, device)
    assert md.all_greedy and md.top_k is None and md.top_p is None and md.floor_offset is None
    assert md.inv_temp is None and md.keys is None
    # Candidates: the largest top-k, or the top-p window once a row has top-p alone (at most the vocabulary).
    md = SamplingMetadata.build([row(SamplingParams(top_k=5)), row(SamplingParams(top_k=9, top_p=0.5)),
                                 row(SamplingParams())], 100, device)
    assert md.candidate_rows.tolist() == [0, 1] and md.plain_rows.tolist() == [2] and md.candidate_k == 9
    md = SamplingMetadata.build([row(SamplingParams(top_k=5)), row(SamplingParams(top_p=0.5))], 100, device)
    assert md.candidate_k == 100 and md.top_p_alone
    md = SamplingMetadata.build([row(SamplingParams(top_k=5)), row(SamplingParams(top_p=0.5))], 5000, device)
    assert md.candidate_k == TOP_P_WINDOW
    # A top-k beyond the window's limit does not widen everyone's window (that row takes the search).
    md = SamplingMetadata.build([row(SamplingParams(top_k=7)), row(SamplingParams(top_k=MAX_WINDOW_TOP_K + 1))],
                                5000, device)
    assert md.candidate_k == 7


def test_token_histories_follow_lists_appended_step_by_step(device):
    """The runner passes each request's own token list; the histories upload only what was
    appended, free the slots of rows that left, and re-upload a list that shrank."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(40)
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2),
              SamplingParams(temperature=1.0, frequency_penalty=-0.7, presence_penalty=1.1),
              SamplingParams(temperature=0.5, repetition_penalty=0.8),
              SamplingParams(temperature=1.0)]  # no penalties: its list is never read
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(1, 9, (), generator=gen)),), generator=gen).tolist()
               for _ in range(6)]
    lists = [list(p) for p in prompts]
    histories = TokenHistories()
    for step in range(7):
        for i, tokens in enumerate(lists):
            new = 3 if (i, step) == (2, 3) else 1  # a row that took several tokens at once
            tokens.extend(torch.randint(0, VOCAB, (new,), generator=gen).tolist())
        if step == 4:
            del lists[1][-2:]  # shrunk: not the list it was
        live = [i for i in range(6) if (i, step) not in ((3, 2), (3, 3))]  # row 3 sits out two steps
        rows = [SamplingRow(params[i % 4], seed=i, step=step, token_ids=lists[i],
                            num_prompt_tokens=len(prompts[i])) for i in live]
        rows.append(row(params[0], output_ids=lists[0][len(prompts[0]):], prompt_ids=prompts[0]))  # separate lists
        md = SamplingMetadata.build(rows, VOCAB, device, histories=histories)
        logits = random_logits(len(rows), VOCAB, seed=step)
        got = logits.to(device).clone()
        apply_penalties(got, md)
        expected = [penalized(logits[j], r.params, r.prompt_ids or lists[i][:len(prompts[i])],
                              r.output_ids or lists[i][len(prompts[i]):]) for j, (i, r) in enumerate(zip(live + [0], rows))]
        torch.testing.assert_close(got.cpu().double(), torch.stack(expected), atol=1e-5, rtol=1e-6)
        # Slots: the penalized rows of this build, and the separate lists' one of the build before.
        assert len(histories.slot_of) == sum(1 for i in live if i % 4 != 3)
        assert histories.builds == step + 1  # kept, not started over
    assert histories.ids.shape[0] <= 16


def test_rows_the_window_cannot_settle_follow_their_distribution(device):
    # A flat row: the top-p nucleus is wider than the window, so every draw takes the exact search.
    vocab = TOP_P_WINDOW + 44
    logits = random_logits(1, vocab, seed=41, scale=0.3)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9)
    rows = [row(params, seed=i) for i in range(20_000)]
    tokens = sample(logits.expand(len(rows), -1), rows, device).token_ids.cpu()
    assert_follows(tokens, distribution(logits, rows[0]), len(rows))


def test_a_top_k_beyond_the_window_keeps_exactly_the_k_best(device):
    vocab, k = MAX_WINDOW_TOP_K + 80, MAX_WINDOW_TOP_K + 1
    logits = random_logits(1, vocab, seed=42, scale=0.01)[0]  # near-uniform: the worst tokens would come up
    worst = logits.argsort()[: vocab - k]
    rows = [row(SamplingParams(temperature=1.0, top_k=k), seed=i) for i in range(3000)]
    tokens = sample(logits.expand(len(rows), -1), rows, device).token_ids.cpu()
    assert not torch.isin(tokens, worst).any()
    assert len(set(tokens.tolist())) > 900
    plain = sample(logits.expand(len(rows), -1), [row(SamplingParams(temperature=1.0), seed=i) for i in range(3000)],
                   device).token_ids.cpu()
    assert torch.isin(plain, worst).sum() > 100


def test_top_k_one_is_greedy_on_tied_logits(device):
    # Coarse (bf16-like) logits tie at the top: top-k 1 keeps the lowest id, as argmax does.
    logits = (random_logits(64, 3000, seed=43) * 2).round() / 2
    logits[:, 7] = logits.max(-1).values  # a tie at the top of every row, with a low id
    rows = [row(SamplingParams(temperature=1.0, top_k=1), seed=i) for i in range(64)]
    assert torch.equal(tokens_of(logits, rows, device), logits.argmax(-1))
