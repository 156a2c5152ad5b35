"""Top-k / top-p / min-p selection without sorting the vocabulary, exact for every input.

top_candidates finds each row's N largest logits in about one read of the logits: the maxima of
small chunks give a lower bound on the N-th value, and only the few chunks above it are read
again into a small buffer (Triton), sorted by torch.topk. draw_candidates applies top-k, the
min-p floor and top-p to that sorted window and draws by Gumbel-max (one program per row). Rows
the window cannot settle (a nucleus wider than it, a top-k beyond it, ties overflowing the
buffer) get an exact threshold from draw_unsettled, a radix-style search over the whole row, and
a Gumbel-max draw above it. Nothing syncs with the host: which rows need the search is only
known on the device.

Candidates are int64 sort keys: a float's order-preserving 32 bits (-0.0 ranked with +0.0), then
2**31 - 1 - token id, so one descending order ranks by value, then by lower id; EMPTY pads rows
with fewer finite logits than asked for.

Kept sets: top-k keeps the k best by (value, then lower id) on the window; the search keeps
every token tied with the k-th. Top-p keeps a token while the mass of the tokens ranked above
it is below p, over what top-k and min-p left.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sampling import (
    NEG_INF,
    _gumbel,
    _row_of,
    _scan,
    _select,
    gumbel_argmax_reference,
    gumbel_noise_reference,
)

_TILE = 4096  # logits per program in the candidate kernels
EMPTY = -(2**63) + 1  # below every candidate key


def candidate_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 values and token ids -> int64 sort keys (see the module docstring)."""
    b = values.masked_fill(values == 0, 0.0).view(torch.int32)  # -0.0 ranks with +0.0
    return ((b ^ ((b >> 31) & 0x7FFFFFFF)).long() << 32) | (0x7FFFFFFF - ids.long())


def decode_candidates(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 sort keys -> (float32 values, int64 ids); EMPTY gives (-inf, 0)."""
    empty = keys == EMPTY
    hi = (keys >> 32).to(torch.int32)
    values = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32).masked_fill(empty, NEG_INF)
    return values, (0x7FFFFFFF - (keys & 0x7FFFFFFF)).masked_fill(empty, 0)


@triton.jit
def _order(x):
    b = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)  # -0.0 ranks with +0.0
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unorder(k):
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


# --- exact top-N candidates: chunk maxima bound the N-th value from below, then a gather ---

@triton.jit
def _chunk_max_kernel(logits_ptr, stride, rows_ptr, inv_temp_ptr, floor_ptr, cmax_ptr, tmax_ptr, tmass_ptr, cand_ptr,
                      count_ptr, vocab, num_chunks, cap, HAS_ROWS: tl.constexpr, HAS_FLOOR: tl.constexpr,
                      WITH_MASS: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, FILL: tl.constexpr):
    i = tl.program_id(0)
    tile = tl.program_id(1)
    # Ready the gather's buffer and counter (the gather is the next launch, so it sees these).
    fill = tile * FILL + tl.arange(0, FILL)
    tl.store(cand_ptr + i * cap + fill, tl.full([FILL], -9223372036854775807, tl.int64), mask=fill < cap)
    if tile == 0:
        tl.store(count_ptr + i, 0)
    row = _row_of(rows_ptr, i, HAS_ROWS)
    chunk = tile * CHUNKS + tl.arange(0, CHUNKS)
    cols = chunk[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]  # [CHUNKS, CHUNK]
    x = tl.load(logits_ptr + row * stride + cols, mask=cols < vocab, other=float("-inf"))
    cmax = tl.max(x, 1)
    tl.store(cmax_ptr + i * num_chunks + chunk, cmax, mask=chunk < num_chunks)
    if WITH_MASS:  # sum of exp((x - tile max) / T) over x >= floor: the row's softmax normalizer, in parts
        floor = float("-inf")
        if HAS_FLOOR:
            floor = tl.load(floor_ptr + row)
        top = tl.max(cmax, 0)
        keep = (x >= floor) & (x > float("-inf"))
        mass = tl.sum(tl.sum(tl.where(keep, tl.exp((x - top) * tl.load(inv_temp_ptr + row)), 0.0), 1), 0)
        tl.store(tmax_ptr + i * tl.num_programs(1) + tile, top)
        tl.store(tmass_ptr + i * tl.num_programs(1) + tile, mass)


@triton.jit
def _gather_kernel(logits_ptr, stride, rows_ptr, cmax_ptr, thr_ptr, thr_stride, count_ptr, cand_ptr, vocab, num_chunks,
                   cap, HAS_ROWS: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    # Every finite logit >= thr (the N-th largest chunk maximum, so <= the N-th largest logit)
    # goes to the row's buffer, in any order; count says how many there were.
    i = tl.program_id(0)
    tile = tl.program_id(1)
    thr = tl.load(thr_ptr + i * thr_stride)
    chunk = tile * CHUNKS + tl.arange(0, CHUNKS)
    cmax = tl.load(cmax_ptr + i * num_chunks + chunk, mask=chunk < num_chunks, other=float("-inf"))
    if tl.max(((cmax >= thr) & (cmax > float("-inf"))).to(tl.int32), 0) > 0:  # most tiles hold no candidate
        row = _row_of(rows_ptr, i, HAS_ROWS)
        cols = tile * CHUNKS * CHUNK + tl.arange(0, CHUNKS * CHUNK)
        hot = tl.load(cmax_ptr + i * num_chunks + cols // CHUNK, mask=cols < vocab, other=float("-inf")) >= thr
        x = tl.load(logits_ptr + row * stride + cols, mask=hot & (cols < vocab), other=float("-inf"))
        take = hot & (x >= thr) & (x > float("-inf"))
        base = tl.atomic_add(count_ptr + i, tl.sum(take.to(tl.int32), 0))
        at = base + tl.cumsum(take.to(tl.int32), 0) - 1
        key = (_order(x).to(tl.int64) << 32) | (0x7FFFFFFF - cols.to(tl.int64))
        tl.store(cand_ptr + i * cap + at, key, mask=take & (at < cap))


def _mass_reference(x, inv_temp, floor):
    top = x.amax(dim=1, keepdim=True)
    keep = (x > NEG_INF) if floor is None else (x >= floor[:, None]) & (x > NEG_INF)
    mass = torch.where(keep, torch.exp((x - top) * inv_temp[:, None]), 0.0).sum(dim=1, keepdim=True)
    return top, mass


def top_candidates_reference(logits, n, rows=None, inv_temp=None, floor=None, with_mass=False):
    vocab = logits.shape[1]
    x = logits if rows is None else logits.index_select(0, rows)
    keys = candidate_keys(x, torch.arange(vocab, device=x.device).expand_as(x)).masked_fill(x == NEG_INF, EMPTY)
    top = keys.topk(min(n, vocab), dim=1).values  # keys are distinct, so the order is unique
    if n > vocab:
        top = torch.cat([top, top.new_full((x.shape[0], n - vocab), EMPTY)], dim=1)
    exact = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if not with_mass:
        return top, exact, None
    r = _select(rows, logits.shape[0], logits.device)
    return top, exact, _mass_reference(x, inv_temp[r], None if floor is None else floor[r])


def top_candidates_triton(logits, n, rows=None, inv_temp=None, floor=None, with_mass=False):
    (num_rows, vocab), dev = logits.shape, logits.device
    m = num_rows if rows is None else rows.numel()
    # Chunks small and many (>= 8n) keep the gather short: about n chunks hold a logit above the
    # N-th largest chunk maximum, most of them one, even where the best tokens sit close by id.
    chunk = 64
    while chunk > 1 and triton.cdiv(vocab, chunk) < 8 * n:
        chunk //= 2
    num_chunks, per_tile = triton.cdiv(vocab, chunk), _TILE // chunk
    tiles = triton.cdiv(num_chunks, per_tile)
    cmax = torch.empty(m, num_chunks, dtype=torch.float32, device=dev)
    tmax = tmass = cmax
    if with_mass:
        tmax, tmass = torch.empty(2, m, tiles, dtype=torch.float32, device=dev)
    cap = triton.next_power_of_2(max(8 * n, 256))
    cand = torch.empty(m, cap, dtype=torch.int64, device=dev)
    count = torch.empty(m, dtype=torch.int32, device=dev)
    _chunk_max_kernel[(m, tiles)](logits, logits.stride(0), rows, inv_temp, floor, cmax, tmax, tmass, cand, count,
                                  vocab, num_chunks, cap, HAS_ROWS=rows is not None, HAS_FLOOR=floor is not None,
                                  WITH_MASS=with_mass, CHUNK=chunk, CHUNKS=per_tile,
                                  FILL=triton.next_power_of_2(triton.cdiv(cap, tiles)), num_warps=8)
    if n <= num_chunks:
        thr = cmax.topk(n, dim=1).values[:, n - 1]
    else:
        thr = torch.full((m,), NEG_INF, device=dev)
    _gather_kernel[(m, tiles)](logits, logits.stride(0), rows, cmax, thr, thr.stride(0), count, cand, vocab, num_chunks,
                               cap, HAS_ROWS=rows is not None, CHUNK=chunk, CHUNKS=per_tile, num_warps=8)
    top = cand.topk(min(n, cap), dim=1).values
    return top, count <= cap, (tmax, tmass) if with_mass else None


def top_candidates(
    logits: torch.Tensor,  # [rows, vocab] float32
    n: int,  # candidates per row
    rows: torch.Tensor | None = None,
    inv_temp: torch.Tensor | None = None,  # [rows], with_mass only
    floor: torch.Tensor | None = None,  # [rows] or None, with_mass only
    with_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The n largest finite logits of each row as sort keys, descending [m, n]; `exact` [m] is False
    where a row had too many logits near its n-th (ties) for the buffer; with_mass adds, in parts
    (max [m, t], sum [m, t]), the sum of exp((x - max) / T) over the row's logits >= floor."""
    if logits.is_cuda:
        return top_candidates_triton(logits, n, rows, inv_temp, floor, with_mass)
    return top_candidates_reference(logits, n, rows, inv_temp, floor, with_mass)


# --- the draw among candidates: top-k, min-p floor and top-p over the sorted window ---

@triton.jit
def _draw_candidates_kernel(cand_ptr, exact_ptr, rows_ptr, keys_ptr, inv_temp_ptr, floor_ptr, top_k_ptr, top_p_ptr,
                            tmax_ptr, tmass_ptr, out_ptr, ok_ptr, cut_ptr, cut_id_ptr, n, vocab, tiles,
                            HAS_ROWS: tl.constexpr, HAS_FLOOR: tl.constexpr, HAS_TOP_P: tl.constexpr,
                            HAS_CUT_ID: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    i = tl.program_id(0)
    row = _row_of(rows_ptr, i, HAS_ROWS)
    pos = tl.arange(0, BLOCK)
    key = tl.load(cand_ptr + i * n + pos, mask=pos < n, other=-9223372036854775807)
    valid = key != -9223372036854775807
    value = tl.where(valid, _unorder((key >> 32).to(tl.int32)), float("-inf"))
    ids = tl.where(valid, 0x7FFFFFFF - (key & 0x7FFFFFFF), 0)
    inv_temp = tl.load(inv_temp_ptr + row)
    k = tl.load(top_k_ptr + row)
    floor = float("-inf")
    if HAS_FLOOR:
        floor = tl.load(floor_ptr + row)
    kept = valid & (pos < k) & (value >= floor)
    scaled = value * inv_temp
    # Without top-k the window settles the row if it holds every token above the floor, or (top-p)
    # reaches mass p; with top-k, if it holds the k best.
    last = tl.min(tl.where(pos < n, value, float("inf")), 0)
    covered = (n >= vocab) | (tl.sum(valid.to(tl.int32), 0) < n) | (last < floor)
    if HAS_TOP_P:
        p = tl.load(top_p_ptr + row)
        if k < vocab:  # top-p within the top-k: softmax over the kept candidates
            e = tl.where(kept, tl.exp(scaled - tl.max(tl.where(kept, scaled, float("-inf")), 0)), 0.0)
            probs = e / tl.sum(e, 0)
        else:  # top-p alone: the whole row's normalizer, from the candidate kernel's parts
            t = tl.arange(0, BLOCK_T)
            tmax = tl.load(tmax_ptr + i * tiles + t, mask=t < tiles, other=float("-inf"))
            tmass = tl.load(tmass_ptr + i * tiles + t, mask=t < tiles, other=0.0)
            top = tl.max(tmax, 0)
            z = tl.sum(tl.where(tmax > float("-inf"), tmass * tl.exp((tmax - top) * inv_temp), 0.0), 0)
            probs = tl.where(kept, tl.exp((value - top) * inv_temp) / z, 0.0)
        cum = tl.cumsum(probs, 0)
        kept = kept & (cum - probs < tl.where(p < 1.0, p, float("inf")))  # mass of the more likely tokens < p
        covered = covered | ((p < 1.0) & (tl.max(cum, 0) >= p))
    ok = (tl.load(exact_ptr + i) != 0) & (((k < vocab) & (k <= n)) | ((k >= vocab) & covered))
    score = tl.where(kept, scaled + _gumbel(tl.load(keys_ptr + row), ids), float("-inf"))
    j = tl.argmax(score, 0)
    tl.store(ok_ptr + i, ok)
    tl.store(out_ptr + row, tl.sum(tl.where(pos == j, ids, 0), 0), mask=ok)
    # The kept set as a cut: logits above the last kept value, or equal to it at ids up to its id.
    num_kept = tl.sum(kept.to(tl.int32), 0)
    cut = tl.where(num_kept > 0, tl.sum(tl.where(pos == num_kept - 1, value, 0.0), 0), float("inf"))
    tl.store(cut_ptr + row, cut, mask=ok)
    if HAS_CUT_ID:
        tl.store(cut_id_ptr + row, tl.sum(tl.where(pos == num_kept - 1, ids, 0), 0), mask=ok)


def draw_candidates_reference(cand, exact, rows, keys, inv_temp, floor, top_k, top_p, mass, vocab, out, cut,
                              cut_id=None):
    n = cand.shape[1]
    r = _select(rows, out.shape[0], cand.device)
    value, ids = decode_candidates(cand)
    valid = cand != EMPTY
    it, k = inv_temp[r][:, None], top_k[r][:, None].long()
    fl = torch.full_like(it, NEG_INF) if floor is None else floor[r][:, None]
    pos = torch.arange(n, device=cand.device)
    kept = valid & (pos < k) & (value >= fl)
    scaled = value * it
    last = value.masked_fill(~valid, NEG_INF)[:, -1:]
    covered = (n >= vocab) | (valid.sum(dim=1, keepdim=True) < n) | (last < fl)
    if top_p is not None:
        p = top_p[r][:, None]
        local = scaled.masked_fill(~kept, NEG_INF).softmax(dim=-1)
        tmax, tmass = mass if mass is not None else (value[:, :1], torch.ones_like(value[:, :1]))
        top = tmax.amax(dim=1, keepdim=True)
        z = torch.where(tmax > NEG_INF, tmass * torch.exp((tmax - top) * it), 0.0).sum(dim=1, keepdim=True)
        whole = torch.where(kept, torch.exp((value - top) * it) / z, 0.0)
        probs = torch.where(k < vocab, local.nan_to_num(0.0), whole)
        cum = probs.cumsum(dim=-1)
        kept &= (cum - probs < p) | (p >= 1.0)
        covered |= (p < 1.0) & (cum[:, -1:] >= p)
    ok = exact & torch.where(k < vocab, k <= n, covered)[:, 0]
    score = (scaled + gumbel_noise_reference(keys[r], ids)).masked_fill(~kept, NEG_INF)
    tokens = ids.gather(1, score.argmax(dim=-1, keepdim=True))[:, 0]
    out.index_copy_(0, r, torch.where(ok, tokens, out[r]))
    last = (kept.sum(dim=1, keepdim=True) - 1).clamp(min=0)
    cuts = torch.where(kept.any(dim=1, keepdim=True), value.gather(1, last), float("inf"))[:, 0]
    cut.index_copy_(0, r, torch.where(ok, cuts, cut[r]))
    if cut_id is not None:
        cut_id.index_copy_(0, r, torch.where(ok, ids.gather(1, last)[:, 0].to(cut_id.dtype), cut_id[r]))
    return ok


def draw_candidates_triton(cand, exact, rows, keys, inv_temp, floor, top_k, top_p, mass, vocab, out, cut,
                           cut_id=None):
    m, n = cand.shape
    ok = torch.empty(m, dtype=torch.bool, device=cand.device)
    if m == 0:
        return ok
    tmax, tmass = mass if mass is not None else (cand, cand)
    tiles = tmax.shape[1] if mass is not None else 1
    _draw_candidates_kernel[(m,)](cand, exact, rows, keys, inv_temp, floor, top_k, top_p, tmax, tmass, out, ok, cut,
                                  cut_id, n, vocab, tiles, HAS_ROWS=rows is not None, HAS_FLOOR=floor is not None,
                                  HAS_TOP_P=top_p is not None, HAS_CUT_ID=cut_id is not None,
                                  BLOCK=triton.next_power_of_2(n), BLOCK_T=triton.next_power_of_2(tiles),
                                  num_warps=4 if n <= 1024 else 8)
    return ok


def draw_candidates(
    cand: torch.Tensor,  # [m, n] sort keys from top_candidates
    exact: torch.Tensor,  # [m] bool from top_candidates
    rows: torch.Tensor | None,
    keys: torch.Tensor,  # [rows] int64 row keys
    inv_temp: torch.Tensor,  # [rows] float32
    floor: torch.Tensor | None,  # [rows] float32 min-p floors on the logits, or None
    top_k: torch.Tensor,  # [rows] int32, vocab where off
    top_p: torch.Tensor | None,  # [rows] float32, 1 where off; None when no row has top-p
    mass: tuple[torch.Tensor, torch.Tensor] | None,  # top_candidates' parts, for top-p without top-k
    vocab: int,
    out: torch.Tensor,  # [rows] int64 tokens, written where ok
    cut: torch.Tensor,  # [rows] float32, written where ok: the smallest kept logit (+inf: none)
    cut_id: torch.Tensor | None = None,  # [rows] int64, written where ok: the largest kept id at `cut`
) -> torch.Tensor:
    """One Gumbel-max draw per row among its kept candidates; returns ok [m] bool, False where the
    candidates cannot settle the row (buffer overflow, top-k beyond the window, a nucleus wider
    than the window): those rows need draw_unsettled."""
    if cand.is_cuda:
        return draw_candidates_triton(cand, exact, rows, keys, inv_temp, floor, top_k, top_p, mass, vocab, out, cut,
                                      cut_id)
    return draw_candidates_reference(cand, exact, rows, keys, inv_temp, floor, top_k, top_p, mass, vocab, out, cut,
                                     cut_id)


# --- the exact search for rows the window cannot settle ---

@triton.jit
def _search(row_ptr, vocab, low, top, inv_temp, target, MASS: tl.constexpr, BLOCK: tl.constexpr,
            PIVOTS: tl.constexpr):
    # The largest 32-bit order key t with F(t) >= target, F(t) = the number (MASS: the softmax mass
    # over logits >= low) of logits whose key is >= t. F falls as t grows, so each pass over the
    # row tries PIVOTS evenly spaced keys and narrows the range PIVOTS-fold: 8 passes pin 32 bits.
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    j = tl.arange(1, PIVOTS + 1).to(tl.int64)
    while lo < hi:
        step = (hi - lo) // PIVOTS + 1
        pivots = lo + j * step
        acc = tl.zeros([PIVOTS], tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            x = tl.load(row_ptr + cols, mask=inside, other=float("-inf"))
            if MASS:
                w = tl.where(inside & (x >= low) & (x > float("-inf")), tl.exp((x - top) * inv_temp), 0.0)
            else:
                w = tl.where(inside, 1.0, 0.0)
            above = _order(x).to(tl.int64)[:, None] >= pivots[None, :]
            acc += tl.sum(tl.where(above, w[:, None], 0.0), 0)
        good = tl.sum(((acc >= target) & (pivots <= hi)).to(tl.int64), 0)  # a prefix of the pivots
        lo_next = lo + good * step
        hi = tl.minimum(hi, lo_next + step - 1)
        lo = lo_next
    return _unorder(lo.to(tl.int32))


@triton.jit
def _search_draw_kernel(logits_ptr, stride, rows_ptr, ok_ptr, keys_ptr, inv_temp_ptr, floor_ptr, top_k_ptr, top_p_ptr,
                        out_ptr, cut_ptr, vocab, HAS_ROWS: tl.constexpr, HAS_FLOOR: tl.constexpr,
                        HAS_TOP_P: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row the window did not settle (the others leave at once): the kept set's
    # edge by search, then Gumbel-max over the whole row above it. Latency-bound for a lone row
    # (~10 passes over it by one program), but such rows are rare where top-p nuclei are small.
    i = tl.program_id(0)
    if tl.load(ok_ptr + i) == 0:
        row = _row_of(rows_ptr, i, HAS_ROWS)
        row_ptr = logits_ptr + row * stride
        low = tl.full([], float("-inf"), tl.float32)
        if HAS_FLOOR:
            low = tl.load(floor_ptr + row)
        inv_temp = tl.load(inv_temp_ptr + row)
        k = tl.load(top_k_ptr + row)
        if k < vocab:  # the k-th largest logit
            low = tl.maximum(low, _search(row_ptr, vocab, low, 0.0, 1.0, k.to(tl.float32), False, BLOCK, 16))
        if HAS_TOP_P:
            p = tl.load(top_p_ptr + row)
            if p < 1.0:
                top = tl.full([], float("-inf"), tl.float32)
                z = tl.zeros([], tl.float32)
                for start in range(0, vocab, BLOCK):  # online max and normalizer over logits >= low
                    cols = start + tl.arange(0, BLOCK)
                    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
                    new_top = tl.maximum(top, tl.max(x, 0))
                    keep = (x >= low) & (x > float("-inf"))
                    rescale = tl.where(new_top > float("-inf"), tl.exp((top - new_top) * inv_temp), 1.0)
                    z = z * rescale + tl.sum(tl.where(keep, tl.exp((x - new_top) * inv_temp), 0.0), 0)
                    top = new_top
                low = tl.maximum(low, _search(row_ptr, vocab, low, top, inv_temp, p * z, True, BLOCK, 16))
        tl.store(cut_ptr + row, low)
        best, arg = _scan(row_ptr, 0, vocab, tl.load(keys_ptr + row), inv_temp, low, True, BLOCK)
        top = tl.max(best, 0)
        tl.store(out_ptr + row, tl.min(tl.where(best == top, arg, vocab), 0).to(tl.int64))


def draw_unsettled_reference(logits, rows, ok, keys, inv_temp, floor, top_k, top_p, out, cut):
    vocab = logits.shape[1]
    r = _select(rows, logits.shape[0], logits.device)[~ok]  # (a host sync, which the CPU does not mind)
    if not len(r):
        return
    values = logits.index_select(0, r).sort(dim=1, descending=True).values
    low = torch.full((len(r), 1), NEG_INF, device=logits.device) if floor is None else floor[r][:, None]
    k = top_k[r][:, None].long()
    kth = values.gather(1, (k - 1).clamp(0, vocab - 1))
    low = torch.where(k < vocab, torch.maximum(low, kth), low)
    if top_p is not None:
        p, it = top_p[r][:, None], inv_temp[r][:, None]
        w = torch.where((values >= low) & (values > NEG_INF), torch.exp((values - values[:, :1]) * it), 0.0)
        # Mass of the logits >= each value (ties counted whole): the cumulative sum at a tie's end.
        last = torch.searchsorted(-values, -values, right=True) - 1
        above = w.cumsum(dim=1).gather(1, last)
        first = (above >= p * w.sum(dim=1, keepdim=True)).int().argmax(dim=1, keepdim=True)
        low = torch.where(p < 1.0, torch.maximum(low, values.gather(1, first)), low)
    cut.index_copy_(0, r, low[:, 0])
    gumbel_argmax_reference(logits, keys, inv_temp, cut, r, out)


def draw_unsettled_triton(logits, rows, ok, keys, inv_temp, floor, top_k, top_p, out, cut):
    m = ok.numel()
    if m:
        _search_draw_kernel[(m,)](logits, logits.stride(0), rows, ok, keys, inv_temp, floor, top_k, top_p, out, cut,
                                  logits.shape[1], HAS_ROWS=rows is not None, HAS_FLOOR=floor is not None,
                                  HAS_TOP_P=top_p is not None, BLOCK=1024, num_warps=8)


def draw_unsettled(
    logits: torch.Tensor,  # [rows, vocab] float32
    rows: torch.Tensor | None,
    ok: torch.Tensor,  # [m] bool from draw_candidates: rows already drawn, left alone
    keys: torch.Tensor,  # [rows] int64 row keys
    inv_temp: torch.Tensor,  # [rows] float32
    floor: torch.Tensor | None,  # [rows] float32 min-p floors, or None
    top_k: torch.Tensor,  # [rows] int32, vocab where off
    top_p: torch.Tensor | None,  # [rows] float32, 1 where off
    out: torch.Tensor,  # [rows] int64 tokens, written for the rows not ok
    cut: torch.Tensor,  # [rows] float32, written for the rows not ok
) -> None:
    """For each row not ok: the smallest logit it keeps (min-p floor, k-th largest, nucleus edge),
    exactly, into `cut` (logits >= it are the kept set: every token tied at the edge stays), then
    one Gumbel-max draw over the row's kept logits into `out`."""
    fn = draw_unsettled_triton if logits.is_cuda else draw_unsettled_reference
    fn(logits, rows, ok, keys, inv_temp, floor, top_k, top_p, out, cut)
