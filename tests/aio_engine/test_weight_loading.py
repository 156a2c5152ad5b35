"""Loading: sharded safetensors with an index, .bin checkpoints, dummy weights, no tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from aio_engine import LLM, SamplingParams
from aio_engine.config import EngineArgs

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _greedy_ids(llm: LLM, prompt: str) -> list[int]:
    return llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_sharded_safetensors_with_index_load_like_the_single_file(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert _greedy_ids(LLM(str(sharded)), "Hello world") == _greedy_ids(LLM(str(src)), "Hello world")


def test_pt_checkpoint_loads_with_load_format_pt(tiny_models, tmp_path):
    src = tiny_models["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    folder = tmp_path / "pt"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, folder)
    assert _greedy_ids(LLM(str(folder), load_format="pt"), "abc") == _greedy_ids(LLM(str(src)), "abc")


def test_dummy_weights_need_only_a_config_and_are_deterministic(tiny_models, tmp_path):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(tiny_models["qwen3"] / "config.json", folder)
    a = LLM(str(folder), load_format="dummy", skip_tokenizer_init=True, seed=3)
    b = LLM(str(folder), load_format="dummy", skip_tokenizer_init=True, seed=3)
    prompt = {"prompt_token_ids": [1, 2, 3, 4]}
    out_a = a.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert out_a.outputs[0].text == "" and len(out_a.outputs[0].token_ids) == 12
    assert out_a.outputs[0].token_ids == b.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="tokenizer"):
        a.generate("text needs a tokenizer", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="no weights"):
        LLM(str(folder))


def test_generation_config_defaults_and_overrides(tiny_models, tmp_path):
    folder = tmp_path / "gen"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.25, "top_k": 7, "do_sample": True,
                                                                "eos_token_id": [3, 4]}))
    llm = LLM(str(folder))
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_k) == (0.25, 7)
    assert {3, 4} <= set(llm.core.eos_token_ids)
    params = LLM(str(folder), override_generation_config={"temperature": 0.5}).get_default_sampling_params()
    assert (params.temperature, params.top_k) == (0.5, 7)
    assert LLM(str(folder), generation_config="vllm").get_default_sampling_params().temperature == 1.0


def test_revision_is_ignored_with_a_warning(tiny_models, caplog):
    with caplog.at_level("WARNING"):
        EngineArgs(model=str(tiny_models["llama"]), revision="main").create_engine_config()
    assert "revision" in caplog.text
