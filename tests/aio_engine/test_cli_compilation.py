"""-O levels and compilation settings: each level's defaults, every explicit setting winning over the
level, --enforce-eager, capture sizes, and the config logged once. CUDA graphs exist on CUDA only,
so resolution is checked with device=cuda directly (nothing runs on it)."""

from __future__ import annotations

import logging

import pytest
import torch

from aio_engine.cli import engine_args_from, parse_serve_args
from aio_engine.config import CUDAGRAPH_MODES, EngineArgs, resolve_compilation_config

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(autouse=True)
def _collect():
    """No engine here: skip the shared per-test gc.collect."""
    yield


def resolve(*argv: str, device: torch.device = CUDA):
    return resolve_compilation_config(engine_args_from(parse_serve_args(list(argv))), device)


SIZES_512 = [1, 2, 4, *range(8, 513, 8)]
# Token counts up to the budget (8192 on CUDA): max_num_seqs (256) caps only the FULL graphs.
DEFAULT_SIZES = [*SIZES_512, *range(576, 2049, 64), *range(2304, 8193, 256)]


@pytest.mark.parametrize("level, mode, graphs, fusion, autotune", [
    (0, "none", "NONE", False, False),
    (1, "compile", "PIECEWISE", False, False),
    (2, "compile", "FULL_AND_PIECEWISE", True, False),
    (3, "compile", "FULL_AND_PIECEWISE", True, True),
])
def test_each_level_sets_its_defaults(level, mode, graphs, fusion, autotune):
    cc = resolve(f"-O{level}")
    assert (cc.level, cc.mode, cc.cudagraph_mode, cc.enable_fusion) == (level, mode, graphs, fusion)
    assert cc.inductor_compile_config.get("max_autotune", False) is autotune
    assert cc.cudagraph_capture_sizes == ([] if graphs == "NONE" else DEFAULT_SIZES)
    assert cc.full_capture_sizes == ([] if graphs == "NONE" else [1, 2, 4, *range(8, 257, 8)])
    assert cc.user_set == ()
    assert resolve().level == 2  # the default level


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("graphs", CUDAGRAPH_MODES)
def test_cudagraph_mode_given_wins_over_every_level(level, graphs):
    cc = resolve(f"-O{level}", f"-cc.cudagraph_mode={graphs}")
    assert cc.cudagraph_mode == graphs and cc.user_set == ("cudagraph_mode",)
    assert (cc.cudagraph_capture_sizes == []) is (graphs == "NONE")
    assert cc.full_decode_graphs is (graphs in ("FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"))
    assert cc.piecewise_graphs is (graphs in ("PIECEWISE", "FULL_AND_PIECEWISE"))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["none", "compile"])
def test_compile_mode_given_wins_over_every_level(level, mode):
    assert resolve(f"-O{level}", "-cc.mode", mode).mode == mode


@pytest.mark.parametrize("value, mode", [("0", "none"), ("3", "compile"), ("VLLM_COMPILE", "compile"),
                                         ("NONE", "none"), ("stock_torch_compile", "compile")])
def test_vllm_names_of_modes_are_understood(value, mode):
    assert resolve("-O1", f"-cc.mode={value}").mode == mode


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("fusion", [True, False])
def test_fusion_and_autotune_given_win_over_every_level(level, fusion):
    cc = resolve(f"-O{level}", f"-cc.pass_config.enable_fusion={str(fusion).lower()}",
                 f"-cc.inductor_compile_config.max_autotune={str(fusion).lower()}")
    assert cc.enable_fusion is fusion and cc.inductor_compile_config == {"max_autotune": fusion}
    assert set(cc.user_set) == {"pass_config.enable_fusion", "inductor_compile_config.max_autotune"}


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_enforce_eager_means_no_graphs_and_no_compile_at_every_level(level):
    cc = resolve(f"-O{level}", "--enforce-eager")
    assert (cc.mode, cc.cudagraph_mode, cc.cudagraph_capture_sizes) == ("none", "NONE", [])
    assert cc.level == level and cc.enforce_eager and "enforce_eager" in cc.user_set
    # compile may still be asked for explicitly; graphs not
    assert resolve(f"-O{level}", "--enforce-eager", "-cc.mode=compile").mode == "compile"
    assert resolve(f"-O{level}", "--enforce-eager", "-cc.cudagraph_mode=NONE").cudagraph_mode == "NONE"
    with pytest.raises(ValueError, match="enforce_eager means cudagraph_mode NONE"):
        resolve(f"-O{level}", "--enforce-eager", "-cc.cudagraph_mode=FULL")


def test_capture_sizes_from_flags_or_cc_capped_by_tokens_full_graphs_by_seats():
    assert resolve("--cudagraph-capture-sizes", "4", "1", "2").cudagraph_capture_sizes == [1, 2, 4]
    assert resolve("-cc.cudagraph_capture_sizes=[1,3]").cudagraph_capture_sizes == [1, 3]
    assert resolve("-cc.cudagraph_capture_sizes+=1,3", "--cudagraph-capture-sizes", "1", "3").cudagraph_capture_sizes == [1, 3]
    assert resolve("--max-cudagraph-capture-size", "16").cudagraph_capture_sizes == [1, 2, 4, 8, 16]
    assert resolve("-cc.max_cudagraph_capture_size=12").cudagraph_capture_sizes == [1, 2, 4, 8, 12]
    assert resolve("--max-num-batched-tokens", "10").max_cudagraph_capture_size == 10
    assert resolve("--max-num-batched-tokens", "100").cudagraph_capture_sizes == [1, 2, 4, *range(8, 97, 8), 100]
    # FULL decode graphs: up to the first size that seats max_num_seqs rows; piecewise: every size
    cc = resolve("--max-num-seqs", "20")
    assert cc.cudagraph_capture_sizes == DEFAULT_SIZES and cc.full_capture_sizes == [1, 2, 4, 8, 16, 24]
    assert resolve("--max-cudagraph-capture-size", "512").cudagraph_capture_sizes == SIZES_512  # vLLM's default
    cc = resolve("--cudagraph-capture-sizes", "1", "64", "--max-num-seqs", "32")
    assert cc.cudagraph_capture_sizes == [1, 64] and cc.full_capture_sizes == [1, 64]
    assert resolve("--cudagraph-capture-sizes", "1", "8", "--max-num-seqs", "32").full_capture_sizes == [1, 8]
    assert resolve("--max-num-seqs", "8").full_capture_sizes == [1, 2, 4, 8]
    # beyond 512 tokens every 64, beyond 2048 every 256 (a graph per piece and size), up to the largest
    cc = resolve("--max-cudagraph-capture-size", "1000")
    assert cc.cudagraph_capture_sizes == [*SIZES_512, 576, 640, 704, 768, 832, 896, 960, 1000]
    assert cc.full_capture_sizes == [1, 2, 4, *range(8, 257, 8)]
    assert resolve("--max-cudagraph-capture-size", "9000").cudagraph_capture_sizes == DEFAULT_SIZES  # 8192 tokens
    # the budget is the default, up to 8192; beyond it every 1024 when asked for
    assert resolve("--max-num-batched-tokens", "4000").cudagraph_capture_sizes[-3:] == [3584, 3840, 4000]
    assert resolve("--max-num-batched-tokens", "12000").cudagraph_capture_sizes == DEFAULT_SIZES
    sizes = resolve("--max-num-batched-tokens", "12000", "--max-cudagraph-capture-size", "12000").cudagraph_capture_sizes
    assert sizes == [*DEFAULT_SIZES, 9216, 10240, 11264, 12000]
    # the budget as EngineConfig resolved it (without chunked prefill: at least max_model_len)
    args = engine_args_from(parse_serve_args(["--no-enable-chunked-prefill"]))
    assert resolve_compilation_config(args, CUDA, 4000).cudagraph_capture_sizes[-1] == 4000
    cc = resolve("-O3", "--cudagraph-capture-sizes", "8")
    assert cc.cudagraph_capture_sizes == [8] and cc.cudagraph_mode == "FULL_AND_PIECEWISE"


@pytest.mark.parametrize("argv, message", [
    (["-cc.cudagraph_mode=SOMETIMES"], "cudagraph_mode must be one of"),
    (["-cc.mode=jit"], "mode must be one of"),
    (["-cc.level=3"], "unknown keys ['level']"),
    (["-cc.pass_config.fuse_everything=true"], "pass_config has unknown keys ['fuse_everything']"),
    (["-cc.pass_config.enable_fusion=1"], "enable_fusion must be true or false"),
    (["-cc.cudagraph_capture_sizes=[0]"], "positive integers"),
    (["-cc.max_cudagraph_capture_size=0"], "max_cudagraph_capture_size must be an integer >= 1"),
    (["--cudagraph-capture-sizes", "1", "-cc.cudagraph_capture_sizes=[2]"], "given twice"),
    (["--max-cudagraph-capture-size", "8", "-cc.max_cudagraph_capture_size=16"], "given twice"),
])
def test_bad_compilation_settings_are_refused_by_name(argv, message):
    with pytest.raises(ValueError) as info:
        resolve(*argv)
    assert message in str(info.value)


def test_no_cuda_graphs_off_cuda_and_no_compile_unless_asked():
    assert resolve("-O3", device=CPU).cudagraph_mode == "NONE"
    cc = resolve("-O3", "-cc.cudagraph_mode=FULL", device=CPU)
    assert (cc.cudagraph_mode, cc.cudagraph_capture_sizes, cc.mode) == ("NONE", [], "none")
    assert resolve("-O1", "-cc.mode=compile", device=CPU).mode == "compile"
    assert resolve("-O2", device=CUDA).mode == "compile"


def test_compile_cache_dir_defaults_under_the_home_cache_and_can_be_set():
    assert resolve().cache_dir == "~/.cache/aio-engine"
    cc = resolve("-cc.cache_dir=/tmp/aio-cache")
    assert cc.cache_dir == "/tmp/aio-cache" and cc.user_set == ("cache_dir",)
    with pytest.raises(ValueError, match="cache_dir must be a folder path"):
        resolve('-cc={"cache_dir": 3}')


def test_resolved_compilation_config_is_logged_once_at_build(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="aio_engine.config"):
        config = EngineArgs(model=str(tiny_models["llama"]), optimization_level=1,
                            compilation_config={"mode": "none"}).create_engine_config()
    lines = [r.getMessage() for r in caplog.records if "compilation config" in r.getMessage()]
    assert len(lines) == 1
    assert "-O1: mode=none" in lines[0] and "set by the user: mode" in lines[0]
    assert config.compilation.mode == "none"
