"""Each kernel test runs twice: on the torch reference and on the Triton kernel (under
TRITON_INTERPRET=1 on a machine without CUDA, as tests/conftest.py sets up)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kernels import activation, attention, cache, layernorm, rotary

IMPLS = {
    "torch": SimpleNamespace(
        name="torch",
        paged_attention=attention.paged_attention_reference, write_kv=cache.write_kv_reference,
        rms_norm=layernorm.rms_norm_reference, fused_add_rms_norm=layernorm.fused_add_rms_norm_reference,
        apply_rotary=rotary.apply_rotary_reference, silu_and_mul=activation.silu_and_mul_reference,
    ),
    "triton": SimpleNamespace(
        name="triton",
        paged_attention=attention.paged_attention_triton, write_kv=cache.write_kv_triton,
        rms_norm=layernorm.rms_norm_triton, fused_add_rms_norm=layernorm.fused_add_rms_norm_triton,
        apply_rotary=rotary.apply_rotary_triton, silu_and_mul=activation.silu_and_mul_triton,
    ),
}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (no GPU here); tests/gpu covers CUDA")
    return IMPLS[request.param]


def require_dtype(impl, dtype: torch.dtype) -> None:
    """Triton's interpreter computes through numpy, which has no bfloat16."""
    if impl.name == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("bfloat16 Triton kernels need a GPU (the interpreter has no bfloat16); tests/gpu covers them")


def kernel_device() -> torch.device:
    """CUDA where there is one; else CPU under TRITON_INTERPRET=1 (the test is skipped without it)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    return torch.device("cpu")
