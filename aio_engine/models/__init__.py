"""Model registry: `architectures[0]` of a config.json -> our model class."""

from __future__ import annotations

from .llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(architectures: list[str] | None) -> type:
    """The class for the first supported architecture, or a ValueError naming the supported ones."""
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported architecture {architectures}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
