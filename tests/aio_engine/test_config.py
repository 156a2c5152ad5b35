"""EngineArgs -> EngineConfig: sizes in 32k forms, and clear ValueErrors for what cannot work."""

from __future__ import annotations

import json
import shutil

import pytest

from aio_engine import EngineArgs
from aio_engine.config import parse_size


@pytest.mark.parametrize("text, value", [
    ("1k", 1000), ("1K", 1024), ("32k", 32000), ("32K", 32768), ("0.5k", 500), ("1m", 1_000_000),
    ("1M", 1 << 20), ("2048", 2048), (300, 300), ("auto", None), ("-1", None), (None, None),
])
def test_parse_size_reads_k_and_m_forms(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["1x", "k", "12 k", "-5", ""])
def test_parse_size_refuses_other_forms(text):
    with pytest.raises(ValueError, match="max_model_len"):
        parse_size(text)


def config(path, **kwargs):
    return EngineArgs(model=str(path), **kwargs).create_engine_config()


def test_max_model_len_accepts_k_forms_and_defaults_to_the_model_limit(tiny_models):
    assert config(tiny_models["llama"], max_model_len="0.25k").model.max_model_len == 250
    assert config(tiny_models["llama"], max_model_len="0.5K").model.max_model_len == 512
    built = config(tiny_models["llama"])
    assert built.model.max_model_len == 512  # max_position_embeddings of the tiny models
    assert built.scheduler.max_model_len == 512


def test_max_model_len_above_the_model_limit_is_refused(tiny_models):
    with pytest.raises(ValueError, match=r"max_model_len \(1000\).*limit \(512\)"):
        config(tiny_models["llama"], max_model_len="1k")


@pytest.mark.parametrize("block_size", [7, 0, 12, 512])
def test_block_size_outside_the_supported_sizes_is_refused(block_size, tiny_models):
    with pytest.raises(ValueError, match=r"block_size must be one of \(1, 8, 16"):
        config(tiny_models["llama"], block_size=block_size)


def test_batch_budget_below_max_model_len_without_chunked_prefill_is_refused(tiny_models):
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(64\) is smaller than max_model_len \(128\)"):
        config(tiny_models["llama"], max_model_len=128, max_num_batched_tokens=64, enable_chunked_prefill=False)
    # The same budget is fine when long prompts can be chunked.
    assert config(tiny_models["llama"], max_model_len=128, max_num_batched_tokens=64).scheduler.max_num_batched_tokens == 64


def test_budget_without_chunked_prefill_defaults_to_cover_max_model_len(tiny_models):
    built = config(tiny_models["llama"], max_model_len=512, enable_chunked_prefill=False, device="cpu")
    assert built.scheduler.max_num_batched_tokens >= 512


def test_unknown_architecture_is_refused_naming_the_supported_ones(tiny_models, tmp_path):
    folder = tmp_path / "foo"
    shutil.copytree(tiny_models["llama"], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["architectures"] = ["FooForCausalLM"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as info:
        config(folder)
    message = str(info.value)
    assert "FooForCausalLM" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        config(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("gpu_memory_utilization", 0), ("gpu_memory_utilization", 1.5), ("num_gpu_blocks_override", 0),
    ("max_num_seqs", 0), ("stream_interval", 0), ("optimization_level", 4), ("tensor_parallel_size", 2),
    ("max_num_batched_tokens", 0), ("dtype", "int8"),
])
def test_out_of_range_settings_are_refused_by_name(field, value, tiny_models):
    with pytest.raises(ValueError, match=field):
        config(tiny_models["llama"], **{field: value})


def test_disable_sliding_window_caps_max_model_len_at_the_window(tiny_models):
    assert config(tiny_models["mistral_window"], disable_sliding_window=True).model.max_model_len == 24
    assert config(tiny_models["mistral_window"]).model.max_model_len == 512


def test_model_shapes_are_read_from_the_checkpoint(tiny_models):
    llama, qwen3 = config(tiny_models["llama"]), config(tiny_models["qwen3"])
    assert (llama.model.num_layers, llama.model.num_kv_heads, llama.model.head_dim, llama.model.vocab_size) == (2, 2, 16, 512)
    assert qwen3.model.head_dim == 32
    assert qwen3.model.architecture == "Qwen3ForCausalLM"
