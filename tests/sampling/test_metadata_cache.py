"""MetadataCache: a step that samples the same rows as the last reuses its metadata with new
random keys, and draws exactly what a fresh build draws; anything else takes a full build."""

from __future__ import annotations

import torch

from sampling.metadata import MetadataCache, SamplingMetadata, SamplingRow, row_key
from sampling.params import SamplingParams
from sampling.sampler import Sampler, apply_penalties

from .reference import random_logits

VOCAB = 300


def rows_at(params, seeds, step, banned=None):
    return [SamplingRow(p, s, step + i, banned_ids=(banned or {}).get(i, ())) for i, (p, s) in enumerate(zip(params, seeds))]


def draw(logits, md, device):
    return Sampler()(logits.to(device).clone(), md).token_ids.cpu()


def test_same_rows_reuse_the_metadata_and_draw_what_a_fresh_build_draws(device):
    params = [SamplingParams(temperature=0.9, top_k=20), SamplingParams(temperature=0), SamplingParams(temperature=1.2, top_p=0.8),
              SamplingParams(temperature=0.7, min_p=0.1, logit_bias={5: 3.0})]
    seeds = [11, 12, 13, 14]
    cache = MetadataCache()
    for step in range(6):
        logits = random_logits(4, VOCAB, seed=100 + step)
        rows = rows_at(params, seeds, step)
        md = cache.build(rows, VOCAB, device)
        fresh = SamplingMetadata.build(rows, VOCAB, device)
        assert torch.equal(md.keys.cpu(), fresh.keys.cpu())
        assert md.keys.cpu().tolist() == [row_key(s, step + i) for i, s in enumerate(seeds)]
        assert torch.equal(draw(logits, md, device), draw(logits, fresh, device))
    assert cache.hits == 5


def test_other_rows_order_or_seeds_take_a_full_build(device):
    a, b = SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=3)
    cache = MetadataCache()
    cache.build(rows_at([a, b], [1, 2], 0), VOCAB, device)
    md = cache.build(rows_at([b, a], [2, 1], 1), VOCAB, device)  # reordered
    assert cache.hits == 0 and md.num_candidates == 1 and md.candidate_rows.cpu().tolist() == [0]
    cache.build(rows_at([b, a], [2, 3], 2), VOCAB, device)  # another request with the same params object
    cache.build(rows_at([b, a, a], [2, 3, 4], 3), VOCAB, device)  # one more row
    cache.build(rows_at([b, a, a], [2, 3, 4], 4), VOCAB, device, logprobs_mode="processed_logits")
    assert cache.hits == 0
    cache.build(rows_at([b, a, a], [2, 3, 4], 5), VOCAB, device, logprobs_mode="processed_logits")
    assert cache.hits == 1


def test_a_step_with_banned_ids_is_built_fresh_and_not_kept(device):
    params, seeds = [SamplingParams(temperature=0)] * 2, [1, 2]
    cache = MetadataCache()
    cache.build(rows_at(params, seeds, 0), VOCAB, device)
    logits = random_logits(2, VOCAB, seed=7)
    top = logits.argmax(-1).tolist()
    md = cache.build(rows_at(params, seeds, 1, banned={0: [top[0]]}), VOCAB, device)
    assert cache.hits == 0 and md.banned is not None
    assert draw(logits, md, device).tolist()[0] != top[0]
    md = cache.build(rows_at(params, seeds, 2), VOCAB, device)  # the banned step was not kept
    assert cache.hits == 0 and md.banned is None
    assert draw(logits, md, device).tolist() == top
    cache.build(rows_at(params, seeds, 3), VOCAB, device)
    assert cache.hits == 1


def test_penalized_rows_that_grew_by_one_token_reuse_the_metadata_and_draw_what_a_fresh_build_draws(device):
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4),
              SamplingParams(temperature=0.8, top_k=5),  # not penalized: not in the histories
              SamplingParams(temperature=1.0, presence_penalty=1.5)]
    gen = torch.Generator().manual_seed(3)
    lists = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 4, 12)]
    cache, sampler = MetadataCache(), Sampler()
    for step in range(8):
        logits = random_logits(3, VOCAB, seed=50 + step)
        rows = [SamplingRow(p, 30 + i, step, token_ids=t, num_prompt_tokens=3) for i, (p, t) in enumerate(zip(params, lists))]
        md = cache.build(rows, VOCAB, device, histories=sampler.histories)
        fresh = SamplingMetadata.build(rows, VOCAB, device)  # its own histories: every token uploaded
        got = sampler(logits.to(device).clone(), md)
        assert torch.equal(got.token_ids.cpu(), draw(logits, fresh, device))
        penalized = logits.to(device).clone()
        apply_penalties(penalized, md)
        expected = logits.to(device).clone()
        apply_penalties(expected, fresh)
        torch.testing.assert_close(penalized.cpu(), expected.cpu(), rtol=0, atol=0)
        assert (penalized.cpu() != logits).any()
        for t in lists:  # the step's tokens, as the engine appends them; the greedy row's own draw
            t.append(int(torch.randint(0, VOCAB, (), generator=gen)))
        lists[0][-1] = got.token_ids[0].item()
    assert cache.hits == 7


def test_penalized_rows_that_did_not_grow_by_one_token_take_a_full_build(device):
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    cache, sampler = MetadataCache(), Sampler()
    tokens = [4, 4, 9]

    def build(step):
        return cache.build([SamplingRow(params, 5, step, token_ids=tokens, num_prompt_tokens=1)], VOCAB, device,
                           histories=sampler.histories)

    build(0)
    tokens += [9, 9]  # two tokens (a step's token and a recomputed one, say)
    build(1)
    assert cache.hits == 0
    del tokens[-1]  # shorter: not the list it was
    logits = random_logits(1, VOCAB, seed=8)
    got = logits.to(device).clone()
    apply_penalties(got, build(2))
    assert cache.hits == 0
    expected = logits.clone()
    expected[0, 4] -= 2.0 * 1
    expected[0, 9] -= 2.0 * 2
    torch.testing.assert_close(got.cpu(), expected)
    tokens.append(4)
    md = build(3)
    assert cache.hits == 1 and md.penalties is not None
    # Without the Sampler's histories (each build makes its own) nothing is reused.
    for step in range(4, 6):
        tokens.append(1)
        cache.build([SamplingRow(params, 5, step, token_ids=tokens, num_prompt_tokens=1)], VOCAB, device)
    assert cache.hits == 1


def addresses(md: SamplingMetadata) -> dict[str, int]:
    tensors = dict(vars(md), **({} if md.penalties is None else {"ranges": md.penalties.ranges,
                                                                 "factors": md.penalties.factors}))
    return {name: t.data_ptr() for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def test_steps_laid_out_alike_see_their_metadata_at_the_same_addresses(device):
    """What a sampler graph replays on: the cache's builds upload into buffers of its own, so a
    step laid out as the one before finds every tensor where that one's was, with this step's values."""
    params = [SamplingParams(temperature=0.9, top_k=20, presence_penalty=0.5), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_p=0.8, min_p=0.1)]
    lists = [list(range(5 * i, 5 * i + 6)) for i in range(3)]
    cache, sampler = MetadataCache(), Sampler()

    def build(step, seeds=(1, 2, 3)):
        for t in lists:
            t.append(step)
        rows = [SamplingRow(p, s, step, token_ids=t, num_prompt_tokens=2) for p, s, t in zip(params, seeds, lists)]
        return cache.build(rows, VOCAB, device, histories=sampler.histories)

    full = build(0)
    first_full = addresses(full)
    hits = [build(step) for step in (1, 2, 3)]
    assert cache.hits == 3
    seen = [addresses(md) for md in hits]
    assert seen[0] == seen[1] == seen[2]
    assert {k: v for k, v in seen[0].items() if k not in ("keys", "ranges", "factors")} == \
        {k: v for k, v in first_full.items() if k not in ("keys", "ranges", "factors")}
    # The same places, this step's values: the keys and the histories' ends move on.
    assert hits[2].keys.cpu().tolist() == [row_key(s, 3) for s in (1, 2, 3)]
    assert hits[2].penalties.ranges[4].cpu().tolist() == [len(lists[0])]
    # Other seeds each step: full builds, each uploading a token a row, laid out alike.
    again, later = build(4, seeds=(4, 5, 6)), build(5, seeds=(7, 8, 9))
    assert cache.hits == 3 and addresses(again) == addresses(later)
    assert later.keys.cpu().tolist() == [row_key(s, 5) for s in (7, 8, 9)]
    assert again.keys.data_ptr() not in seen[0].values()  # full builds and reuses: buffers of their own


def test_equal_params_of_other_requests_take_a_full_build_without_comparing_their_fields(device):
    # A user's extra_args may hold what == cannot answer (a numpy array): params are matched by identity.
    import numpy as np

    def params():
        return SamplingParams(temperature=0.5, extra_args={"weights": np.arange(3)})

    cache = MetadataCache()
    cache.build(rows_at([params()], [1], 0), VOCAB, device)
    cache.build(rows_at([params()], [1], 1), VOCAB, device)
    assert cache.hits == 0
