"""The server's host path alone: the real engine loop, scheduler, outputs, detokenizer and aiohttp
SSE handlers, with the model runner replaced by one that computes nothing (each step's tokens are
random ids, ready at once). What it measures is what the host can stream per second with zero GPU
time, and the loop's milliseconds per iteration at a given number of streams: on the GPU machine
the server is host-bound at si 1 (benchmarks/RESULTS.md, sixth session), so this is the figure to
move, and it runs on any machine.

The server runs in this process; the streaming client (benchmarks/serving.py --base-url) in another,
so that parsing the streams does not share the server's core. Reports output tok/s, chunks/s, and
the engine loop's iteration time from the statistics the AsyncEngine keeps.

  python benchmarks/serving_host.py --streams 64 --output-len 200
  python benchmarks/serving_host.py --streams 256 --output-len 200 --stream-interval 8 --tokenizer benchmarks/tokenizers/qwen3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repo root first: benchmarks/sampling.py must not stand in for the sampling package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.append(str(ROOT / "benchmarks"))

from common import emit  # noqa: E402

from aio_engine import AsyncEngine, EngineArgs  # noqa: E402
from aio_engine.model_runner import LaunchedStep, StepResult  # noqa: E402
from web.app import freeze_startup_heap, start_server  # noqa: E402
from web.settings import ServerSettings  # noqa: E402


class NullRunner:
    """stage / enqueue / wait / is_done of ModelRunner, with no model: every sampling row gets a random id."""

    def __init__(self, runner, vocab_size: int, seed: int = 0) -> None:
        self.runner = runner
        self.vocab = vocab_size
        self.rng = random.Random(seed)

    def stage(self, out, prev=None) -> LaunchedStep:  # what is staged is the step itself
        rows = [i for i, s in enumerate(out.scheduled) if s.samples]
        return LaunchedStep(num_rows=len(out.scheduled), sample_rows=rows, sample_row={}, counters=[])

    def enqueue(self, staged: LaunchedStep) -> LaunchedStep:
        return staged

    def wait(self, step: LaunchedStep) -> StepResult:
        tokens: list[int | None] = [None] * step.num_rows
        draw = self.rng.randrange
        for row in step.sample_rows:
            tokens[row] = draw(1, self.vocab)
        return StepResult(tokens)

    def is_done(self, step: LaunchedStep) -> bool:
        return True

    def __getattr__(self, name):  # everything else (start_fill, sample, ...) as the real runner has it
        return getattr(self.runner, name)


async def serve_and_measure(ns: argparse.Namespace) -> dict:
    args = EngineArgs(model=ns.model, tokenizer=ns.tokenizer, max_model_len=ns.max_model_len,
                      max_num_seqs=max(ns.streams, 1), stream_interval=ns.stream_interval, enforce_eager=True,
                      num_gpu_blocks_override=ns.streams * (ns.max_model_len // 16 + 1), device="cpu")
    engine = AsyncEngine.from_engine_args(args)
    core = engine.core
    core.runner = NullRunner(core.runner, min(core.config.model.vocab_size, ns.token_id_limit))
    engine._launch_inline = True  # as on CUDA: launch and a finished step's read run on the loop
    iterations: list[float] = []
    record = engine.stats.record

    stamps: list[float] = []

    def keep(seconds, *rest, **parts):  # every iteration's time, beside the statistics line
        iterations.append(seconds)
        stamps.append(time.perf_counter())
        record(seconds, *rest, **parts)

    engine.stats.record = keep
    settings = ServerSettings(served_model_names=["host"], access_log=False)
    runner = await start_server(engine, settings, "127.0.0.1", ns.port)
    port = runner.addresses[0][1]  # the one bound (--port 0: any free one)
    freeze_startup_heap()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "client.json"
            client = [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--base-url",
                      f"http://127.0.0.1:{port}", "--num-prompts", str(ns.streams), "--input-len",
                      str(ns.input_len), str(ns.input_len), "--output-len", str(ns.output_len), str(ns.output_len),
                      "--request-rate", "inf", "--vocab-size", "200", "--json", str(out)]
            start = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(*client, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = await proc.communicate()
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"client failed: {err.decode()[-2000:]}")
            [result] = json.loads(out.read_text())
    finally:
        await runner.cleanup()
        await engine.shutdown()
    steady = sorted(iterations[len(iterations) // 10: len(iterations) * 9 // 10])  # the full batch
    return {
        "streams": ns.streams, "output_len": ns.output_len, "stream_interval": ns.stream_interval,
        "tokenizer": ns.tokenizer or "the model's", "output_tokens_per_s": result["output_tokens_per_s"],
        "chunks_per_s": round(result["output_tokens_per_s"] / (result["tokens_per_chunk"] or 1), 1),
        "iteration_ms_p50": round(1e3 * steady[len(steady) // 2], 3) if steady else None,
        "iteration_ms_per_stream": round(1e3 * steady[len(steady) // 2] / ns.streams, 4) if steady else None,
        "itl_ms": result["itl_ms"], "client_elapsed_s": round(elapsed, 2),
        # The server's own rate, first to last iteration: well above the client's figure means the
        # client (parsing every chunk in one process) is what limits, not the server.
        "server_tokens_per_s": round(ns.streams * ns.output_len / (stamps[-1] - stamps[0]), 1) if len(stamps) > 1 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "aio_engine" / "default_model"),
                        help="a model folder (only its config and tokenizer are used)")
    parser.add_argument("--tokenizer", default=None, help="default: the model's")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streaming requests")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--stream-interval", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--token-id-limit", type=int, default=4096, help="random ids are drawn below this")
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    parser.add_argument("--jsonl", type=Path, help="append the result here")
    ns = parser.parse_args()
    try:  # the loop `aio-engine serve` runs on
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    result = asyncio.run(serve_and_measure(ns))
    print(f"{ns.streams} streams, si {ns.stream_interval}: {result['output_tokens_per_s']:.0f} tok/s at the client, "
          f"{result['server_tokens_per_s']:.0f} at the server, "
          f"{result['chunks_per_s']:.0f} chunks/s, loop iteration p50 {result['iteration_ms_p50']} ms "
          f"({result['iteration_ms_per_stream']} ms per stream)")
    emit("serving_host", result, jsonl_path=ns.jsonl)


if __name__ == "__main__":
    main()
