"""Host time of a step beyond the CUDA graphs (GPU only).

1. cuBLAS's host time per matmul call, the same token count every call against a new one every
   call, per BLAS backend: a count cuBLAS has not seen pays its heuristics on the host.
2. On the engine: ~100 decodes running, a 600-1,024-token prompt added every fourth step; the host
   time of enqueue() for the prefill steps and the decode steps, then a torch.profiler table of
   a few steps (CPU self time per op).

    python3 benchmarks/prefill_host.py [--max-cudagraph-capture-size 512]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, not benchmarks/sampling.py


def mm_host_us(counts: list[int], backend: str) -> float:
    """Median host time of torch.mm([M, 1024] x [1024, 3072], bf16), the GPU idle before each call."""
    torch.backends.cuda.preferred_blas_library(backend)
    weight = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16)
    inputs = {m: torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16) for m in set(counts)}
    for m in list(inputs)[:3]:
        torch.mm(inputs[m], weight.t())
    times = []
    for m in counts:
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(inputs[m], weight.t())
        times.append((time.perf_counter() - start) * 1e6)
    torch.backends.cuda.preferred_blas_library("default")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    parser.add_argument("--max-cudagraph-capture-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    rng = random.Random(0)
    for backend in ("cublas", "cublaslt"):
        same = mm_host_us([700] * 200, backend)
        new = mm_host_us([rng.randint(300, 2000) for _ in range(200)], backend)
        print(f"mm host time ({backend}): the same M every call {same:.1f} us, a new M every call {new:.1f} us")

    from aio_engine import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096, skip_tokenizer_init=True,
              use_tqdm_on_load=False, max_cudagraph_capture_size=args.max_cudagraph_capture_size)
    core = llm.core
    vocab = core.config.model.vocab_size
    params = SamplingParams(temperature=1.0, max_tokens=4000, ignore_eos=True)
    for i in range(100):
        core.add_request(f"d{i}", {"prompt_token_ids": [rng.randrange(vocab) for _ in range(rng.randint(100, 300))]},
                         params)
    for _ in range(30):
        core.step()
    torch.cuda.synchronize()

    current: dict = {}
    stage, enqueue = core.stage, core.enqueue

    def timed_stage(out):
        current["prefill"] = out.num_prefill_tokens
        return stage(out)

    def timed_enqueue(staged):
        start = time.perf_counter()
        try:
            return enqueue(staged)
        finally:
            current["enqueue_ms"] = (time.perf_counter() - start) * 1e3

    core.stage, core.enqueue = timed_stage, timed_enqueue

    def run(steps: int, tag: str) -> None:
        rows = []
        for k in range(steps):
            if k % 4 == 0:
                prompt = [rng.randrange(vocab) for _ in range(rng.randint(600, 1024))]
                core.add_request(f"p{tag}{k}", {"prompt_token_ids": prompt}, params)
            current.clear()
            core.step()
            rows.append(dict(current))
        prefill = [r["enqueue_ms"] for r in rows if r.get("prefill", 0) > 500]
        decode = [r["enqueue_ms"] for r in rows if not r.get("prefill")]
        print(f"{tag}: enqueue of a prefill step median {statistics.median(prefill):.1f} ms "
              f"({', '.join(f'{x:.1f}' for x in sorted(prefill))}), of a decode step {statistics.median(decode):.2f} ms")

    run(args.steps, "steps")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(8, "profiled steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
