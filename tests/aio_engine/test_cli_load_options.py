"""The model and load flags added for `serve` reach the engine: --hf-config-path, --ignore-patterns,
--safetensors-load-strategy, --distributed-executor-backend."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from aio_engine import EngineArgs
from aio_engine.loader import iterate_weights


@pytest.fixture(autouse=True)
def _collect():
    """No engine kept here: skip the shared per-test gc.collect."""
    yield


def test_hf_config_path_reads_the_config_from_another_folder(tiny_models, tmp_path):
    raw = json.loads((tiny_models["llama"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "max_position_embeddings": 256}))
    args = EngineArgs(model=str(tiny_models["llama"]), hf_config_path=str(tmp_path))
    assert args.create_engine_config().model.max_model_len == 256
    with pytest.raises(ValueError, match="hf_config_path"):
        EngineArgs(model=str(tiny_models["llama"]), hf_config_path=str(tmp_path / "none")).create_engine_config()


def test_eager_and_lazy_safetensors_loads_give_the_same_tensors(tiny_models):
    lazy = dict(iterate_weights(tiny_models["qwen3"], "auto", False, safetensors_load_strategy="lazy"))
    eager = dict(iterate_weights(tiny_models["qwen3"], "auto", False, safetensors_load_strategy="eager"))
    assert lazy.keys() == eager.keys() and len(lazy) > 5
    assert all(torch.equal(lazy[k], eager[k]) for k in lazy)


def test_ignore_patterns_skip_weight_files(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    save_file({"stray.weight": torch.zeros(2)}, str(folder / "extra.safetensors"))
    assert "stray.weight" in dict(iterate_weights(folder, "auto", False))
    names = dict(iterate_weights(folder, "auto", False, ignore_patterns=["extra*"]))
    assert "stray.weight" not in names and "model.embed_tokens.weight" in names
    config = EngineArgs(model=str(folder), ignore_patterns=["extra.*"]).create_engine_config()
    assert config.load.ignore_patterns == ["extra.*"] and config.load.safetensors_load_strategy == "lazy"


@pytest.mark.parametrize("field, value", [("distributed_executor_backend", "ray"),
                                          ("safetensors_load_strategy", "torchao")])
def test_values_the_engine_cannot_honour_are_refused_by_name(tiny_models, field, value):
    with pytest.raises(ValueError, match=field):
        EngineArgs(model=str(tiny_models["llama"]), **{field: value}).create_engine_config()
