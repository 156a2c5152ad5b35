"""Kernel benchmarks on CUDA, each figure beside its roofline.

Memory-bound kernels report bytes moved / time against the measured device-copy ceiling
(3.0 TB/s on the H100 here); prefill attention reports TFLOP/s beside torch's
scaled_dot_product_attention (flash backend) on equal shapes. Times are medians of
triton.testing.do_bench (CUDA events), inputs random, rotated where they would fit in L2;
"graphed-decode" (decode attention on ragged batches) and "gemv" (batch-1 linears beside cuBLAS)
time inside CUDA graphs (do_bench_cudagraph), where do_bench would measure the host's launch.

  python benchmarks/kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.activation import silu_and_mul_triton  # noqa: E402
from kernels.attention import AttentionMetadata, paged_attention_triton  # noqa: E402
from kernels.cache import write_kv_triton  # noqa: E402
from kernels.layernorm import fused_add_rms_norm_triton  # noqa: E402
from kernels.rotary import apply_rotary_triton, cos_sin_cache  # noqa: E402

PEAK_BW = 3.0e12  # measured device copy, bytes/s
PEAK_FLOPS = 790e12  # measured bf16 matmul


def bench(fn, rep: int = 200) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def paged_batch(batch: int, context: int | list[int], q_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int = 16, dtype=torch.bfloat16):
    """`batch` requests of `q_len` new tokens after `context` cached ones (one count, or one per request)."""
    contexts = context if isinstance(context, list) else [context] * batch
    blocks = [-(-(c + q_len) // block_size) for c in contexts]
    num_blocks, width = sum(blocks), max(blocks)
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    tables = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[used:used + n]
        used += n
    starts = [i * q_len for i in range(batch + 1)]
    lens = [c + q_len for c in contexts]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch * q_len, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"), block_tables=tables,
        max_query_len=q_len, max_seq_len=max(lens), query_start_loc_host=starts, seq_lens_host=lens,
    )
    q = torch.randn(batch * q_len, num_heads, head_dim, device="cuda", dtype=dtype)
    return q, kv, meta


def decode_attention(rows: list) -> None:
    heads = (32, 8, 128)  # Llama-3.1-8B
    for batch, context in [(1, 32768), (64, 4096), (256, 1024), (128, 2048)]:
        q, kv, meta = paged_batch(batch, context - 1, 1, *heads)
        out = torch.empty_like(q)
        ms = bench(lambda: paged_attention_triton(q, kv, meta, 0.088, out=out))
        kv_bytes = 2 * batch * context * heads[1] * heads[2] * 2
        bw = kv_bytes / (ms * 1e-3)
        rows.append({"kernel": "decode attention", "shape": f"{batch}x{context} (32q/8kv heads, d128, bf16)",
                     "time_us": round(ms * 1e3, 1), "achieved": f"{bw / 1e12:.2f} TB/s",
                     "roofline_pct": round(100 * bw / PEAK_BW, 1)})


def graphed_decode(rows: list) -> None:
    """Decode attention timed inside CUDA graphs (as the engine's FULL graphs run it: no launch
    overhead, which dominates do_bench at small batches), qwen3-0.6b heads, ragged contexts as in
    the throughput workload: the shape's plan (kernels.attention.decode_plan) beside one pass with
    32-key tiles (the large-batch default before the eleventh session) and the best of a grid."""
    import random

    from kernels.attention import DECODE_CONFIG, decode_plan

    rng = random.Random(0)
    stream = torch.cuda.Stream()
    cases = [(1, "600", [599]), (1, "4000", [3999])]
    cases += [(b, "100-2048", [rng.randint(100, 2048) for _ in range(b)]) for b in (8, 32, 64, 128, 256)]
    cases += [(b, "1000-4000", [rng.randint(1000, 4000) for _ in range(b)]) for b in (16, 64)]
    cases += [(b, "50-400", [rng.randint(50, 400) for _ in range(b)]) for b in (16, 64, 128, 256)]
    for batch, label, contexts in cases:
        q, kv, meta = paged_batch(batch, contexts, 1, 16, 8, 128)
        out = torch.empty_like(q)
        nbytes = 2 * sum(c + 1 for c in contexts) * 8 * 128 * 2
        splits, tile, min_tiles = decode_plan(batch, 8)

        def time_it(**kwargs) -> float:
            with torch.cuda.stream(stream):
                return triton.testing.do_bench_cudagraph(
                    lambda: paged_attention_triton(q, kv, meta, 0.088, out=out, **kwargs), rep=30, return_mode="median")

        shape = f"{batch} x {label} (16q/8kv, d128, bf16)"
        add_row(rows, f"decode attention in a CUDA graph, plan ({splits} splits, {tile}-key tiles)", shape, time_it(),
                nbytes)
        add_row(rows, f"same, splits of at least {4 * tile} keys (the plan's: {min_tiles * tile})", shape,
                time_it(min_split=4 * tile), nbytes)
        add_row(rows, "same, one pass, 32-key tiles", shape, time_it(num_splits=1, config=DECODE_CONFIG), nbytes)
        grid = {(s, t): time_it(num_splits=s, config=(16, t, 4, 3), min_split=t) for s in (1, 2, 4, 8, 16, 32)
                for t in (32, 64) if s * batch <= 512}
        best = min(grid, key=grid.get)
        add_row(rows, f"same, best of the grid ({best[0]} splits, {best[1]}-key tiles, no minimum split)", shape,
                grid[best], nbytes)


def gemv(rows: list) -> None:
    """One-token matmuls (kernels/gemv.py) beside F.linear (cuBLAS) at the models' shapes, each over
    enough distinct weights to leave L2 (1 GiB a variant), timed inside a CUDA graph."""
    from kernels.gemv import gemv_triton

    shapes = {"llama-3.1-8b qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
              "lm_head": (128256, 4096), "qwen3-0.6b qkv": (4096, 1024), "o ": (1024, 2048),
              "gate_up ": (6144, 1024), "down ": (1024, 3072), "lm_head ": (151936, 1024)}
    stream = torch.cuda.Stream()
    for name, (n, k) in shapes.items():
        copies = max(2, min(64, (1 << 30) // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for label, fn in (("cuBLAS (F.linear)", torch.nn.functional.linear), ("Triton GEMV", gemv_triton)):
            with torch.cuda.stream(stream):
                ms = triton.testing.do_bench_cudagraph(lambda fn=fn: [fn(x, w) for w in weights], rep=50,
                                                       return_mode="median") / copies
            add_row(rows, f"batch-1 linear, {label}", f"{name.strip()} {n}x{k} bf16", ms, n * k * 2)


def prefill_attention(rows: list) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    num_heads, num_kv_heads, head_dim = 32, 8, 128
    for batch, length in [(4, 4096), (16, 1024), (1, 16384)]:
        q, kv, meta = paged_batch(batch, 0, length, num_heads, num_kv_heads, head_dim)
        out = torch.empty_like(q)
        ms = bench(lambda: paged_attention_triton(q, kv, meta, 0.088, out=out), rep=400)
        flops = 2 * 2 * batch * num_heads * length * length * head_dim / 2  # causal: half the square
        qs = torch.randn(batch, num_heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        ks = torch.randn(batch, num_heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        vs = torch.randn_like(ks)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True), rep=400)
        ours, theirs = flops / (ms * 1e-3), flops / (sdpa_ms * 1e-3)
        rows.append({"kernel": "prefill attention (paged, causal)", "shape": f"{batch}x{length} (32q/8kv, d128, bf16)",
                     "time_us": round(ms * 1e3, 1), "achieved": f"{ours / 1e12:.0f} TFLOP/s",
                     "roofline_pct": round(100 * ours / PEAK_FLOPS, 1),
                     "sdpa_flash_tflops": round(theirs / 1e12, 1), "vs_sdpa_pct": round(100 * ours / theirs, 1)})


def sweep(rows: list) -> None:
    """Time paged attention under every (rows, keys per tile, warps, stages) config; best first."""
    import itertools

    cases = {
        "prefill 16x1024": (paged_batch(16, 0, 1024, 32, 8, 128), [(bm, tn, w, st) for bm, tn, w, st in itertools.product(
            (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if not (bm == 128 and tn == 128 and st == 4)]),
        "decode 64x4096": (paged_batch(64, 4095, 1, 32, 8, 128), list(itertools.product((16,), (32, 64, 128), (2, 4, 8), (2, 3, 4)))),
        "decode 1x32768": (paged_batch(1, 32767, 1, 32, 8, 128), list(itertools.product((16,), (64, 128), (4, 8), (2, 3, 4)))),
    }
    for name, ((q, kv, meta), configs) in cases.items():
        out = torch.empty_like(q)
        timings = []
        for config in configs:
            try:
                ms = bench(lambda config=config: paged_attention_triton(q, kv, meta, 0.088, out=out, config=config), rep=100)
            except Exception as e:  # out of shared memory and the like
                print(f"{name} {config}: {type(e).__name__}")
                continue
            timings.append((ms, config))
        timings.sort()
        for ms, config in timings[:5]:
            rows.append({"kernel": f"sweep {name}", "shape": str(config), "time_us": round(ms * 1e3, 1),
                         "achieved": "", "roofline_pct": ""})


def elementwise(rows: list) -> None:
    tokens, hidden, inter = 8192, 4096, 14336
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: fused_add_rms_norm_triton(x, r, w, 1e-6))
    add_row(rows, "fused add + RMSNorm", f"{tokens}x{hidden} bf16", ms, 4 * x.numel() * 2)
    g = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: silu_and_mul_triton(g))
    add_row(rows, "SiLU-and-mul", f"{tokens}x{inter} bf16", ms, g.numel() * 2 * 3 // 2)
    qkv = torch.randn(tokens, 48 * 128, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, : 32 * 128].view(tokens, 32, 128), qkv[:, 32 * 128: 40 * 128].view(tokens, 8, 128)
    cache = cos_sin_cache(1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128)), 131072).cuda()
    pos = torch.randint(0, 131072, (tokens,), device="cuda")
    ms = bench(lambda: apply_rotary_triton(pos, q, k, cache))
    add_row(rows, "rotary (q and k in place)", f"{tokens} tokens, 32+8 heads d128", ms, 2 * 40 * 128 * 2 * tokens + tokens * 128 * 4)
    kvc = torch.randn(2, 4096, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    kk = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    slots = torch.randperm(4096 * 16, device="cuda")[:tokens]
    ms = bench(lambda: write_kv_triton(kk, vv, kvc, slots))
    add_row(rows, "KV-cache write", f"{tokens} tokens, 8 kv heads d128", ms, 4 * kk.numel() * 2)


def add_row(rows: list, name: str, shape: str, ms: float, nbytes: int) -> None:
    bw = nbytes / (ms * 1e-3)
    rows.append({"kernel": name, "shape": shape, "time_us": round(ms * 1e3, 1), "achieved": f"{bw / 1e12:.2f} TB/s",
                 "roofline_pct": round(100 * bw / PEAK_BW, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["decode", "graphed-decode", "gemv", "prefill", "elementwise", "sweep"])
    args = parser.parse_args()
    rows: list = []
    for name, fn in (("decode", decode_attention), ("graphed-decode", graphed_decode), ("gemv", gemv),
                     ("prefill", prefill_attention),
                     ("elementwise", elementwise), ("sweep", sweep)):
        if args.only == name or (args.only is None and name != "sweep"):
            fn(rows)
            torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| kernel | shape | time (us) | achieved | % of roofline | vs SDPA flash |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_sdpa_pct']}% ({r['sdpa_flash_tflops']} TFLOP/s)" if "vs_sdpa_pct" in r else ""
        print(f"| {r['kernel']} | {r['shape']} | {r['time_us']} | {r['achieved']} | {r['roofline_pct']}% | {vs} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
