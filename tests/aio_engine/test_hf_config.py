"""config.json read without transformers (aio_engine/models/hf_config.py) gives our models the
same view as transformers' AutoConfig: defaults, derived fields, sliding windows, rope."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from aio_engine.models import model_class
from aio_engine.models.hf_config import CLASS_DEFAULTS, load_hf_config
from aio_engine.models.layers import rope_cache
from aio_engine.models.llama import sliding_window_of

ROOT = Path(__file__).resolve().parents[2]
CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}


@pytest.mark.parametrize("model_type", sorted(CLASS_DEFAULTS))
def test_class_defaults_are_transformers_defaults(model_type):
    fields = {f.name: f.default for f in dataclasses.fields(CONFIG_CLASSES[model_type])}
    for key, value in CLASS_DEFAULTS[model_type].items():
        if key == "architectures":
            continue
        assert key in fields and fields[key] == value, (model_type, key, value, fields.get(key, "missing"))


def view(config) -> dict:
    """Everything our model classes and EngineConfig read from a config."""
    model = model_class(config.architectures)
    with torch.device("meta"):
        built = model(config)
    layers = built.model.layers
    attn = layers[0].self_attn
    head_dim = attn.head_dim
    return {
        "class": model.__name__, "structure": repr(built), "tied": built.tie_word_embeddings,
        "heads": (attn.num_heads, attn.num_kv_heads, head_dim),
        "windows": [sliding_window_of(config, i) for i in range(len(layers))],
        "eps": layers[0].input_layernorm.eps if hasattr(layers[0].input_layernorm, "eps") else None,
        "rope": rope_cache(config, head_dim, 64),
        "vocab": config.vocab_size, "max_positions": getattr(config, "max_position_embeddings", None),
        "dtype": str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)).replace("torch.", ""),
    }


def assert_same_view(folder: Path) -> None:
    ours = load_hf_config(folder)
    assert not isinstance(ours, transformers.PreTrainedConfig), "read through transformers, not by itself"
    theirs = transformers.AutoConfig.from_pretrained(folder)
    a, b = view(ours), view(theirs)
    rope_a, rope_b = a.pop("rope"), b.pop("rope")
    assert a == b
    torch.testing.assert_close(rope_a, rope_b, rtol=0, atol=0)


def saved(tmp_path: Path, name: str, config) -> Path:
    """Saved as transformers saves it: fields equal to the class defaults are left out."""
    folder = tmp_path / name
    config.architectures = [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                             "llama": "LlamaForCausalLM"}.get(config.model_type, "Other")]
    config.save_pretrained(folder)
    return folder


def written(tmp_path: Path, name: str, fields: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


@pytest.mark.parametrize("folder", ["benchmarks/models/qwen3-0.6b", "benchmarks/models/qwen3-8b",
                                    "benchmarks/models/qwen2.5-0.5b", "benchmarks/models/llama-3.1-8b",
                                    "aio_engine/default_model"])
def test_real_architectures_configs_read_as_transformers_reads_them(folder):
    assert_same_view(ROOT / folder)


def test_the_test_suites_tiny_models_read_as_transformers_reads_them(tiny_models):
    for folder in tiny_models.values():
        assert_same_view(folder)


SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, vocab_size=300)


@pytest.mark.parametrize("name, make", [
    ("llama-defaults", lambda: transformers.LlamaConfig(**SMALL)),
    ("llama-linear-rope", lambda: transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0},
                                                           rope_theta=5e5, num_key_value_heads=2, tie_word_embeddings=True)),
    ("llama-head-dim", lambda: transformers.LlamaConfig(**SMALL, head_dim=32, attention_bias=True)),
    ("mistral-defaults", lambda: transformers.MistralConfig(**SMALL)),
    ("mistral-no-window", lambda: transformers.MistralConfig(**SMALL, sliding_window=None)),
    ("qwen2-defaults", lambda: transformers.Qwen2Config(**SMALL)),
    ("qwen2-window", lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16,
                                                      max_window_layers=2)),
    ("qwen3-defaults", lambda: transformers.Qwen3Config(**SMALL)),
    ("qwen3-window", lambda: transformers.Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=8,
                                                      max_window_layers=1, head_dim=16, rms_norm_eps=1e-5)),
    ("qwen3-layer-types", lambda: transformers.Qwen3Config(
        **SMALL, use_sliding_window=True, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])),
])
def test_configs_saved_by_transformers_read_as_transformers_reads_them(tmp_path, name, make):
    assert_same_view(saved(tmp_path, name, make()))


def test_legacy_rope_keys_and_torch_dtype_read_as_transformers_reads_them(tmp_path):
    fields = dict(SMALL, architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float16",
                  rope_theta=250000.0, rope_scaling={"type": "linear", "factor": 4.0})
    assert_same_view(written(tmp_path, "legacy", fields))


def test_overrides_go_through_transformers(tmp_path):
    folder = written(tmp_path, "q", dict(SMALL, architectures=["Qwen3ForCausalLM"], model_type="qwen3"))
    config = load_hf_config(folder, {"num_hidden_layers": 3, "torch_dtype": "bfloat16"})
    assert isinstance(config, transformers.Qwen3Config) and config.num_hidden_layers == 3


def test_what_it_does_not_read_itself_goes_through_transformers(tmp_path):
    yarn = saved(tmp_path, "yarn", transformers.Qwen3Config(
        **SMALL, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                  "original_max_position_embeddings": 64}))
    config = load_hf_config(yarn)
    assert isinstance(config, transformers.Qwen3Config)
    torch.testing.assert_close(rope_cache(config, 16, 64), rope_cache(transformers.AutoConfig.from_pretrained(yarn), 16, 64))
    # rope_scaling beside rope_parameters (how Qwen's docs say to turn yarn on): transformers merges them.
    both = written(tmp_path, "both", dict(SMALL, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                          rope_scaling={"rope_type": "linear", "factor": 4.0}))
    assert isinstance(load_hf_config(both), transformers.Qwen3Config)
    other = saved(tmp_path, "gpt2", transformers.GPT2Config(n_layer=1))
    assert isinstance(load_hf_config(other), transformers.GPT2Config)


def test_an_eager_engine_starts_without_importing_transformers_dynamo_or_inductor():
    """Each costs seconds of -O0's startup: config.json is read by hf_config, the model is built on
    the meta device without torch.nn.init (whose reference ops import dynamo), and inductor's
    settings are only touched when the model compiles."""
    code = ("import sys\nfrom aio_engine.config import EngineArgs\nfrom aio_engine.engine_core import EngineCore\n"
            "c = EngineArgs(model='benchmarks/models/qwen3-0.6b', skip_tokenizer_init=True, max_model_len=1024)"
            ".create_engine_config()\n"
            "assert c.model.head_dim == 128 and c.model.num_kv_heads == 8, c.model\n"
            "core = EngineCore(EngineArgs(model='aio_engine/default_model', skip_tokenizer_init=True, enforce_eager=True,"
            " num_gpu_blocks_override=16).create_engine_config())\n"
            "print(sorted({m.split('.')[0] + ('.' + m.split('.')[1] if m.startswith('torch.') else '') for m in sys.modules"
            " if m.split('.')[0] == 'transformers' or m.startswith(('torch._dynamo', 'torch._inductor'))}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_model_is_built_with_its_weights_in_the_target_dtype(dtype):
    from aio_engine.loader import build_on_meta

    config = load_hf_config(ROOT / "benchmarks/models/qwen3-0.6b")
    before = torch.get_default_dtype()
    model = build_on_meta(model_class(config.architectures), config, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype} and {p.device.type for p in model.parameters()} == {"meta"}
    assert torch.get_default_dtype() == before
    assert torch.nn.init.normal_(torch.zeros(2), 0.0, 1.0).abs().sum() > 0  # torch.nn.init is itself again
