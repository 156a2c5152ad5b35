"""The Llama-family decoder: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

They differ only in switches read from the config: qkv bias (Qwen2, Llama's attention_bias),
per-head q/k RMSNorm (Qwen3), sliding-window layers (Mistral, Qwen2), rope scaling, tied embeddings.
The forward takes the flat batch (all new tokens of all requests) and one AttentionMetadata.

The forward is written as pieces cut at attention (`first_piece`, `middle_piece`, `last_piece`:
plain functions of modules and tensors, alike for every layer) with `Attention.attend` between
them: the eager forward chains them, and aio_engine/compilation.py compiles and graphs the pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels.attention import AttentionMetadata, paged_attention, write_kv

from .layers import FusedLinear, GatedMLP, Linear, RMSNorm, apply_rotary, logits_linear, rope_cache


class Attention(nn.Module):
    compiler_fusion = True

    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = FusedLinear(config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.sliding_window = sliding_window_of(config, layer_idx)

    def project(self, positions, hidden, rope: torch.Tensor):
        """hidden -> (q, k, v) with q/k norm and rotary applied."""
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(positions, q, k, rope, self.compiler_fusion)
        return q, k, v

    def attend(self, q, k, v, kv_cache, meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        """Store k and v in the cache, attend: [num_tokens, num_heads, head_dim] (into `out` if given)."""
        write_kv(k, v, kv_cache, meta.slot_mapping)
        return paged_attention(q, kv_cache, meta, self.scale, self.sliding_window, out)


def sliding_window_of(config, layer_idx: int) -> int | None:
    """The layer's attention window, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "_disable_sliding_window", False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window"):  # Qwen2-style without layer_types
        if not config.use_sliding_window:
            return None
        return window if layer_idx >= getattr(config, "max_window_layers", 0) else None
    return window


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, qkv_bias, o_bias, qk_norm)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def before_attention(self, positions, hidden, residual, rope):
        """(q, k, v, residual): the input norm (adding the residual, if any) and the projections."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        q, k, v = self.self_attn.project(positions, hidden, rope)
        return q, k, v, residual

    def after_attention(self, attn_out, residual):
        """(hidden, residual): o_proj, the residual add and norm, the MLP."""
        hidden = self.self_attn.o_proj(attn_out.reshape(attn_out.shape[0], -1))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def first_piece(embed: nn.Embedding, layer: DecoderLayer, input_ids, positions, rope):
    """Embedding and the first layer up to attention: (q, k, v, residual)."""
    hidden = embed(input_ids)  # [num_tokens, hidden_size]
    return layer.before_attention(positions, hidden, None, rope)


def middle_piece(prev: DecoderLayer, layer: DecoderLayer, attn_out, residual, positions, rope):
    """Layer i-1 after its attention, layer i up to its attention: (q, k, v, residual)."""
    hidden, residual = prev.after_attention(attn_out, residual)
    return layer.before_attention(positions, hidden, residual, rope)


def last_piece(prev: DecoderLayer, norm: RMSNorm, attn_out, residual):
    """The last layer after its attention and the final norm: hidden [num_tokens, hidden_size]."""
    hidden, residual = prev.after_attention(attn_out, residual)
    return norm(hidden, residual)[0]


class DecoderModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, qkv_bias, o_bias, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta, rope):
        layers = self.layers
        q, k, v, residual = first_piece(self.embed_tokens, layers[0], input_ids, positions, rope)
        for i, kv_cache in enumerate(kv_caches):
            attn_out = layers[i].self_attn.attend(q, k, v, kv_cache, meta)
            if i + 1 < len(layers):
                q, k, v, residual = middle_piece(layers[i], layers[i + 1], attn_out, residual, positions, rope)
        return last_piece(layers[-1], self.norm, attn_out, residual)


class LlamaForCausalLM(nn.Module):
    """Llama 2/3 (llama3 rope scaling), and the base of the other three architectures."""

    qkv_bias = False
    qk_norm = False
    # checkpoint name piece -> (our fused parameter piece, shard)
    stacked_params = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        # Qwen2 puts bias on q, k, v only; Llama's attention_bias covers o_proj too.
        o_bias = attention_bias and not self.qkv_bias
        self.model = DecoderModel(config, self.qkv_bias or attention_bias, o_bias, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        attn = self.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.rope: torch.Tensor | None = None

    def init_buffers(self, device: torch.device, max_positions: int) -> None:
        """Build the rope cache (not a parameter: weights are loaded into an empty model)."""
        self.rope = rope_cache(self.config, self.head_dim, max_positions).to(device)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, self.rope)

    def pieces(self) -> list[tuple[Callable, tuple[nn.Module, ...]]]:
        """The forward cut at attention, for compilation: (function, its modules) per piece; attention
        layer i runs between piece i and piece i + 1. The first piece takes (input_ids, positions,
        rope), the middle ones (attn_out, residual, positions, rope), the last (attn_out, residual);
        all but the last return (q, k, v, residual), the last the final hidden states."""
        layers, model = self.model.layers, self.model
        return ([(first_piece, (model.embed_tokens, layers[0]))]
                + [(middle_piece, (layers[i - 1], layers[i])) for i in range(1, len(layers))]
                + [(last_piece, (layers[-1], model.norm))])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden_size] -> float32 [num_rows, vocab_size]."""
        head = self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return logits_linear(hidden, head)

    def load_weights(self, weights) -> set[str]:
        """Copy (name, tensor) pairs from a checkpoint; return the names of parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            for piece, (fused, shard) in self.stacked_params.items():
                if f".{piece}." in name:
                    target = name.replace(piece, fused)
                    module_name, _, param_name = target.rpartition(".")
                    self.get_submodule(module_name).load_shard(param_name, tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                param = params[name]
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.data.copy_(tensor)
                loaded.add(name)
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with an optional sliding window on every layer."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with bias on q, k and v."""

    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with per-head RMSNorm on q and k before rope."""

    qk_norm = True
