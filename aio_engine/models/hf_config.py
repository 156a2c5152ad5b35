"""A model folder's config.json as the attribute object our models read, without transformers.

Importing transformers' config classes costs seconds at startup (on the GPU machine most of -O0's
time to /health), and the engine reads a dozen fields. For the model types we run, those fields
are read here from the JSON with transformers' class defaults and its post-init rules (head_dim and
kv heads derived, Qwen's sliding window only when use_sliding_window, Qwen's layer_types);
tests/aio_engine/test_hf_config.py holds them equal to AutoConfig's. Anything else (another model
type, a nested text_config, a rope type whose inverse frequencies come from transformers, both
rope_parameters and rope_scaling given, --hf-overrides) goes through AutoConfig as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# Fields of each type's transformers config class (5.x dataclass defaults) that our code reads.
_COMMON = dict(architectures=None, vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=None)
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON, intermediate_size=11008, num_key_value_heads=None, head_dim=None,
                  max_position_embeddings=2048, attention_bias=False),
    "mistral": dict(_COMMON, intermediate_size=14336, num_key_value_heads=8, head_dim=None,
                    max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, layer_types=None),
    "qwen3": dict(_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32, head_dim=128,
                  max_position_embeddings=32768, attention_bias=False, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, layer_types=None),
}
# Rope types whose frequencies rope_cache computes itself (others need transformers' config object).
_OWN_ROPE_TYPES = ("default", "linear", "llama3")


def load_hf_config(folder: Path, overrides: dict[str, Any] | None = None) -> Any:
    """folder/config.json as an attribute object; with `overrides` (--hf-overrides), AutoConfig's
    (which keys it takes, and how, depends on the class: not worth copying for a rare flag)."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    if overrides or not _reads_itself(raw):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder, **(overrides or {}))
    model_type = raw["model_type"]
    config = SimpleNamespace(**{**CLASS_DEFAULTS[model_type], **raw})
    if model_type in ("llama", "mistral") and config.head_dim is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    if config.num_key_value_heads is None:
        config.num_key_value_heads = config.num_attention_heads
    if model_type in ("qwen2", "qwen3"):
        if not config.use_sliding_window:
            config.sliding_window = None
        if config.layer_types is None:
            config.layer_types = [
                "sliding_attention" if config.sliding_window is not None and i >= config.max_window_layers
                else "full_attention" for i in range(config.num_hidden_layers)
            ]
    return config


def _reads_itself(raw: dict[str, Any]) -> bool:
    if raw.get("model_type") not in CLASS_DEFAULTS or "text_config" in raw:
        return False
    given = [r for r in (raw.get("rope_parameters"), raw.get("rope_scaling")) if r]
    if len(given) > 1:  # which one wins, and how they merge, is transformers' business
        return False
    rope = given[0] if given else {}
    return rope.get("rope_type", rope.get("type", "default")) in _OWN_ROPE_TYPES
