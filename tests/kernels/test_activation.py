"""silu_and_mul against its formula."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("shape", [(1, 2), (6, 256), (2, 3, 64)])
def test_silu_and_mul_is_silu_of_the_first_half_times_the_second(shape, impl):
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=gen) * 4
    d = shape[-1] // 2
    gate, up = x[..., :d].double(), x[..., d:].double()
    expected = gate / (1 + torch.exp(-gate)) * up
    out = impl.silu_and_mul(x)
    assert out.shape == (*shape[:-1], d)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
