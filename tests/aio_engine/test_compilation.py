"""torch.compile of the model between attention calls (aio_engine/compilation.py), on CPU: the
compiled pieces give transformers' greedy tokens, compile once per kind of piece for every token
count, call our kernels as custom ops when fusion is off, and keep their code on disk so that the
next start compiles from the cache. Piecewise and FULL CUDA graphs are checked on the GPU
(tests/gpu/test_engine_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from aio_engine import LLM
from aio_engine.compilation import cache_key

from .conftest import SMALL, _live_cores, random_prompt
from .test_llm import assert_hf_argmax, greedy, run


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="session")
def make_compiled(tiny_models, compile_cache):
    """make_compiled(arch, fusion) -> an LLM whose model runs as compiled pieces (built once)."""
    cache: dict[tuple, LLM] = {}

    def make(arch: str, fusion: bool = True) -> LLM:
        if (arch, fusion) not in cache:
            cc = {"mode": "compile", "pass_config": {"enable_fusion": fusion}, "cache_dir": str(compile_cache)}
            cache[arch, fusion] = LLM(model=str(tiny_models[arch]), compilation_config=cc, **SMALL)
            _live_cores.append(cache[arch, fusion].core)
        return cache[arch, fusion]

    yield make


def mixed_batch() -> tuple[list[list[int]], list]:
    lengths = [1, 5, 9, 17, 23, 31, 40, 52]
    prompts = [random_prompt(n, seed=30 + i) for i, n in enumerate(lengths)]
    return prompts, [greedy(m) for m in (8, 20, 12, 16, 9, 14, 20, 11)]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_compiled_pieces_give_hf_argmax_tokens(arch, make_compiled, hf_models):
    llm = make_compiled(arch)
    assert llm.core.runner.pieces is not None, "the model runs as compiled pieces"
    prompts, params = mixed_batch()
    outputs = run(llm, prompts, params)
    assert [len(t) for t in outputs] == [p.max_tokens for p in params]
    for prompt, tokens in zip(prompts, outputs):
        assert_hf_argmax(hf_models(arch), prompt, tokens)


def test_each_kind_of_piece_compiles_once_for_any_token_count(make_compiled):
    llm = make_compiled("qwen3")
    frames = counters["frames"]["ok"]
    # Steps of many token counts: prefills of every length, mixed batches, decodes of 1..8 rows.
    for n in (2, 3, 7, 64, 100):
        run(llm, [random_prompt(n, seed=n), random_prompt(n + 1, seed=n + 1)], greedy(3))
    run(llm, [random_prompt(6, seed=99)], greedy(4))
    assert counters["frames"]["ok"] == frames, "a step recompiled a piece"


def _profiled_ops(llm: LLM, prompt: list[int]) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(llm, [prompt], greedy(2))
    return {e.name for e in prof.events() if e.name.startswith("aio_engine::")}


def test_without_fusion_the_pieces_call_our_kernels_as_custom_ops(make_compiled, make_llm):
    prompts, params = mixed_batch()
    eager = run(make_llm("qwen3"), prompts, params)  # on CPU the default is eager
    unfused = make_compiled("qwen3", fusion=False)
    assert run(unfused, prompts, params) == eager
    ops = {"aio_engine::rms_norm", "aio_engine::fused_add_rms_norm", "aio_engine::rotary", "aio_engine::silu_and_mul"}
    assert _profiled_ops(unfused, prompts[3]) == ops
    # With fusion the same work is plain torch ops inside the compiled code: no custom op runs.
    assert _profiled_ops(make_compiled("qwen3"), prompts[3]) == set()


def test_a_second_start_compiles_from_the_disk_cache(make_compiled, tiny_models, compile_cache):
    first = make_compiled("llama")  # compiled (and cached) once already
    hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
    cc = {"mode": "compile", "pass_config": {"enable_fusion": True}, "cache_dir": str(compile_cache)}
    second = LLM(model=str(tiny_models["llama"]), compilation_config=cc, **SMALL)
    new_hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"] - hits
    assert new_hits >= 3, "each kind of piece (first, middle, last) came from the cache"
    assert any((compile_cache / "inductor").iterdir())
    prompts, params = mixed_batch()
    assert run(second, prompts, params) == run(first, prompts, params)


def test_another_token_budget_compiles_into_its_own_cache_folder(make_compiled, tiny_models, compile_cache):
    first = make_compiled("llama")
    folders = set((compile_cache / "inductor").iterdir())
    hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
    cc = {"mode": "compile", "pass_config": {"enable_fusion": True}, "cache_dir": str(compile_cache)}
    other = LLM(model=str(tiny_models["llama"]), compilation_config=cc, max_num_batched_tokens=96, **SMALL)
    _live_cores.append(other.core)
    assert counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"] == hits
    assert len(set((compile_cache / "inductor").iterdir()) - folders) == 1, "a folder of its own"
    assert cache_key(other.core.config) != cache_key(first.core.config)
    prompts, params = mixed_batch()
    assert run(other, prompts, params) == run(first, prompts, params)


def test_pieces_over_padded_buffers_give_the_hidden_states_of_the_batch(make_compiled):
    """What a piecewise graph replays: the pieces over a batch padded to a capture size, attention
    over its own tokens only. The padding changes nothing and writes no KV."""
    runner = make_compiled("qwen3").core.runner
    last = runner.num_blocks - 1  # blocks no test reaches (free ones are taken from the front)
    seqs = [(random_prompt(7, seed=1), 0, [last]), (random_prompt(1, seed=2), 20, [last - 2, last - 1])]
    input_ids, positions, meta, _ = runner._build_batch(seqs, [0, 1])
    n, size = input_ids.shape[0], 16
    padded_ids = torch.cat([input_ids, torch.randint(0, 400, (size - n,))])
    padded_positions = torch.cat([positions, torch.arange(size - n)])
    with torch.inference_mode():
        expected = runner.pieces.forward(input_ids, positions, runner.kv_caches, meta).clone()
        kv_before = [kv.clone() for kv in runner.kv_caches]
        hidden = runner.pieces.forward_in_buffers(padded_ids, padded_positions, runner.kv_caches, meta)
    assert hidden.shape[0] == n
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    for before, after in zip(kv_before, runner.kv_caches):  # the batch's keys again, nothing for padding
        assert torch.equal(before, after)
