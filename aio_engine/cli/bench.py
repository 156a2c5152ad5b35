"""`aio-engine bench throughput|serve|latency|startup|idle|peer [flags]`: the benchmarks/ scripts, as `vllm bench`.

Nothing imports benchmarks/ (it is not part of the installed package), so each benchmark runs as
`python benchmarks/<script>.py flags...` from the source checkout this package lives in; the
flags pass through unchanged (`aio-engine bench latency --help` shows the script's own help).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = {
    "throughput": ("throughput.py", "Offline throughput: N random requests through LLM.generate."),
    "serve": ("serving.py", "Online serving: requests over SSE or websocket to `aio-engine serve` (TTFT, TPOT, ITL)."),
    "latency": ("latency.py", "Batch latency: prefill time and ms per output token (batch 1 by default)."),
    "startup": ("startup.py", "Startup: process start to /health 200 per -O level, cold and warm compile cache."),
    "idle": ("idle.py", "GPU idle between decode steps with and without async scheduling (torch profiler)."),
    "peer": ("peer_hf.py", "Hugging Face transformers beside aio-engine: batch-1 latency and continuous batching."),
}


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_bench_parser(sub) -> None:
    """Only for `aio-engine --help`; `bench` itself is dispatched by run_bench (flags pass through)."""
    sub.add_parser("bench", help="Run a benchmark: " + ", ".join(BENCHMARKS) + ".", add_help=False)


def bench_usage() -> str:
    lines = ["usage: aio-engine bench {" + ",".join(BENCHMARKS) + "} [flags...]", "",
             "Run a benchmark script of the source checkout (flags pass through; add --help for its own):"]
    lines += [f"  {name:<11} {about}" for name, (_, about) in BENCHMARKS.items()]
    return "\n".join(lines)


def run_bench(argv: list[str]) -> int:
    """The benchmark's exit status (2 with a message when the command or the script is missing)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(bench_usage())
        return 0 if argv else 2
    if argv[0] not in BENCHMARKS:
        print(bench_usage(), file=sys.stderr)
        print(f"aio-engine bench: error: unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    script = benchmarks_dir() / BENCHMARKS[argv[0]][0]
    if not script.is_file():
        print(f"aio-engine bench: error: {script} not found. The benchmarks live in the source checkout "
              "(git clone the repository and run `aio-engine bench` from its installation); "
              "an installed package does not include them.", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *argv[1:]], cwd=script.parents[1])
