"""Counter-based Gumbel noise, the whole-row draw and the sparse penalties: each Triton kernel
gives what its torch reference gives (under TRITON_INTERPRET=1 on CPU, on CUDA where there is
one), the references follow the formulas, and the noise is Gumbel, a pure function of (key, token id)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kernels.sampling import (
    apply_penalties_reference,
    apply_penalties_triton,
    gumbel_argmax_reference,
    gumbel_argmax_triton,
    gumbel_noise_reference,
)
from tests.kernels.conftest import kernel_device
from tests.sampling.reference import chi_square_p_value, penalized

EULER_GAMMA = 0.5772156649015329


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
    gumbel_argmax_triton(logits, keys, inv_temp, floor, out=out)
    assert torch.equal(out, gumbel_argmax_reference(logits, keys, inv_temp, floor))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_draw_writes_the_given_rows_only_and_skips_the_skipped(impl):
    logits, keys, inv_temp, floor = random_inputs(12, 5000, seed=8, device=kernel_device())
    rows = torch.tensor([11, 3, 0, 7, 5], device=logits.device)
    skip = torch.tensor([False, True, False, False, True], device=logits.device)
    out = torch.full((12,), -7, dtype=torch.int64, device=logits.device)
    draw = gumbel_argmax_triton if impl == "triton" else gumbel_argmax_reference
    draw(logits, keys, inv_temp, floor, rows, out, skip)
    alone = gumbel_argmax_reference(logits, keys, inv_temp, floor)
    drawn = torch.tensor([11, 0, 7])
    assert torch.equal(out.cpu()[drawn], alone.cpu()[drawn])
    assert (out.cpu()[[i for i in range(12) if i not in (11, 0, 7)]] == -7).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("rows, vocab", [(1, 1), (4, 100), (9, 4097), (3, 30000)])
def test_greedy_draw_is_argmax_with_the_first_of_tied_maxima(impl, rows, vocab):
    gen = torch.Generator().manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 2).round() / 2  # coarse values: many ties, at the top too
    logits = logits.to(kernel_device())
    draw = gumbel_argmax_triton if impl == "triton" else gumbel_argmax_reference
    assert torch.equal(draw(logits, None, None, None).cpu(), logits.cpu().argmax(-1))
    # Greedy rows (inverse temperature 0) beside random ones take the argmax too, noise or not.
    keys = torch.randint(0, 2**62, (rows,), generator=gen).to(logits.device)
    inv_temp = torch.where(torch.arange(rows) % 2 == 0, 0.0, 1.0).to(logits.device)
    got = draw(logits, keys, inv_temp, None).cpu()
    assert torch.equal(got[0::2], logits.cpu()[0::2].argmax(-1))
    assert torch.equal(got, gumbel_argmax_reference(logits, keys, inv_temp, None).cpu())


# --- penalties ---

def random_histories(num_rows: int, vocab: int, seed: int, device: torch.device, longest: int = 40):
    """Penalized rows (a shuffled subset of the logits rows) with ids in a history arena: prompts
    and outputs of random lengths over a few hot ids (so they repeat), some rows without
    repetition penalty (their range starts at the output), empty ranges, ids at both vocabulary ends."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(num_rows, generator=gen)[: max(1, num_rows * 2 // 3)]
    capacity = longest + 24
    ids = torch.randint(0, vocab, (len(rows) + 3, capacity), generator=gen, dtype=torch.int32)
    ids[:, :4] = torch.tensor([0, vocab - 1, 0, vocab - 1], dtype=torch.int32)
    hot = torch.randint(0, vocab, (len(rows), 5), generator=gen)
    slots = torch.randperm(len(rows) + 3, generator=gen)[: len(rows)].int()
    begin, split, end = [], [], []
    for i in range(len(rows)):
        num_prompt = int(torch.randint(0, 20, (), generator=gen))
        num_out = int(torch.randint(3, longest, (), generator=gen))
        ids[slots[i], num_prompt:num_prompt + num_out] = hot[i][torch.randint(0, 5, (num_out,), generator=gen)].int()
        ids[slots[i], num_prompt:num_prompt + 2] = torch.tensor([0, vocab - 1], dtype=torch.int32)[: num_out]
        split.append(num_prompt)
        end.append(num_prompt + num_out if i % 7 != 6 else num_prompt)  # some rows have no output yet
        begin.append(0 if i % 3 != 2 else num_prompt)
    rep = (0.5 + 1.5 * torch.rand(len(rows), generator=gen)).where(torch.tensor(begin) == 0, torch.tensor(1.0))
    freq, pres = torch.rand(2, len(rows), generator=gen) * 4 - 2
    width = max(e - b for b, e in zip(begin, end))
    ranges = torch.stack([rows.int(), slots, *(torch.tensor(v, dtype=torch.int32) for v in (begin, split, end))])
    return ids.to(device), ranges.to(device), torch.stack([rep, freq, pres]).to(device), width


@pytest.mark.parametrize("impl", ["torch", "triton", "triton, 16-token blocks"])
@pytest.mark.parametrize("num_rows, vocab, longest", [(1, 3, 40), (6, 50, 40), (20, 1000, 40), (3, 60, 2500)])
def test_penalties_follow_the_formula_over_each_rows_history(impl, num_rows, vocab, longest):
    # (Histories longer than a block put repeated ids in different passes of a program's loops.)
    device = kernel_device() if impl.startswith("triton") else torch.device("cpu")
    args = random_histories(num_rows, vocab, seed=num_rows * vocab, device=device, longest=longest)
    ids, ranges, factors, _ = args
    logits = torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    logits[0, 1 % vocab] = float("-inf")  # a masked logit stays masked
    expected = logits.double().clone()
    for (r, slot, b, s, e), (rep, freq, pres) in zip(ranges.cpu().T.tolist(), factors.cpu().T.tolist()):
        history = ids[slot].tolist()
        params = SimpleNamespace(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
        expected[r] = penalized(logits[r], params, history[b:s], history[s:e])
    got = logits.clone().to(device)
    if impl == "torch":
        apply_penalties_reference(got, *args)
    else:
        apply_penalties_triton(got, *args, **({"block": 16} if "16" in impl else {}))  # else the engine's block
    torch.testing.assert_close(got.cpu().double(), expected, atol=1e-5, rtol=1e-6)
    assert (got.cpu().double() != logits.double()).any()


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
