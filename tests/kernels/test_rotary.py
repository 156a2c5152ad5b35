"""Rotary embedding against transformers' rotary embedding and apply_rotary_pos_emb, with plain
rope and Llama-3 scaling, at unordered positions (as in a flat batch)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from aio_engine.models.layers import rope_cache
from kernels.rotary import llama3_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def llama_config(head_dim: int, rope_scaling: dict | None, theta: float = 10000.0) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512, rope_theta=theta, rope_scaling=rope_scaling)


def test_llama3_frequencies_match_transformers():
    config = llama_config(32, LLAMA3, theta=500000.0)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    base = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.int64).float() / 32))
    ours = llama3_inv_freq(base, 8.0, 1.0, 4.0, 64)
    torch.testing.assert_close(ours, theirs)
    assert not torch.equal(ours, base)  # the scaling did something at this length


@pytest.mark.parametrize("scaling, theta", [(LLAMA3, 10000.0), (None, 10000.0), (None, 1e6), (LLAMA3, 500000.0)])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_apply_rotary_matches_transformers(head_dim, scaling, theta, impl):
    config = llama_config(head_dim, scaling, theta)
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens = 23
    positions = torch.randint(0, 512, (num_tokens,), generator=gen)
    q = torch.randn(num_tokens, 4, head_dim, generator=gen)
    k = torch.randn(num_tokens, 2, head_dim, generator=gen)

    cache = rope_cache(config, head_dim, 512)
    q_ours, k_ours = impl.apply_rotary(positions, q.clone(), k.clone(), cache)  # Triton rotates in place

    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(q, positions[None, :])  # [1, num_tokens, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(q_ours, q_hf[0].transpose(0, 1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_hf[0].transpose(0, 1), atol=2e-5, rtol=1e-5)


def test_position_zero_is_the_identity_and_norms_are_kept(impl):
    config = llama_config(16, LLAMA3)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 2, 16, generator=gen)
    positions = torch.tensor([0, 100, 511])
    q_rot, k_rot = impl.apply_rotary(positions, q.clone(), k.clone(), rope_cache(config, 16, 512))
    torch.testing.assert_close(q_rot[0], q[0])
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1))
    assert not torch.allclose(q_rot[1], q[1])


def test_unsupported_rope_type_is_refused():
    config = llama_config(16, None)
    config.rope_parameters = {"rope_type": "mystery", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="mystery"):
        rope_cache(config, 16, 64)
