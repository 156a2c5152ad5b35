"""Greedy parity with Hugging Face transformers through the offline LLM, for every supported
architecture: alone, batched, with chunked prefill, under preemption and with prefix caching."""

from __future__ import annotations

import pytest
import torch

from aio_engine import LLM, SamplingParams

from .conftest import ALL_ARCHS, random_prompt


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    return [o.outputs[0].token_ids for o in outputs]


def assert_hf_argmax(hf_model, prompt: list[int], generated: list[int], tol: float = 1e-4) -> None:
    """Each generated token is an argmax of transformers' logits at its position (ties allowed)."""
    assert generated, "nothing was generated"
    ids = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(prompt) - 1:]  # [len(generated), vocab]
    chosen = logits.gather(1, torch.tensor(generated)[:, None])[:, 0]
    gap = logits.max(dim=-1).values - chosen
    bad = [(i, generated[i], round(float(gap[i]), 6)) for i in range(len(generated)) if gap[i] > tol]
    assert not bad, f"(position, token, logit gap to the max) not an argmax: {bad}"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_single_prompt_greedy_is_hf_argmax(arch, make_llm, hf_models):
    prompt = random_prompt(20, seed=1)
    [tokens] = run(make_llm(arch), [prompt], greedy(24))
    assert len(tokens) == 24
    assert_hf_argmax(hf_models(arch), prompt, tokens)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_greedy_equals_hf_generate(arch, make_llm, hf_models):
    prompt = random_prompt(12, seed=2)
    [tokens] = run(make_llm(arch), [prompt], greedy(16))
    hf = hf_models(arch)
    with torch.no_grad():
        # min_new_tokens keeps HF from stopping at eos, like ignore_eos does here.
        reference = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert tokens == reference[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_mixed_length_batch_is_hf_argmax(arch, make_llm, hf_models):
    lengths = [1, 5, 9, 17, 23, 31, 40, 52]
    prompts = [random_prompt(n, seed=10 + i) for i, n in enumerate(lengths)]
    max_tokens = [8, 20, 12, 16, 9, 14, 20, 11]
    outputs = run(make_llm(arch), prompts, [greedy(m) for m in max_tokens])
    assert [len(t) for t in outputs] == max_tokens
    for prompt, tokens in zip(prompts, outputs):
        assert_hf_argmax(hf_models(arch), prompt, tokens)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_chunked_prefill_within_budget_is_hf_argmax(arch, make_llm, hf_models, monkeypatch):
    llm = make_llm(arch, max_num_batched_tokens=16, enable_chunked_prefill=True)
    step_sizes: list[int] = []
    schedule = llm.core.schedule

    def spy():
        out = schedule()
        step_sizes.append(out.num_tokens)
        return out

    monkeypatch.setattr(llm.core, "schedule", spy)
    prompts = [random_prompt(n, seed=20 + n) for n in (37, 20, 50)]
    outputs = run(llm, prompts, greedy(12))
    assert max(step_sizes) == 16  # the budget was used to the full and never exceeded
    assert sum(step_sizes) >= sum(map(len, prompts))
    for prompt, tokens in zip(prompts, outputs):
        assert len(tokens) == 12
        assert_hf_argmax(hf_models(arch), prompt, tokens)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_preempted_requests_resume_with_hf_argmax_tokens(arch, make_llm, hf_models):
    # 4 requests of 20 + 40 tokens need 8 blocks of 8 each; the cache holds 12 blocks in all.
    llm = make_llm(arch, block_size=8, num_gpu_blocks_override=12)
    before = llm.core.scheduler.num_preemptions
    prompts = [random_prompt(20, seed=30 + i) for i in range(4)]
    outputs = run(llm, prompts, greedy(40))
    assert llm.core.scheduler.num_preemptions > before
    for prompt, tokens in zip(prompts, outputs):
        assert len(tokens) == 40
        assert_hf_argmax(hf_models(arch), prompt, tokens)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_shared_prefix_is_computed_once_and_outputs_match_uncached(arch, make_llm, hf_models):
    llm = make_llm(arch)  # block_size 16, prefix caching on by default
    llm.core.kv.reset_prefix_cache()
    prefix = random_prompt(48, seed=40)
    first, second = prefix + random_prompt(7, seed=41), prefix + random_prompt(5, seed=42)
    run(llm, [first], greedy(4))

    computed_before = llm.core.num_prompt_tokens_computed
    [output] = llm.generate({"prompt_token_ids": second}, greedy(20), use_tqdm=False)
    assert llm.core.num_prompt_tokens_computed - computed_before == len(second) - 48
    assert output.num_cached_tokens == 48

    [uncached] = run(make_llm(arch, enable_prefix_caching=False), [second], greedy(20))
    assert output.outputs[0].token_ids == uncached
    assert_hf_argmax(hf_models(arch), second, uncached)


def test_generation_that_outgrows_the_whole_cache_ends_with_length(make_llm):
    # 4 blocks of 8 hold 32 tokens; the request would need 70: it must end, not preempt itself forever.
    llm = make_llm("llama", block_size=8, num_gpu_blocks_override=4)
    [output] = llm.generate({"prompt_token_ids": random_prompt(10, seed=50)}, greedy(60), use_tqdm=False)
    completion = output.outputs[0]
    assert completion.finish_reason == "length"
    assert 10 + len(completion.token_ids) == 4 * 8  # the cache's size caps the length like max_model_len


def test_outputs_come_back_in_prompt_order_under_priority(make_llm):
    llm = make_llm("llama", scheduling_policy="priority")
    prompts = [random_prompt(n, seed=60 + n) for n in (30, 3, 12)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(5), use_tqdm=False,
                           priority=[2, 0, 1])
    assert [o.prompt_token_ids for o in outputs] == prompts
    # The same prompts without priorities give the same tokens: priority changes order, not results.
    assert [o.outputs[0].token_ids for o in outputs] == run(make_llm("llama"), prompts, greedy(5))


def test_sliding_window_changes_tokens_past_the_window(make_llm):
    # mistral and mistral_window share weights (same seed); only the window of 24 differs.
    prompt = random_prompt(40, seed=70)
    [full] = run(make_llm("mistral"), [prompt], greedy(8))
    [windowed] = run(make_llm("mistral_window"), [prompt], greedy(8))
    assert full != windowed


def test_failing_forward_raises_from_generate_and_frees_blocks(make_llm, monkeypatch):
    llm = make_llm("llama")
    forward = llm.core.runner.model.forward
    calls = 0

    def flaky_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom in forward")
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm.core.runner.model, "forward", flaky_forward)
    prompts = [random_prompt(9, seed=80 + i) for i in range(3)]
    with pytest.raises(RuntimeError, match="boom in forward"):
        run(llm, prompts, greedy(10))
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
    # The next batch runs normally.
    assert [len(t) for t in run(llm, prompts, greedy(10))] == [10, 10, 10]
