"""Rotary position embedding, neox style (rotate-half), with the cos/sin cache built once.

The cache covers plain rope, linear scaling and Llama-3 scaling; it is indexed by absolute
position, so prefill chunks and decode rows of a flat batch use the same call.
"""

from __future__ import annotations

import math

import torch


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths divided by `factor`, short kept, smooth between."""
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_positions, rotary_dim] float32: cos in the first half, sin in the second."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())  # [max_positions, rotary_dim / 2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling


def apply_rotary(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cache: torch.Tensor,  # [max_positions, rotary_dim]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim features of q and k by their positions (reference)."""
    cos, sin = cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2]
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot_dim = cos.shape[-1] * 2
        x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        x1, x2 = x_rot.float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, x_pass], dim=-1) if x_pass.numel() else rotated

    return rotate(query), rotate(key)
