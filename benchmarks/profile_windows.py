"""The throughput workload (benchmarks/throughput.py's random prompts and lengths) driven step by
step, torch.profiler over windows of steps: per window the running requests, wall time and GPU
time per step, the GPU's idle share and its top kernels (idle.py's timeline of the trace).

Where a run's time goes by phase: the prefill steps at the start, full batches, the shrinking tail.

  python benchmarks/profile_windows.py --model benchmarks/models/qwen3-0.6b --load-format dummy \\
      --dtype bfloat16 --max-model-len 4096 --num-prompts 256 --input-len 100 1024 \\
      --output-len 100 1024 --windows 1-19 20-40 200-230 600-630 950-980
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402
from idle import finish_profile, profiled  # noqa: E402
from throughput import add_workload_args, parse_with_engine_args, workload  # noqa: E402

from aio_engine.llm import LLM  # noqa: E402


def window(text: str) -> tuple[int, int]:
    first, _, end = text.partition("-")
    if not (first.isdigit() and end.isdigit() and int(first) < int(end)):
        raise argparse.ArgumentTypeError(f"a window is FIRST-END steps (FIRST < END), got {text!r}")
    return int(first), int(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, 256, (100, 1024))
    parser.add_argument("--windows", type=window, nargs="+", default=[(1, 19), (20, 40), (200, 230)],
                        help="step windows FIRST-END (steps FIRST..END-1 profiled), in order, not overlapping")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per window")
    parser.add_argument("--jsonl", type=Path, help="append the result here as one line")
    ns, args = parse_with_engine_args(parser)
    args.skip_tokenizer_init = True  # token ids in, token ids out
    llm = LLM(**vars(args))
    core = llm.core
    for i, (prompt, params) in enumerate(zip(*workload(ns, llm))):
        core.add_request(f"w{i}", prompt, params)

    device = core.config.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    starts = {first: end for first, end in ns.windows}
    windows, step, prof, start = [], 0, None, time.perf_counter()
    while core.has_unfinished:
        if step in starts:
            sync()
            first, end, running, prof = step, starts[step], len(core.scheduler.running), profiled(device)
            prof.__enter__()
            opened = time.perf_counter()
        core.step()
        step += 1
        if prof is not None and step == end:
            sync()
            wall = time.perf_counter() - opened
            prof.__exit__(None, None, None)
            steps = end - first
            gpu = finish_profile(prof, steps, device)
            windows.append({"steps": f"{first}-{end}", "count": steps, "running": running,
                            "wall_ms_per_step": round(1e3 * wall / steps, 3), **gpu})
            prof = None
    elapsed = time.perf_counter() - start
    for w in windows:
        gpu = (f"GPU {w['gpu_ms_per_step']:.2f} ms/step, idle {w['idle_pct']:.1f}%" if "idle_pct" in w
               else w.get("gpu", ""))
        print(f"steps {w['steps']} ({w['running']} running): wall {w['wall_ms_per_step']:.2f} ms/step, {gpu}")
        for k in w.get("top_kernels", [])[: ns.top]:
            print(f"    {k['total_ms'] / w['count']:8.3f} ms/step {k['pct']:5.1f}%  {k['name']}")
    print(f"{step} steps in {elapsed:.2f}s (profiled windows included)")
    emit("profile_windows", {"model": str(core.config.model.path), "num_prompts": ns.num_prompts,
                             "input_len": ns.input_len, "output_len": ns.output_len, "steps": step,
                             "windows": windows}, jsonl_path=ns.jsonl)


if __name__ == "__main__":
    main()
