"""Online serving: random requests streamed from a running server, as in `vllm bench serve`.

Each request is a /v1/completions call with random token ids as the prompt, run to its length
(ignore_eos), streamed over SSE (or over one websocket with --transport ws) by web/client.py.
Requests arrive as a Poisson process at --request-rate (inf: all at once), at most
--max-concurrency in flight. Reports time to first token, time per output token (after the
first), inter-token latency between streamed chunks, end-to-end latency (mean, median, p99) and
throughput.

Without --base-url it starts `aio-engine serve` in a subprocess with the remaining flags:

  python benchmarks/serving.py --num-prompts 64 --request-rate 8            # the embedded model
  python benchmarks/serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 --max-concurrency 32
  python benchmarks/serving.py --num-prompts 256 -- --model ../shared/models/qwen3-0.6b --load-format dummy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from web.client import AsyncClient  # noqa: E402


@dataclass
class Result:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(client: AsyncClient, ws, body: dict, request_id: str) -> Result:
    result = Result(prompt_tokens=len(body["prompt"]))
    start = last = time.perf_counter()
    try:
        stream = ws.completions_stream(request_id, **body) if ws is not None else client.completions_stream(
            **body, stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"] or not chunk["choices"][0]["text"]:
                continue
            if result.ttft == 0.0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
        result.e2e = time.perf_counter() - start
        if ws is not None:
            result.output_tokens = ws.usage.pop(request_id)["completion_tokens"]
        result.ok = True
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        result.error = repr(e)
    return result


def summary(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"mean": round(statistics.fmean(values) * scale, 2), "median": round(statistics.median(values) * scale, 2),
            "p99": round(p99 * scale, 2)}


async def run(ns: argparse.Namespace, base_url: str) -> dict:
    rng = random.Random(ns.workload_seed)
    bodies = []
    for _ in range(ns.num_prompts):
        n_in, n_out = rng.randint(*ns.input_len), rng.randint(*ns.output_len)
        bodies.append({"prompt": [rng.randrange(1, ns.vocab_size) for _ in range(n_in)], "max_tokens": n_out,
                       "ignore_eos": True, "temperature": 1.0})
    limit = asyncio.Semaphore(ns.max_concurrency or len(bodies))
    async with AsyncClient(base_url, api_key=ns.api_key) as client:
        ws_cm = client.websocket() if ns.transport == "ws" else None
        ws = await ws_cm.__aenter__() if ws_cm is not None else None
        try:
            await one_request(client, ws, {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}, "warmup")

            async def limited(body: dict, request_id: str) -> Result:
                async with limit:
                    return await one_request(client, ws, body, request_id)

            tasks = []
            start = time.perf_counter()
            for i, body in enumerate(bodies):
                tasks.append(asyncio.create_task(limited(body, f"r{i}")))
                if ns.request_rate != float("inf"):
                    await asyncio.sleep(rng.expovariate(ns.request_rate))
            results = await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
        finally:
            if ws_cm is not None:
                await ws_cm.__aexit__(None, None, None)
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "base_url": base_url, "transport": ns.transport, "num_prompts": ns.num_prompts, "completed": len(done),
        "failed": len(results) - len(done), "errors": sorted({r.error for r in results if r.error})[:5],
        "request_rate": ns.request_rate, "max_concurrency": ns.max_concurrency,
        "input_len": ns.input_len, "output_len": ns.output_len, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(done) / elapsed, 3), "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "total_tokens_per_s": round((output_tokens + sum(r.prompt_tokens for r in done)) / elapsed, 1),
        "ttft_ms": summary([r.ttft for r in done]), "tpot_ms": summary(tpot),
        "itl_ms": summary([x for r in done for x in r.itl]), "e2e_ms": summary([r.e2e for r in done]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(base_url: str, process: subprocess.Popen, timeout: float) -> None:
    async with AsyncClient(base_url) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with status {process.returncode}")
            try:
                if await client.health():
                    return
            except OSError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"the server was not healthy after {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server; default: start `aio-engine serve` with the other flags")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--transport", choices=["sse", "ws"], default="sse")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn from [1, this)")
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    ns, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]

    process = None
    base_url = ns.base_url
    if base_url is None:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "aio_engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
    try:
        if process is not None:
            asyncio.run(wait_healthy(base_url, process, ns.startup_timeout))
        result = asyncio.run(run(ns, base_url))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    print(f"Serving: {result['completed']}/{ns.num_prompts} requests in {result['elapsed_s']:.2f}s, "
          f"{result['output_tokens_per_s']:.1f} output tokens/s; TTFT median {result['ttft_ms']['median']} ms, "
          f"TPOT median {result['tpot_ms']['median']} ms, ITL p99 {result['itl_ms']['p99']} ms")
    print(json.dumps(result))
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
