"""rms_norm and fused_add_rms_norm against the formula and transformers' LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.kernels.conftest import require_dtype


def formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (3, 5, 96)])
def test_rms_norm_matches_the_formula(shape, impl):
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=gen) * 3
    weight = torch.randn(shape[-1], generator=gen)
    torch.testing.assert_close(impl.rms_norm(x, weight, 1e-6).double(), formula(x, weight, 1e-6), atol=1e-5, rtol=1e-5)


def test_eps_matters_for_tiny_inputs(impl):
    x = torch.full((1, 4), 1e-4)
    weight = torch.ones(4)
    torch.testing.assert_close(impl.rms_norm(x, weight, 1e-2).double(), formula(x, weight, 1e-2))
    assert impl.rms_norm(x, weight, 1e-2).abs().max() < 2e-3  # eps dominates: no blow-up to 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_equals_transformers(dtype, impl):
    """Bit for bit in torch; the Triton kernel sums in another order, so within float32 rounding."""
    require_dtype(impl, dtype)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(9, 64, generator=gen) * 2).to(dtype)
    hf = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(64, generator=gen))
    hf = hf.to(dtype)
    ours, theirs = impl.rms_norm(x, hf.weight.detach(), 1e-5), hf(x).detach()
    if impl.name == "torch":
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_fused_add_rms_norm_returns_the_norm_of_the_sum_and_the_sum(impl):
    gen = torch.Generator().manual_seed(2)
    x, residual, weight = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen), torch.randn(32, generator=gen)
    residual_before = residual.clone()
    normed, new_residual = impl.fused_add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(new_residual, x + residual_before)
    torch.testing.assert_close(normed.double(), formula(x + residual_before, weight, 1e-6), atol=1e-5, rtol=1e-5)
