"""Sampling on CUDA: the CPU suite's exact, statistical and reproducibility tests collected again
with a CUDA `device` (so every draw goes through the Triton kernels), the kernels against their
references at batch 256 and Qwen's vocabulary, CUDA draws equal to CPU draws, no host sync in the
sampler (nor in building its metadata), and seeded requests through the engine."""

from __future__ import annotations

import pytest
import torch

from aio_engine import LLM, SamplingParams
from kernels.sampling import gumbel_argmax_triton
from kernels.sampling_topk import draw_unsettled_reference, draw_unsettled_triton
from sampling.metadata import SamplingMetadata
from sampling.sampler import Sampler

# The CPU suite's tests imported here are collected again, on CUDA (the `device` fixture below;
# the kernel tests pick CUDA for their Triton side themselves).
from tests.kernels.test_sampling_kernel import (  # noqa: F401
    assert_same_draws,
    random_inputs,
    test_draw_writes_the_given_rows_only_and_skips_the_skipped,
    test_greedy_draw_is_argmax_with_the_first_of_tied_maxima,
    test_kernel_draws_the_reference_token,
    test_kernel_reads_rows_of_a_strided_view,
    test_kernel_writes_every_row_of_a_poisoned_output,
    test_penalties_follow_the_formula_over_each_rows_history,
)
from tests.kernels.test_sampling_topk import (  # noqa: F401
    random_filters,
    random_rows,
    test_candidate_keys_order_by_value_then_lower_id_and_decode_back,
    test_candidates_are_the_exact_top_n,
    test_candidates_flag_rows_whose_ties_overflow_the_buffer_and_are_never_wrong,
    test_draw_among_candidates_matches_the_reference,
    test_exact_search_finds_the_kept_sets_edge,
    test_window_and_search_keep_the_same_tokens_and_draw_the_same_one,
)
from tests.sampling.reference import random_logits, row, sample
from tests.sampling.test_distribution import (  # noqa: F401
    test_draws_across_rows_follow_the_distribution,
    test_draws_across_steps_of_one_seed_follow_the_distribution,
    test_draws_with_penalties_and_bias_follow_the_processed_distribution,
)
from tests.sampling.test_metadata_cache import (  # noqa: F401
    test_a_step_with_banned_ids_is_built_fresh_and_not_kept,
    test_other_rows_order_or_seeds_take_a_full_build,
    test_penalized_rows_that_did_not_grow_by_one_token_take_a_full_build,
    test_penalized_rows_that_grew_by_one_token_reuse_the_metadata_and_draw_what_a_fresh_build_draws,
    test_same_rows_reuse_the_metadata_and_draw_what_a_fresh_build_draws,
    test_steps_laid_out_alike_see_their_metadata_at_the_same_addresses,
)
from tests.sampling.test_sampler import (  # noqa: F401
    random_others,
    test_a_seeded_row_draws_the_same_tokens_whatever_the_batch,
    test_a_top_k_beyond_the_window_keeps_exactly_the_k_best,
    test_allowed_token_ids_hold_every_draw_and_leave_other_rows_alone,
    test_banned_ids_are_never_drawn,
    test_greedy_rows_take_the_argmax,
    test_greedy_rows_take_the_argmax_beside_sampled_rows,
    test_logit_bias_of_minus_100_never_samples_the_token,
    test_logit_bias_of_plus_100_always_samples_the_token,
    test_logprobs_are_of_the_logits_the_mode_names,
    test_penalties_match_the_reference_formula,
    test_penalties_on_hand_worked_logits,
    test_rows_the_window_cannot_settle_follow_their_distribution,
    test_token_histories_follow_lists_appended_step_by_step,
    test_top_k_one_equals_greedy,
    test_top_k_one_is_greedy_on_tied_logits,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu on the GPU machine)")

QWEN_VOCAB = 151936


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


def test_triton_kernel_equals_the_reference_at_batch_256_and_qwen_vocab():
    inputs = random_inputs(256, QWEN_VOCAB, seed=0, device=torch.device("cuda"))
    out = gumbel_argmax_triton(*inputs)
    assert_same_draws(out, *inputs, tie=1e-5)


def test_greedy_kernel_is_argmax_at_batch_256_and_qwen_vocab():
    test_greedy_draw_is_argmax_with_the_first_of_tied_maxima("triton", 256, QWEN_VOCAB)


@pytest.mark.parametrize("n", [50, 256])
@pytest.mark.parametrize("ties", [False, True])
def test_candidates_are_exact_at_batch_256_and_qwen_vocab(n, ties):
    test_candidates_are_the_exact_top_n("triton", 256, QWEN_VOCAB, n, ties)


def test_draw_among_candidates_matches_the_reference_at_batch_256_and_qwen_vocab():
    test_draw_among_candidates_matches_the_reference("triton", 256, QWEN_VOCAB, 256)


def test_window_and_search_agree_at_batch_256_and_qwen_vocab():
    test_window_and_search_keep_the_same_tokens_and_draw_the_same_one("triton", 256, QWEN_VOCAB, 64)


def test_exact_search_matches_the_reference_at_qwen_vocab():
    rows = 12
    x, inv_temp, floor = random_rows(rows, QWEN_VOCAB, seed=5, device=torch.device("cuda"), ties=True)
    top_k, top_p, keys = random_filters(rows, QWEN_VOCAB, 64, seed=5, device=torch.device("cuda"))
    pick = torch.arange(rows - 1, -1, -1, device="cuda")
    ok = torch.arange(rows, device="cuda") % 5 == 0
    results = []
    for draw, dev in ((draw_unsettled_triton, "cuda"), (draw_unsettled_reference, "cpu")):
        args = [t.to(dev) for t in (x, pick, ok, keys, inv_temp, floor, top_k, top_p)]
        out = torch.full((rows,), -7, dtype=torch.int64, device=dev)
        cut = torch.full((rows,), 7.0, device=dev)
        draw(*args, out, cut)
        results.append((out.cpu(), cut.cpu()))
    (out, cut), (out_ref, cut_ref) = results
    assert torch.equal(cut, cut_ref)
    assert (out != out_ref).sum() <= 1  # a near-tie of two scores could part them


def test_penalties_at_batch_256_and_qwen_vocab():
    test_penalties_follow_the_formula_over_each_rows_history("triton", 256, QWEN_VOCAB, 400)


def test_penalty_kernel_compiles_once_whatever_the_rows_and_history_width():
    """Rows and the longest history change every step: none of them may compile a new kernel (a
    compile holds the engine loop ~50 ms)."""
    from kernels.sampling import _penalty_kernel, apply_penalties_triton
    from tests.kernels.test_sampling_kernel import random_histories

    device = torch.device("cuda")
    _penalty_kernel.device_caches.clear()  # count this test's compiles only
    widths = set()
    for num_rows, longest in [(1, 5), (7, 37), (16, 300), (48, 1000), (3, 2049), (64, 64)]:
        ids, ranges, factors, width = random_histories(num_rows, 5000, seed=num_rows, device=device, longest=longest)
        apply_penalties_triton(torch.randn(num_rows, 5000, device=device), ids, ranges, factors, width)
        widths.add(width)
    torch.cuda.synchronize()
    assert len(widths) >= 5
    assert len(_penalty_kernel.device_caches[torch.cuda.current_device()][0]) == 1


def test_cuda_draws_the_tokens_the_cpu_draws():
    # Both sides hash the same integers, so only float rounding could part them (at near-ties).
    others = random_others(64, seed=30)
    logits = random_logits(64, 5000, seed=31, scale=1.0)
    on_cpu = sample(logits, others, "cpu").token_ids
    on_cuda = sample(logits, others, "cuda").token_ids.cpu()
    assert (on_cpu != on_cuda).sum() <= 1, (on_cpu != on_cuda).nonzero()[:, 0].tolist()


def test_the_sampler_never_syncs_with_the_host():
    rows = [row(SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, presence_penalty=0.5,
                               frequency_penalty=0.5, repetition_penalty=1.1, logit_bias={3: 1.0},
                               logprobs=5), seed=i, output_ids=list(range(i, i + 40)), prompt_ids=[1, 2, 3],
                banned_ids=[7]) for i in range(32)]
    rows += [row(SamplingParams(temperature=0, allowed_token_ids=[5, 6, 7], logprobs=5)),
             row(SamplingParams(temperature=1.0, top_p=0.5, logprobs=5), seed=99)]
    rows += [row(SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, logprobs=5), seed=100 + i) for i in range(4)]
    logits = random_logits(len(rows), QWEN_VOCAB, seed=32).cuda()  # flat: the top-p rows take the search
    sampler = Sampler()
    md = SamplingMetadata.build(rows, QWEN_VOCAB, torch.device("cuda"), "processed_logprobs", sampler.histories)
    sampler(logits.clone(), md)  # compiles the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, md)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.shape == (len(rows),) and out.logprob_ids.shape == (len(rows), 6)


def test_building_metadata_never_syncs_with_the_host():
    # One pinned buffer, one non-blocking copy; the histories append on the device.
    sampler = Sampler()
    lists = [list(range(i, i + 60)) for i in range(64)]
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                            presence_penalty=0.3, logit_bias={9: 1.0}, allowed_token_ids=list(range(500)), logprobs=3)

    def build():
        rows = [row(params, seed=i, step=len(t)) for i, t in enumerate(lists)]
        for r, t in zip(rows, lists):
            r.token_ids, r.num_prompt_tokens = t, 20
            t.append(len(t) % 500)
        return SamplingMetadata.build(rows, QWEN_VOCAB, torch.device("cuda"), "raw_logprobs", sampler.histories)

    build()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        md = build()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = sampler(random_logits(len(lists), QWEN_VOCAB, seed=33).cuda(), md)
    assert set(out.token_ids.tolist()) <= set(range(500))


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=256, gpu_memory_utilization=0.2)


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def tokens_of(llm: LLM, prompts, params) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_batch_of_32_on_cuda(llm):
    assert llm.core.config.device.type == "cuda"
    prompt = random_prompt(20, seed=40)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=77, max_tokens=24, ignore_eos=True)
    [alone] = tokens_of(llm, [prompt], params)
    gen = torch.Generator().manual_seed(41)
    others = [random_prompt(int(torch.randint(3, 60, (), generator=gen)), seed=100 + i) for i in range(32)]
    others_params = [SamplingParams(temperature=[0.0, 1.0, 0.7][i % 3], top_k=[0, 20][i % 2], seed=i if i % 4 else None,
                                    max_tokens=int(torch.randint(4, 30, (), generator=gen)), ignore_eos=True)
                     for i in range(32)]
    for position in (0, 13, 32):
        batch = tokens_of(llm, others[:position] + [prompt] + others[position:],
                          others_params[:position] + [params] + others_params[position:])
        assert batch[position] == alone, position
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks


def test_n4_with_a_seed_gives_four_different_reproducible_samples_on_cuda(llm):
    prompt = random_prompt(14, seed=42)
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    [first] = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    samples = [o.token_ids for o in first.outputs]
    assert [o.index for o in first.outputs] == [0, 1, 2, 3] and len({tuple(s) for s in samples}) == 4
    [again] = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert [o.token_ids for o in again.outputs] == samples
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
