"""Counter-based Gumbel noise and the fused Gumbel-max kernel: the Triton kernel draws the same
token as the torch reference (under TRITON_INTERPRET=1 on CPU, on CUDA where there is one), and
the noise is Gumbel, a pure function of (key, token id)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from kernels import sampling
from kernels.sampling import gumbel_argmax_reference, gumbel_argmax_triton, gumbel_noise_reference
from tests.sampling.reference import chi_square_p_value

EULER_GAMMA = 0.5772156649015329


def kernel_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    return torch.device("cpu")


def random_inputs(rows: int, vocab: int, seed: int, device: torch.device):
    """Logits, 63-bit keys, inverse temperatures from 1/5 to 1000, and floors: none, min-p floors
    (max + T log min_p), and a row whose floor shuts out everything."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    keys = torch.randint(0, 2**63 - 1, (rows,), generator=gen)
    temperature = torch.exp(torch.empty(rows).uniform_(math.log(1e-3), math.log(5.0), generator=gen))
    min_p = torch.rand(rows, generator=gen) * 0.3
    floor = logits.max(-1).values + temperature * torch.log(min_p)
    floor[0::3] = float("-inf")
    if rows > 4:
        floor[4] = float("inf")
    return [t.to(device) for t in (logits, keys, 1.0 / temperature, floor)]


def assert_same_draws(got: torch.Tensor, logits, keys, inv_temp, floor, tie: float = 1e-5) -> None:
    """Equal token ids, except where the reference's two best scores tie within `tie`."""
    expected = gumbel_argmax_reference(logits, keys, inv_temp, floor)
    differ = (got != expected).nonzero()[:, 0]
    for r in differ.tolist():
        ids = torch.arange(logits.shape[1], device=logits.device)[None]
        score = logits[r] * inv_temp[r] + gumbel_noise_reference(keys[r:r + 1], ids)[0]
        score = score.masked_fill(logits[r] < floor[r], float("-inf"))
        a, b = score[got[r]].item(), score[expected[r]].item()
        assert abs(a - b) <= tie, f"row {r}: kernel {got[r].item()} scores {a}, reference {expected[r].item()} {b}"
    assert len(differ) <= max(1, got.numel() // 1000), f"{len(differ)} near-ties out of {got.numel()} rows"


@pytest.mark.parametrize("rows, vocab", [(1, 1), (3, 17), (6, 2048), (5, 2049), (16, 5000), (2, 40000)])
def test_kernel_draws_the_reference_token(rows, vocab):
    inputs = random_inputs(rows, vocab, seed=rows * vocab, device=kernel_device())
    got = gumbel_argmax_triton(*inputs)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert_same_draws(got, *inputs)


def test_kernel_writes_every_row_of_a_poisoned_output():
    logits, keys, inv_temp, floor = random_inputs(9, 3000, seed=5, device=kernel_device())
    out = torch.full((9,), -7, dtype=torch.int64, device=logits.device)
    sampling._gumbel_argmax_kernel[(9,)](logits, keys, inv_temp, floor, out, logits.stride(0), 3000, BLOCK=2048,
                                         num_warps=8)
    assert torch.equal(out, gumbel_argmax_reference(logits, keys, inv_temp, floor))


def test_kernel_reads_rows_of_a_strided_view():
    logits, keys, inv_temp, floor = random_inputs(4, 3000, seed=6, device=kernel_device())
    wide = torch.full((4, 3500), 1e4, device=logits.device)  # columns past the view would win every draw
    wide[:, :3000] = logits
    assert_same_draws(gumbel_argmax_triton(wide[:, :3000], keys, inv_temp, floor), logits, keys, inv_temp, floor)


def test_noise_is_a_pure_function_of_key_and_token():
    gen = torch.Generator().manual_seed(7)
    keys = torch.randint(0, 2**63 - 1, (16,), generator=gen)
    ids = torch.arange(1000).expand(16, -1)
    noise = gumbel_noise_reference(keys, ids)
    perm, cols = torch.randperm(16, generator=gen), torch.randint(0, 1000, (16, 50), generator=gen)
    # Rows in another order and other columns: the same value for the same (key, token).
    torch.testing.assert_close(gumbel_noise_reference(keys[perm], cols), noise[perm].gather(1, cols), rtol=0, atol=0)
    assert not torch.equal(noise[0], noise[1])


def test_noise_is_standard_gumbel_and_uncorrelated_between_neighbours():
    keys = torch.arange(1000, dtype=torch.int64) * 7919 + 12345  # neighbouring keys, not hashed first
    noise = gumbel_noise_reference(keys, torch.arange(1000).expand(1000, -1)).double()  # [1000, 1000]
    assert noise.isfinite().all()
    assert abs(noise.mean().item() - EULER_GAMMA) < 0.006  # 4.5 standard errors
    assert abs(noise.var().item() - math.pi ** 2 / 6) < 0.02
    uniform = torch.exp(-torch.exp(-noise)).flatten()  # the Gumbel CDF of the noise: uniform on (0, 1)
    counts = torch.bincount((uniform * 100).long().clamp(max=99), minlength=100)
    assert chi_square_p_value(counts, torch.full((100,), 0.01)) > 1e-3
    for a, b in [(noise[:-1], noise[1:]), (noise[:, :-1], noise[:, 1:])]:  # next key, next token
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.005, corr
