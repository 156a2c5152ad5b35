"""Top-k / top-p selection (kernels/sampling_topk.py) on both implementations, the torch reference
and the Triton kernels (under TRITON_INTERPRET=1 on CPU, on CUDA where there is one): exact top-N
candidates against a plain sort, the draw among them against the reference, the exact threshold
search (and its draw) against a brute-force definition, and the window and the search agreeing."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import sampling_topk as topk
from kernels.sampling import gumbel_argmax_reference
from kernels.sampling_topk import EMPTY, candidate_keys, decode_candidates
from tests.kernels.test_sampling_kernel import kernel_device

IMPLS = ["torch", "triton"]


def impl_device(impl: str) -> torch.device:
    return kernel_device() if impl == "triton" else torch.device("cpu")


def fn(impl: str, name: str):
    return getattr(topk, f"{name}_{'triton' if impl == 'triton' else 'reference'}")


def sorted_keys(x: torch.Tensor, n: int) -> torch.Tensor:
    """The n best (value, then lower id) finite logits of each row by a plain stable sort, EMPTY-padded."""
    values, ids = x.cpu().sort(dim=1, descending=True, stable=True)
    keys = candidate_keys(values, ids).masked_fill(values == float("-inf"), EMPTY)[:, :n]
    return torch.cat([keys, keys.new_full((x.shape[0], n - keys.shape[1]), EMPTY)], dim=1)


def random_rows(rows: int, vocab: int, seed: int, device, ties: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=gen) * 3
    if ties:
        x = (x * 4).round() / 4  # bf16-like coarse logits: ties everywhere, the best ones too
    x[0, : vocab // 3] = float("-inf")  # a masked stretch (allowed ids, grammars)
    if rows > 2:
        x[2, torch.randperm(vocab, generator=gen)[: max(1, vocab - 3)]] = float("-inf")  # fewer finite than n
    inv_temp = torch.exp(torch.empty(rows).uniform_(math.log(0.3), math.log(3.0), generator=gen))
    floor = x.amax(-1) + torch.log(torch.rand(rows, generator=gen) * 0.2) / inv_temp
    floor[1::2] = float("-inf")
    return [t.to(device) for t in (x, inv_temp, floor)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows, vocab, n", [(3, 17, 5), (4, 40, 40), (3, 30, 64), (6, 2048, 50), (5, 5000, 256),
                                            (4, 40000, 50), (3, 3000, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_candidates_are_the_exact_top_n(impl, rows, vocab, n, ties):
    x, inv_temp, floor = random_rows(rows, vocab, seed=rows * vocab + n, device=impl_device(impl), ties=ties)
    pick = torch.tensor([r for r in range(rows) if r != 1][::-1], device=x.device)  # a subset, out of order
    cand, exact, mass = fn(impl, "top_candidates")(x, n, pick, inv_temp, floor, with_mass=True)
    assert cand.shape == (len(pick), n) and exact.all()
    assert torch.equal(cand.cpu(), sorted_keys(x[pick], n))
    # The mass parts give the softmax normalizer of the logits >= floor.
    tmax, tmass = (t.cpu().double() for t in mass)
    xs, it, fl = x[pick].cpu().double(), inv_temp[pick].cpu().double(), floor[pick].cpu().double()
    top = xs.amax(-1)
    z = torch.where((xs >= fl[:, None]) & (xs > float("-inf")), torch.exp((xs - top[:, None]) * it[:, None]), 0).sum(-1)
    got = torch.where(tmax > float("-inf"), tmass * torch.exp((tmax - top[:, None]) * it[:, None]), 0).sum(-1)
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-6)


def test_candidates_flag_rows_whose_ties_overflow_the_buffer_and_are_never_wrong():
    device = kernel_device()
    x = torch.randn(4, 9000, generator=torch.Generator().manual_seed(3)).to(device)
    x[1] = 1.0  # every logit tied
    x[3, ::2] = x[3].max() + 1  # half of them tied at the top
    cand, exact, _ = topk.top_candidates_triton(x, 20)
    assert exact.cpu().tolist() == [True, False, True, False]
    expected = sorted_keys(x, 20)
    assert torch.equal(cand.cpu()[exact.cpu()], expected[exact.cpu()])


def random_filters(rows: int, vocab: int, n: int, seed: int, device):
    """Top-k (off, inside and beyond the window) and top-p per row, with keys."""
    gen = torch.Generator().manual_seed(seed)
    choices = torch.tensor([vocab, 1, max(1, n // 2), n, min(vocab, n + 5), vocab, vocab])
    top_k = choices[torch.randint(0, len(choices), (rows,), generator=gen)].int()
    top_p = torch.tensor([1.0, 0.3, 0.7, 0.9, 0.99])[torch.randint(0, 5, (rows,), generator=gen)]
    top_p[(top_k >= vocab) & (top_p >= 1)] = 0.8  # every row here filters something
    keys = torch.randint(0, 2**62, (rows,), generator=gen)
    return [t.to(device) for t in (top_k, top_p, keys)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows, vocab, n", [(8, 40, 12), (16, 1000, 64), (12, 5000, 256)])
def test_draw_among_candidates_matches_the_reference(impl, rows, vocab, n):
    device = impl_device(impl)
    x, inv_temp, floor = random_rows(rows, vocab, seed=vocab + n, device=device)
    top_k, top_p, keys = random_filters(rows, vocab, n, seed=n, device=device)
    pick = torch.arange(rows - 1, -1, -1, device=device)
    cand, exact, mass = topk.top_candidates_reference(x.cpu(), n, pick.cpu(), inv_temp.cpu(), floor.cpu(), True)
    results = []
    for name, dev in (("reference", torch.device("cpu")), (impl, device)):
        out = torch.full((rows,), -7, dtype=torch.int64, device=dev)
        cut = torch.full((rows,), 7.0, device=dev)
        cut_id = torch.full((rows,), -7, dtype=torch.int64, device=dev)
        args = [t.to(dev) for t in (cand, exact, pick, keys, inv_temp, floor, top_k, top_p)]
        draw = topk.draw_candidates_reference if name == "reference" else fn(impl, "draw_candidates")
        ok = draw(*args, tuple(t.to(dev) for t in mass), vocab, out, cut, cut_id)
        results.append([t.cpu() for t in (ok, out, cut, cut_id)])
    (ok, out, cut, cut_id), (ok2, out2, cut2, cut_id2) = results
    assert torch.equal(ok, ok2) and 0 < ok.sum() < rows  # both kinds of rows are here
    for got, poison in ((out2, -7), (cut2, 7.0), (cut_id2, -7)):  # written where ok, left alone elsewhere
        assert (got[pick.cpu()[~ok]] == poison).all()
    assert torch.equal(out, out2) and torch.equal(cut_id, cut_id2)
    torch.testing.assert_close(cut, cut2, rtol=0, atol=0)
    # Each drawn token is kept: above the cut, or at it with an id up to cut_id.
    r = pick.cpu()[ok]
    value = x.cpu()[r, out[r]]
    assert ((value > cut[r]) | ((value == cut[r]) & (out[r] <= cut_id[r]))).all()


def brute_floor(x: torch.Tensor, inv_temp: float, floor: float, k: int, p: float) -> float:
    """The smallest logit kept, from the definitions: every value tied with the k-th largest stays;
    a value stays under top-p while the mass of the logits above it is below p."""
    x = x.double()
    vocab = x.numel()
    low = floor
    if k < vocab:
        low = max(low, x.sort(descending=True).values[k - 1].item())
    if p < 1:
        w = torch.where((x >= low) & (x > float("-inf")), torch.exp((x - x.max()) * inv_temp), 0)
        z = w.sum()
        kept = [v for v in x.unique().tolist() if v >= low and w[x > v].sum() < p * z]
        low = max(low, min(kept))
    return low


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows, vocab", [(6, 40), (10, 700), (4, 3000)])
def test_exact_search_finds_the_kept_sets_edge(impl, rows, vocab):
    device = impl_device(impl)
    x, inv_temp, floor = random_rows(rows, vocab, seed=vocab, device=device, ties=vocab == 700)
    top_k, top_p, keys = random_filters(rows, vocab, 64, seed=vocab, device=device)
    ok = torch.zeros(rows, dtype=torch.bool, device=device)
    ok[3] = True  # left alone
    cut = torch.full((rows,), 7.0, device=device)
    out = torch.full((rows,), -7, dtype=torch.int64, device=device)
    fn(impl, "draw_unsettled")(x, None, ok, keys, inv_temp, floor, top_k, top_p, out, cut)
    cut, out = cut.cpu(), out.cpu()
    assert cut[3] == 7.0 and out[3] == -7
    for r in [r for r in range(rows) if r != 3]:
        expected = brute_floor(x[r].cpu(), inv_temp[r].item(), floor[r].item(), int(top_k[r]), top_p[r].item())
        assert cut[r].item() == pytest.approx(expected, rel=1e-6), r
    # The draw: Gumbel-max over the row's logits at or above its edge.
    drawn = gumbel_argmax_reference(x.cpu(), keys.cpu(), inv_temp.cpu(), cut)
    assert torch.equal(out[~ok.cpu()], drawn[~ok.cpu()])


@pytest.mark.parametrize("impl", IMPLS)
def test_window_and_search_keep_the_same_tokens_and_draw_the_same_one(impl, rows=24, vocab=3000, n=64):
    # Without ties, where the window settles a row, the search must find the same edge, and the
    # whole-row draw above that edge must pick the window's token.
    device = impl_device(impl)
    x, inv_temp, floor = random_rows(rows, vocab, seed=11, device=device)
    x[0], x[2] = torch.randn(2, vocab, device=device)  # no masked rows here
    floor[0], floor[2] = float("-inf"), float("-inf")
    top_k, top_p, keys = random_filters(rows, vocab, n, seed=12, device=device)
    top_k = torch.where(top_k > n, vocab, top_k).int()  # every top-k inside the window
    cand, exact, mass = fn(impl, "top_candidates")(x, n, None, inv_temp, floor, True)
    out = torch.full((rows,), -1, dtype=torch.int64, device=device)
    cut = torch.full((rows,), 7.0, device=device)
    ok = fn(impl, "draw_candidates")(cand, exact, None, keys, inv_temp, floor, top_k, top_p, mass, vocab, out, cut)
    assert ok.sum() >= rows // 2
    edge = torch.full((rows,), 7.0, device=device)
    searched = torch.full((rows,), -1, dtype=torch.int64, device=device)
    fn(impl, "draw_unsettled")(x, None, torch.zeros_like(ok), keys, inv_temp, floor, top_k, top_p, searched, edge)
    settled = ok.cpu()
    xs = x.cpu()[settled]
    assert torch.equal(xs >= edge.cpu()[settled][:, None], xs >= cut.cpu()[settled][:, None])
    assert torch.equal(searched.cpu()[settled], out.cpu()[settled])


def test_candidate_keys_order_by_value_then_lower_id_and_decode_back():
    values = torch.tensor([[-3.5, 0.0, 2.0, 2.0, -0.0, float("-inf"), 1e-30, -1e30]])
    ids = torch.tensor([[5, 1, 9, 4, 0, 2, 7, 3]])
    keys = candidate_keys(values, ids)
    order = keys.argsort(dim=1, descending=True)
    assert ids.gather(1, order).tolist() == [[4, 9, 7, 0, 1, 5, 3, 2]]  # -0.0 ties with 0.0
    v, i = decode_candidates(torch.cat([keys, torch.tensor([[EMPTY]])], dim=1))
    assert torch.equal(i, torch.cat([ids, torch.tensor([[0]])], dim=1))
    assert torch.equal(v[:, :-1], values) and v[0, -1] == float("-inf")
