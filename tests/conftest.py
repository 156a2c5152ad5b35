"""Shared fixtures: tiny random Hugging Face checkpoints (made once per session) and engines."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run under Triton's interpreter so that tests/kernels can
# compare them with their torch references (it must be set before triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tiny test models run fastest on one thread, and OpenMP threads that wait on a busy core
# (CI runs on 2 cores) make every small matmul slow.
torch.set_num_threads(1)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks. "
    "Continuous batching lets new requests join every step. Hello world! How are you today? "
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation {}[]():;\"',.-_ and emoji 👋🙂🚀 and CJK 世界你好日本語. "
    "Ünïcödé àéîõü ß ñ — “quotes” … "
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(folder: Path, vocab_size: int = 400):
    """A real byte-level BPE trained on a small corpus, saved in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=512, rms_norm_eps=1e-6,
            tie_word_embeddings=False)


def build_model(arch: str, folder: Path, seed: int = 0, **overrides) -> Path:
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    cfg = dict(TINY, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        config = transformers.LlamaConfig(**cfg)
    elif arch == "mistral":
        config = transformers.MistralConfig(**cfg, sliding_window=None)
    elif arch == "mistral_window":
        config = transformers.MistralConfig(**cfg, sliding_window=24)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**dict(cfg, tie_word_embeddings=True))
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**dict(cfg, head_dim=32))
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases and norms, so that those code paths matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(arch, root / arch) for arch in [*ARCHS, "mistral_window"]}


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    """transformers' own models on the same weights, the reference for parity."""
    import transformers

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
        return cache[arch]

    return get


@pytest.fixture(autouse=True)
def _collect():
    yield
    gc.collect()
