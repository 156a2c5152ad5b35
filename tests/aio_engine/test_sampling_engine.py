"""Sampling through the engine on the tiny models: min_tokens and bad words, seeded draws that do
not depend on the batch, n > 1 sharing its prompt, and logprobs / prompt logprobs equal to
transformers' log_softmax."""

from __future__ import annotations

import asyncio

import pytest
import torch

from aio_engine import LLM, RequestOutput, SamplingParams
from aio_engine.request import Request, RequestStatus
from tests.sampling.reference import processed, row

from .conftest import assert_all_blocks_free, random_prompt

TIMEOUT = 30


def generate(llm: LLM, prompts: list[list[int]], params) -> list[RequestOutput]:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def tokens_of(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    [out] = generate(llm, [prompt], params)
    return out.outputs[0].token_ids


def seeded(seed: int | None, max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "ignore_eos": True, **kw, "seed": seed, "max_tokens": max_tokens})


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax at every position of one sequence, float64 [len(ids), vocab]."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def rank_bounds(reference: torch.Tensor, token: int, tol: float = 1e-5) -> tuple[int, int]:
    """The ranks a token may have in one row of reference logprobs, near-ties either way."""
    value = reference[token]
    return int((reference > value + tol).sum()) + 1, int((reference > value - tol).sum()) + 1


# --- stop ids before min_tokens, bad words ---

def test_stop_ids_and_eos_are_banned_until_min_tokens():
    request = Request("r", [1, 2, 3], SamplingParams(min_tokens=2, stop_token_ids=[7, 8]), eos_token_ids=(0,))
    assert sorted(request.banned_token_ids()) == [0, 7, 8]
    request.append_token(5)
    assert sorted(request.banned_token_ids()) == [0, 7, 8]
    request.append_token(6)
    assert request.banned_token_ids() == []
    ignoring = Request("r", [1], SamplingParams(min_tokens=2, stop_token_ids=[7], ignore_eos=True), eos_token_ids=(0,))
    assert ignoring.banned_token_ids() == [7]


def test_bad_word_endings_are_banned_right_after_their_prefix():
    request = Request("r", [1, 2, 3], SamplingParams(), bad_words_ids=[[9], [4, 5], [3, 6, 7]])
    assert request.banned_token_ids() == [9]
    request.append_token(4)
    assert request.banned_token_ids() == [9, 5]
    request.append_token(3)
    request.append_token(6)
    assert request.banned_token_ids() == [9, 7]


def test_min_tokens_holds_back_the_stop_token_greedy_would_emit_first(make_llm):
    llm = make_llm()
    prompt = random_prompt(12, seed=300)
    first = tokens_of(llm, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    [stopped] = generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first]))
    assert stopped.outputs[0].token_ids == [first]
    assert (stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == ("stop", first)
    held = tokens_of(llm, prompt, SamplingParams(temperature=0, max_tokens=8, min_tokens=5, stop_token_ids=[first]))
    assert len(held) >= 5 and first not in held[:5]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_min_tokens_holds_back_eos_even_when_it_is_all_but_certain(seed, make_llm):
    llm = make_llm()
    eos = llm.core.eos_token_ids[0]
    prompt = random_prompt(9, seed=301)
    params = SamplingParams(temperature=1.0, seed=seed, logit_bias={eos: 100}, max_tokens=10)
    [eager] = generate(llm, [prompt], params)
    assert eager.outputs[0].token_ids == [eos]
    [held] = generate(llm, [prompt], SamplingParams(**{**vars(params), "min_tokens": 4}))
    tokens = held.outputs[0].token_ids
    assert len(tokens) == 5 and eos not in tokens[:4] and tokens[4] == eos
    assert held.outputs[0].finish_reason == "stop"


def contains(sequence: list[int], word: list[int], start: int) -> bool:
    """Whether `word` occurs in `sequence` ending at or after index `start`."""
    n = len(word)
    return any(sequence[i:i + n] == word for i in range(max(0, start - n + 1), len(sequence) - n + 1))


def test_bad_words_never_appear_single_and_multi_token(make_llm):
    llm = make_llm()
    tok = llm.tokenizer
    prompt = random_prompt(10, seed=302)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    plain = tokens_of(llm, prompt, greedy)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    # A word greedy emits as one token, and one it emits as two (each as its own text tokenizes).
    single = next(w for t in plain if (w := tok.decode([t]).strip()) and (ids(w) == [t] or ids(" " + w) == [t]))
    pair = next(tok.decode(plain[i:i + 2]) for i in range(len(plain) - 1)
                if ids(tok.decode(plain[i:i + 2])) == plain[i:i + 2] and tok.decode(plain[i:i + 2]).strip())
    for word in (single, pair):
        variants = [ids(word), ids(" " + word.lstrip())]
        assert any(contains(prompt + plain, v, len(prompt)) for v in variants), word  # it would appear
        for params in (greedy, seeded(7, max_tokens=32), seeded(8, max_tokens=32, top_k=3)):
            out = tokens_of(llm, prompt, SamplingParams(**{**vars(params), "bad_words": [word]}))
            assert len(out) == 32
            assert not any(contains(prompt + out, v, len(prompt)) for v in variants), (word, out)


def test_allowed_token_ids_and_logit_bias_reach_the_sampler(make_llm):
    llm = make_llm()
    prompt = random_prompt(8, seed=303)
    allowed = tokens_of(llm, prompt, seeded(1, allowed_token_ids=[10, 20, 30]))
    assert set(allowed) == {10, 20, 30}
    assert tokens_of(llm, prompt, seeded(2, logit_bias={42: 100})) == [42] * 16


# --- reproducibility ---

def random_requests(n: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 3-60 tokens with every kind of sampling parameter, seeded or not."""
    gen = torch.Generator().manual_seed(seed)
    kinds = [
        dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.2, top_p=0.6),
        dict(temperature=1.0, min_p=0.2, seed=5), dict(temperature=0.9, top_k=50, top_p=0.9, presence_penalty=1.0),
        dict(temperature=1.0, repetition_penalty=1.3, logprobs=3), dict(temperature=1.0, top_p=0.8, seed=6, n=2),
    ]
    prompts, params = [], []
    for i in range(n):
        length = int(torch.randint(3, 60, (), generator=gen))
        prompts.append(random_prompt(length, seed=seed * 1000 + i))
        kind = kinds[int(torch.randint(0, len(kinds), (), generator=gen))]
        params.append(SamplingParams(max_tokens=int(torch.randint(4, 24, (), generator=gen)), ignore_eos=True, **kind))
    return prompts, params


@pytest.mark.parametrize("extra", [{}, dict(top_p=0.9, top_k=40, presence_penalty=0.5)])
def test_seeded_request_gives_the_same_tokens_alone_in_a_batch_and_at_another_position(extra, make_llm):
    llm = make_llm()
    prompt, params = random_prompt(20, seed=310), seeded(77, **extra)
    alone = tokens_of(llm, prompt, params)
    others, others_params = random_requests(32, seed=311)
    for position in (0, 13, 32):
        outputs = generate(llm, others[:position] + [prompt] + others[position:],
                           others_params[:position] + [params] + others_params[position:])
        assert outputs[position].outputs[0].token_ids == alone, position
    assert tokens_of(llm, prompt, seeded(78, **extra)) != alone  # another seed: other tokens


def test_seeded_requests_give_the_same_tokens_under_preemption(make_llm):
    # 4 requests of 20 + 40 tokens need 8 blocks of 8 each; the cache holds 12 blocks in all.
    llm = make_llm("llama", block_size=8, num_gpu_blocks_override=12)
    prompts = [random_prompt(20, seed=320 + i) for i in range(4)]
    params = [seeded(100 + i, max_tokens=40, top_p=0.95) for i in range(4)]
    before = llm.core.scheduler.num_preemptions
    batched = [o.outputs[0].token_ids for o in generate(llm, prompts, params)]
    assert llm.core.scheduler.num_preemptions > before
    assert batched == [tokens_of(make_llm(), p, sp) for p, sp in zip(prompts, params)]


async def test_seeded_request_joining_a_busy_async_engine_gives_the_same_tokens(make_async_engine, make_llm):
    prompt, params = random_prompt(16, seed=330), seeded(5, max_tokens=20)
    alone = tokens_of(make_llm(), prompt, params)
    engine = make_async_engine()

    async def final(p, sp) -> RequestOutput:
        outs = [out async for out in engine.generate({"prompt_token_ids": p}, sp)]
        return outs[-1]

    others, others_params = random_requests(12, seed=331)
    busy = [asyncio.create_task(final(p, sp)) for p, sp in zip(others, others_params)]
    while engine.core.num_steps < 3:  # join while the others are mid-generation
        await asyncio.sleep(0.001)
    target = await asyncio.wait_for(final(prompt, params), TIMEOUT)
    await asyncio.wait_for(asyncio.gather(*busy), TIMEOUT)
    assert target.outputs[0].token_ids == alone


def test_n4_with_a_seed_gives_four_different_samples_and_the_same_four_again(make_llm):
    llm = make_llm()
    prompt = random_prompt(14, seed=340)
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    [first] = generate(llm, [prompt], params)
    samples = [o.token_ids for o in first.outputs]
    assert len({tuple(s) for s in samples}) == 4
    [again] = generate(llm, [prompt], params)
    assert [o.token_ids for o in again.outputs] == samples
    # Sample i draws with seed + i: what a single request with that seed draws.
    assert [tokens_of(llm, prompt, seeded(5 + i, max_tokens=12)) for i in range(4)] == samples


def test_unseeded_requests_differ_from_each_other(make_llm):
    llm = make_llm()
    prompt = random_prompt(14, seed=341)
    outputs = generate(llm, [prompt] * 4, seeded(None))
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == 4
    [fanned] = generate(llm, [prompt], seeded(None, n=4))
    assert len({tuple(o.token_ids) for o in fanned.outputs}) == 4
    assert len({tuple(r.outputs[0].token_ids) for r in generate(llm, [prompt] * 2, seeded(None))} |
               {tuple(o.outputs[0].token_ids) for o in outputs}) == 6  # and from one call to the next


# --- n > 1 ---

@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_compute_the_prompt_once_with_prefix_caching(prefix_caching, make_llm):
    llm = make_llm() if prefix_caching else make_llm(enable_prefix_caching=False)
    llm.core.kv.reset_prefix_cache()
    prompt = random_prompt(45, seed=350)  # 2 full blocks of 16 and 13 tokens in a partial block
    before = llm.core.num_prompt_tokens_computed
    [out] = generate(llm, [prompt], seeded(9, n=4, max_tokens=6))
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in out.outputs)
    computed = llm.core.num_prompt_tokens_computed - before
    # With the cache, the first sample computes the prompt and the others only its partial block.
    assert computed == (45 + 3 * 13 if prefix_caching else 4 * 45)
    assert_all_blocks_free(llm.core)


def test_aborting_the_parent_id_aborts_every_sample(make_llm):
    core = make_llm().core
    samples = core.add_request("fan", {"prompt_token_ids": random_prompt(10, seed=351)}, seeded(3, n=3, max_tokens=60))
    assert [s.request_id for s in samples] == ["0_fan", "1_fan", "2_fan"]
    while min(s.num_output_tokens for s in samples) < 2:
        core.step()
    final = core.abort("fan")
    assert final.request_id == "fan" and final.finished
    assert [(o.index, o.finish_reason) for o in final.outputs] == [(0, "abort"), (1, "abort"), (2, "abort")]
    assert all(s.status == RequestStatus.FINISHED_ABORTED for s in samples)
    assert not core.scheduler.requests and core.kv.num_free_blocks == core.kv.num_blocks
    later = []
    while core.has_unfinished:  # a step still in flight (async scheduling) ends without them
        later += core.step()
    assert later == []
    assert_all_blocks_free(core)


async def test_aborting_an_n_request_in_the_async_engine_ends_every_sample(make_async_engine):
    engine = make_async_engine()
    stream = engine.generate({"prompt_token_ids": random_prompt(10, seed=352)}, seeded(4, n=3, max_tokens=200),
                             request_id="fan")
    first = await asyncio.wait_for(stream.__anext__(), TIMEOUT)
    assert len(first.outputs) == 3 and not first.finished
    await engine.abort("fan")
    rest = await asyncio.wait_for(_drain(stream), TIMEOUT)
    assert rest[-1].finished and [o.finish_reason for o in rest[-1].outputs] == ["abort"] * 3
    assert all(len(o.token_ids) < 200 for o in rest[-1].outputs)


async def _drain(stream) -> list[RequestOutput]:
    return [out async for out in stream]


# --- logprobs ---

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logprobs_are_transformers_log_softmax(arch, make_llm, hf_models):
    llm = make_llm(arch)
    prompt = random_prompt(15, seed=360)
    [out] = generate(llm, [prompt], seeded(9, max_tokens=12, logprobs=5))
    completion = out.outputs[0]
    tokens = completion.token_ids
    reference = hf_logprobs(hf_models(arch), prompt + tokens)[len(prompt) - 1:-1]  # [12, vocab]: before each token
    assert len(completion.logprobs) == len(tokens) == 12
    for i, (token, entry) in enumerate(zip(tokens, completion.logprobs)):
        top = reference[i].topk(5).indices.tolist()
        assert token in entry and set(top) <= set(entry) and len(entry) <= 6
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(reference[i, t].item(), abs=1e-4), (i, t)
            assert lp.decoded_token == llm.tokenizer.decode([t])
        low, high = rank_bounds(reference[i], token)
        assert low <= entry[token].rank <= high, i
        assert [entry[t].rank for t in top if t != token] == [r for r, t in enumerate(top, 1) if t != token]
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(tokens, completion.logprobs)))
    assert completion.cumulative_logprob == pytest.approx(reference.gather(1, torch.tensor(tokens)[:, None]).sum().item(),
                                                          abs=1e-3)


def test_processed_logprobs_are_of_the_penalized_filtered_distribution(make_llm, hf_models):
    llm = make_llm("llama", logprobs_mode="processed_logprobs")
    prompt = random_prompt(15, seed=361)
    params = seeded(10, max_tokens=10, logprobs=3, temperature=0.7, top_k=5, presence_penalty=1.5)
    [out] = generate(llm, [prompt], params)
    tokens, entries = out.outputs[0].token_ids, out.outputs[0].logprobs
    with torch.no_grad():
        logits = hf_models("llama")(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    for i, (token, entry) in enumerate(zip(tokens, entries)):
        expected = processed(logits[i], row(params, output_ids=tokens[:i], prompt_ids=prompt)).log_softmax(-1)
        assert set(expected.topk(3).indices.tolist()) | {token} == set(entry)
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(expected[t].item(), abs=1e-4), (i, t)


def test_greedy_penalized_batch_takes_the_argmax_of_the_penalized_logits_at_every_step(make_llm, hf_models):
    # Decode steps after the first reuse the sampling metadata and upload one token per row
    # (MetadataCache + TokenHistories.advance): every step is checked against the formula.
    llm = make_llm("llama")
    prompts = [random_prompt(n, seed=400 + n) for n in (9, 14, 6)]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, **kw) for kw in (
        dict(repetition_penalty=1.4, frequency_penalty=0.6), dict(presence_penalty=1.5), dict(repetition_penalty=0.7))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, outs):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 12
        with torch.no_grad():
            logits = hf_models("llama")(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        for i, token in enumerate(tokens):
            expected = processed(logits[i], row(p, output_ids=tokens[:i], prompt_ids=prompt))
            top2 = expected.topk(2).values
            if top2[0] - top2[1] < 1e-4:  # a near tie: either token is right, the rest of the run differs
                break
            assert token == int(expected.argmax()), (p, i)


def test_each_request_of_a_batch_gets_the_logprobs_it_asked_for(make_llm):
    llm = make_llm()
    prompts = [random_prompt(12, seed=365 + i) for i in range(4)]
    asked = [(None, None), (0, 0), (2, 5), (7, 1)]  # (logprobs, prompt_logprobs)
    outputs = generate(llm, prompts, [seeded(i, max_tokens=4, logprobs=lp, prompt_logprobs=plp)
                                      for i, (lp, plp) in enumerate(asked)])
    for out, (lp, plp) in zip(outputs, asked):
        completion = out.outputs[0]
        if lp is None:
            assert completion.logprobs is None and out.prompt_logprobs is None
            continue
        for token, entry in zip(completion.token_ids, completion.logprobs):
            assert len(entry) == lp + (entry[token].rank > lp)  # the top lp, and the sampled one if not among them
        assert len(out.prompt_logprobs) == 12
        for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            assert len(entry) == plp + (entry[token].rank > plp)


def check_prompt_logprobs(out: RequestOutput, hf_model, n: int) -> None:
    prompt = out.prompt_token_ids
    reference = hf_logprobs(hf_model, prompt)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        entry, token = out.prompt_logprobs[j], prompt[j]
        top = reference[j - 1].topk(n).indices.tolist()
        assert token in entry and set(top) <= set(entry) and len(entry) <= n + 1
        assert entry[token].logprob == pytest.approx(reference[j - 1, token].item(), abs=1e-4), j
        low, high = rank_bounds(reference[j - 1], token)
        assert low <= entry[token].rank <= high, j


@pytest.mark.parametrize("chunked", [False, True])
def test_prompt_logprobs_are_transformers_log_softmax(chunked, make_llm, hf_models):
    llm = make_llm("llama", max_num_batched_tokens=16, enable_chunked_prefill=True) if chunked else make_llm("llama")
    steps = llm.core.num_steps
    [out] = generate(llm, [random_prompt(40, seed=370)], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))
    assert llm.core.num_steps - steps == (3 + 1 if chunked else 2)  # 16 + 16 + 8 prompt tokens, then a decode
    check_prompt_logprobs(out, hf_models("llama"), 2)


def test_prompt_logprobs_cover_a_prompt_already_in_the_prefix_cache(make_llm, hf_models):
    llm = make_llm("llama")
    prompt = random_prompt(40, seed=371)
    generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=2))  # now its 2 full blocks are cached
    [out] = generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    check_prompt_logprobs(out, hf_models("llama"), 1)


def test_prompt_logprobs_survive_preemption(make_llm, hf_models):
    llm = make_llm("llama", block_size=8, num_gpu_blocks_override=12)
    prompts = [random_prompt(20, seed=372 + i) for i in range(4)]
    before = llm.core.scheduler.num_preemptions
    outputs = generate(llm, prompts, seeded(1, max_tokens=40, prompt_logprobs=1))
    assert llm.core.scheduler.num_preemptions > before
    for out in outputs:
        check_prompt_logprobs(out, hf_models("llama"), 1)


@pytest.mark.parametrize("field, value", [("logprobs", 21), ("prompt_logprobs", 21), ("logprobs", -1),
                                          ("prompt_logprobs", -1)])
def test_logprobs_above_the_cap_are_refused_naming_the_field(field, value, make_llm):
    with pytest.raises(ValueError, match=rf"^{field} must be <= 20 \(--max-logprobs\)"):
        make_llm().core.add_request(None, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(**{field: value}))


def test_a_lower_max_logprobs_caps_requests_and_minus_one_lifts_the_cap(make_llm):
    llm = make_llm(max_logprobs=3)
    with pytest.raises(ValueError, match=r"^logprobs must be <= 3"):
        generate(llm, [[5, 6, 7]], seeded(1, max_tokens=2, logprobs=4))
    [out] = generate(llm, [[5, 6, 7]], seeded(1, max_tokens=2, logprobs=3))
    completion = out.outputs[0]
    # The sampled token and the top 3: four entries, three when the sampled token is among them.
    assert [len(e) for e in completion.logprobs] == [3 + (e[t].rank > 3) for t, e in zip(completion.token_ids, completion.logprobs)]
    [whole] = generate(make_llm(max_logprobs=-1), [[5, 6, 7]], seeded(1, max_tokens=2, logprobs=-1))
    vocab = llm.core.config.model.vocab_size
    assert [len(e) for e in whole.outputs[0].logprobs] == [vocab, vocab]
