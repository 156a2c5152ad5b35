"""Batch latency through LLM.generate, as `vllm bench latency`: batch 1 by default.

Each iteration sends --batch-size fresh random prompts (so the prefix cache cannot help) of
--input-len tokens and generates --output-len tokens each (ignore_eos). A prefill-only pass
(max_tokens=1) on other fresh prompts of the same length measures time to first token; decode
time per output token is (end-to-end - prefill) / (output_len - 1). Engine flags as in `serve`.

  python benchmarks/latency.py --input-len 32 --output-len 128
  python benchmarks/latency.py --model ../shared/models/qwen3-0.6b --load-format dummy -O3 \
      --input-len 1024 --output-len 256 --batch-size 8
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from aio_engine.cli import GROUP_TITLES, add_engine_args, engine_args_from, expand_argv  # noqa: E402
from aio_engine.llm import LLM  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-iters-warmup", type=int, default=2)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--jsonl", type=Path, help="append the result here as one line")
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    add_engine_args(parser, groups)
    ns = parser.parse_args(expand_argv(parser, sys.argv[1:]))
    args = engine_args_from(ns)
    if ns.output_len < 2:
        parser.error("--output-len must be >= 2 (one prefill token, then decode)")
    if args.model and not (Path(args.model) / "tokenizer_config.json").exists() and not args.skip_tokenizer_init:
        args.skip_tokenizer_init = True  # config-only folders (../shared/models) have no tokenizer

    start = time.perf_counter()
    llm = LLM(**vars(args))
    startup = time.perf_counter() - start
    vocab = llm.core.config.model.vocab_size
    if ns.input_len + ns.output_len > llm.core.config.model.max_model_len:
        parser.error(f"--input-len + --output-len exceeds max_model_len ({llm.core.config.model.max_model_len})")
    rng = random.Random(ns.workload_seed)

    def prompts() -> list[dict]:
        return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(ns.input_len)]} for _ in range(ns.batch_size)]

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
        batch = prompts()
        begin = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
        return elapsed

    for _ in range(ns.num_iters_warmup):
        timed(ns.output_len)
    prefill = [timed(1) for _ in range(ns.num_iters)]
    total = [timed(ns.output_len) for _ in range(ns.num_iters)]
    per_token = [(t - statistics.mean(prefill)) / (ns.output_len - 1) for t in total]
    config = llm.core.config
    result = {
        "model": str(config.model.path), "device": str(config.device), "dtype": str(config.model.dtype),
        "compilation": config.compilation.describe(), "optimization_level": config.compilation.level,
        "async_scheduling": config.scheduler.async_scheduling, "batch_size": ns.batch_size, "input_len": ns.input_len,
        "output_len": ns.output_len, "num_iters": ns.num_iters, "startup_s": round(startup, 2),
        "latency_s": {"mean": round(statistics.mean(total), 4), "p50": round(percentile(total, 50), 4),
                      "p90": round(percentile(total, 90), 4), "p99": round(percentile(total, 99), 4)},
        "prefill_ms": round(1000 * statistics.mean(prefill), 2),
        "ms_per_output_token": round(1000 * statistics.mean(per_token), 3),
        "output_tokens_per_s": round(ns.batch_size * ns.output_len / statistics.mean(total), 1),
    }
    print(f"Latency: {result['latency_s']['mean']:.3f}s mean (p90 {result['latency_s']['p90']:.3f}s) for batch "
          f"{ns.batch_size} x ({ns.input_len} prompt + {ns.output_len} output) tokens; prefill "
          f"{result['prefill_ms']:.1f} ms, {result['ms_per_output_token']:.2f} ms per output token")
    emit("latency", result, json_path=ns.json, jsonl_path=ns.jsonl)


if __name__ == "__main__":
    main()
