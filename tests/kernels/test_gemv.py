"""The one-token matmul (kernels/gemv.py) against torch's linear, under TRITON_INTERPRET=1 on CPU
(float32) and on CUDA where there is one; tests/gpu covers bfloat16 and the models' dispatch."""

from __future__ import annotations

import pytest
import torch

from kernels.gemv import gemv, gemv_reference, gemv_triton
from tests.kernels.conftest import kernel_device

# (N, K, config): N not a multiple of the rows a program takes, K not a multiple of its columns,
# several column blocks per program, and the default config.
CASES = [
    (7, 64, (4, 32, 4, 2)),
    (33, 100, (8, 32, 4, 2)),
    (130, 1000, None),
    (64, 2048, (2, 256, 8, 3)),
]


@pytest.mark.parametrize("n, k, config", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_triton_equals_linear(n, k, config, with_bias):
    device = kernel_device()
    gen = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(1, k, generator=gen).to(device)
    weight = torch.randn(n, k, generator=gen).to(device)
    bias = torch.randn(n, generator=gen).to(device) if with_bias else None
    out = gemv_triton(x, weight, bias, config)
    expected = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.shape == (1, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=1e-4)


def test_gemv_reads_a_row_of_a_larger_batch_and_weight_slices():
    """A row view of a batch, and a weight that is a row slice of a bigger one (a fused projection)."""
    device = kernel_device()
    gen = torch.Generator().manual_seed(5)
    batch = torch.randn(3, 96, generator=gen).to(device)
    stacked = torch.randn(40, 96, generator=gen).to(device)
    out = gemv_triton(batch[1:2], stacked[8:30], None, (4, 32, 4, 2))
    torch.testing.assert_close(out, gemv_reference(batch[1:2], stacked[8:30]), atol=1e-4, rtol=1e-4)


def test_gemv_writes_float32_from_half_inputs():
    """out_dtype=float32 (the logits): the accumulator itself, closer to the exact product than the
    product rounded to half precision is."""
    device = kernel_device()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 300, generator=gen).half().to(device)
    weight = torch.randn(70, 300, generator=gen).half().to(device)
    out = gemv_triton(x, weight, None, (4, 64, 4, 2), out_dtype=torch.float32)
    exact = x.double() @ weight.double().t()
    assert out.dtype == torch.float32
    assert (out.double() - exact).abs().max() < 0.25 * (exact.half().double() - exact).abs().max()


def test_gemv_rejects_more_than_one_row_and_column_major_weights():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="gemv takes x"):
        gemv_triton(x, weight)
    with pytest.raises(ValueError, match="gemv takes x"):
        gemv_triton(x[:1], weight.t().contiguous().t())


def test_gemv_dispatch_off_cuda_is_the_reference():
    gen = torch.Generator().manual_seed(9)
    x, weight = torch.randn(1, 16, generator=gen), torch.randn(5, 16, generator=gen)
    assert torch.equal(gemv(x, weight), gemv_reference(x, weight))
