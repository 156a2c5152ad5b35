"""Offline throughput: N random requests through LLM.generate, as in `vllm bench throughput`.

Prompts are random token ids (no tokenizer needed, so a config-only folder with
--load-format dummy works); prompt and output lengths are drawn uniformly from ranges and
every request runs to its length (ignore_eos). Prints requests/s, output tokens/s, total tokens/s.

  python benchmarks/throughput.py --num-prompts 64 --input-len 32 128 --output-len 32 128
  python benchmarks/throughput.py --model ../shared/models/qwen3-0.6b --load-format dummy \
      --num-prompts 256 --input-len 100 1024 --output-len 100 1024
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from aio_engine.cli import GROUP_TITLES, add_engine_args, engine_args_from  # noqa: E402
from aio_engine.llm import LLM  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402


def add_workload_args(parser: argparse.ArgumentParser, num_prompts: int = 64,
                      lengths: tuple[int, int] = (32, 128)) -> None:
    parser.add_argument("--num-prompts", type=int, default=num_prompts)
    parser.add_argument("--input-len", type=int, nargs=2, default=list(lengths), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=list(lengths), metavar=("MIN", "MAX"))
    parser.add_argument("--workload-seed", type=int, default=0)


def parse_with_engine_args(parser: argparse.ArgumentParser):
    """The command line with the engine's flags added (the serve command's groups): (namespace, EngineArgs)."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    add_engine_args(parser, groups)
    ns = parser.parse_args()
    ns.model_tag = None
    return ns, engine_args_from(ns)


def workload(ns: argparse.Namespace, llm: LLM) -> tuple[list[dict], list[SamplingParams]]:
    """The requests of add_workload_args' flags (random token ids, lengths uniform in the ranges,
    ignore_eos), once the engine is warmed up on them."""
    vocab = llm.core.config.model.vocab_size
    max_len = llm.core.config.model.max_model_len
    rng = random.Random(ns.workload_seed)
    prompts, params = [], []
    for _ in range(ns.num_prompts):
        n_in = rng.randint(*ns.input_len)
        n_out = min(rng.randint(*ns.output_len), max_len - n_in)
        prompts.append({"prompt_token_ids": [rng.randrange(vocab) for _ in range(n_in)]})
        params.append(SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n_out, ignore_eos=True))
    # Warm up (allocator, lazy inits, the kernels' variants for full prefill steps and decode
    # batches) on other random prompts of the same lengths, so the timing is of steady work and the
    # prefix cache holds nothing of the timed prompts.
    warm = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(len(p["prompt_token_ids"]))]}
            for p in prompts[:32]]
    llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    return prompts, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--jsonl", type=Path, help="append the result here as one line")
    ns, args = parse_with_engine_args(parser)
    if args.model and not (Path(args.model) / "tokenizer_config.json").exists() and not args.skip_tokenizer_init:
        args.skip_tokenizer_init = True  # config-only folders (../shared/models) have no tokenizer

    start = time.perf_counter()
    llm = LLM(**{k: v for k, v in vars(args).items()})
    startup = time.perf_counter() - start
    prompts, params = workload(ns, llm)

    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "model": str(llm.core.config.model.path), "device": str(llm.core.config.device),
        "dtype": str(llm.core.config.model.dtype), "num_prompts": ns.num_prompts,
        "optimization_level": llm.core.config.compilation.level,
        "compilation": llm.core.config.compilation.describe(),
        "async_scheduling": llm.core.config.scheduler.async_scheduling,
        "input_len": ns.input_len, "output_len": ns.output_len, "elapsed_s": round(elapsed, 3),
        "startup_s": round(startup, 2),
        "requests_per_s": round(ns.num_prompts / elapsed, 3),
        "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "total_tokens_per_s": round((prompt_tokens + output_tokens) / elapsed, 1),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "preemptions": llm.core.scheduler.num_preemptions,
    }
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.1f} total tokens/s, "
          f"{result['output_tokens_per_s']:.1f} output tokens/s ({ns.num_prompts} requests, {prompt_tokens} prompt + "
          f"{output_tokens} output tokens in {elapsed:.2f}s)")
    emit("throughput", result, json_path=ns.json, jsonl_path=ns.jsonl)


if __name__ == "__main__":
    main()
