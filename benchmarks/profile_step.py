"""Where a step's time goes: host phases (schedule, batch build, forward launch, sampler, sync,
finish) with CUDA-synchronized timers, plus the top CUDA kernels from torch.profiler.

  python benchmarks/profile_step.py --model benchmarks/models/qwen3-0.6b --load-format dummy --batch 64
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aio_engine.llm import LLM  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--trace", type=Path)
    args = parser.parse_args()
    llm = LLM(args.model, load_format=args.load_format, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096)
    core = llm.core
    rng = random.Random(0)
    vocab = core.config.model.vocab_size
    for i in range(args.batch):
        core.add_request(f"r{i}", {"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.prompt_len)]},
                         SamplingParams(temperature=1.0, max_tokens=10_000, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in core.scheduler.requests.values()):
        core.step()  # prefill everything first
    if core.in_flight is not None:  # the timed loop below runs steps one by one: nothing may be ahead
        core._finish_in_flight()
    timers: dict[str, float] = defaultdict(float)
    runner = core.runner
    original_stage, original_forward, original_sampler = runner._stage_inputs, runner._forward_inputs, runner.sampler

    def timed(name, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = fn(*a, **k)
            torch.cuda.synchronize()
            timers[name] += time.perf_counter() - t
            return r
        return wrapper

    runner._stage_inputs = timed("stage (inputs built + uploaded)", original_stage)
    runner._forward_inputs = timed("forward (model + logits)", original_forward)
    runner.sampler = timed("sampler (metadata excluded)", original_sampler)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        t = time.perf_counter()
        out = core.schedule()
        timers["schedule"] += time.perf_counter() - t
        t = time.perf_counter()
        result = core.runner.execute(out)  # launch and wait, no overlap: phases add up
        timers["execute (all)"] += time.perf_counter() - t
        t = time.perf_counter()
        core.finish_step(out, result)
        timers["finish_step (update + detokenize)"] += time.perf_counter() - t
    total = time.perf_counter() - t0
    print(f"batch {args.batch}: {1e3 * total / args.steps:.2f} ms/step, {args.batch * args.steps / total:.0f} tok/s (timers synchronize)")
    for name, value in timers.items():
        print(f"  {name:40s} {1e3 * value / args.steps:8.3f} ms/step")
    runner._stage_inputs, runner._forward_inputs, runner.sampler = original_stage, original_forward, original_sampler
    t0 = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    total = time.perf_counter() - t0
    print(f"untimed: {1e3 * total / args.steps:.2f} ms/step, {args.batch * args.steps / total:.0f} tok/s")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            core.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
