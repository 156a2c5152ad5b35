"""aio-engine beside Hugging Face transformers on the same device, weights and workload, in one run.

Both engines hold the same random weights (transformers initializes, we load its state dict).
Parts, each time-boxed (--part-timeout) and in its own try: an error is reported in the JSON by
the part's name (`<part>_error`) and the next part runs. The JSON is rewritten after every part.
  ours_latency     batch 1, a random --prompt-len prompt, --output-len greedy tokens (ignore eos):
                   ms per output token, prefill included (median of 5 after 2 warm-ups).
  ours_throughput  --num-prompts requests, prompt/output lengths uniform in the ranges, greedy,
                   ignore eos; also the first --hf-num-prompts of them (the slice transformers runs).
  hf_latency       `generate` with a static cache, which makes transformers compile its forward
                   itself (generation_config.compile_config; reduce-overhead CUDA graphs), as its
                   docs recommend for latency. Fallbacks, each reported: compile mode "default",
                   then the static cache without compiling. `hf_compiled` says if it compiled.
  hf_throughput    continuous batching (`init_continuous_batching`: the manager under
                   `generate_batch`, fed request by request so that each keeps its own
                   max_new_tokens) over the slice, bounded by --part-timeout.
Our engine is freed before transformers' parts run, so each has the whole device.
(2026-11-23: the first H100 run failed inside transformers' static-cache path when forward was
wrapped in torch.compile by hand; transformers now compiles itself.)

  python benchmarks/peer_hf.py --model benchmarks/models/qwen3-0.6b --jsonl out.jsonl
  python benchmarks/peer_hf.py --model aio_engine/default_model --prompt-len 32 --output-len 16 \
      --num-prompts 8 --hf-num-prompts 4 --input-range 16 64 --output-range 8 32     # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from aio_engine.llm import LLM  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def part(results: dict, name: str, seconds: float, json_path: Path | None):
    """Run a part within `seconds` (SIGALRM); its error goes into results[name + '_error']."""

    def expire(signum, frame):
        raise PartTimeout(f"{name} took longer than {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - reported in the JSON, the next part runs
        results[f"{name}_error"] = f"{e!r}"[:400]
        results[f"{name}_traceback"] = traceback.format_exc().splitlines()[-8:]
        print(f"   {name} failed: {e!r}"[:400], flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        results[f"{name}_s"] = round(time.perf_counter() - start, 1)
        if json_path:
            json_path.write_text(json.dumps(results, indent=2, default=str))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_latency(hf, prompt: list[int], output_len: int, device: torch.device, results: dict) -> None:
    """transformers' generate with a static cache: its own compile first, then the fallbacks."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    ids = torch.tensor([prompt], device=device)
    attempts = [
        ("static cache + transformers' compile (reduce-overhead)", {}),
        ("static cache + transformers' compile (mode default)", {"compile_config": CompileConfig(mode="default")}),
        ("static cache, no compile", {"disable_compile": True}),
    ]
    errors = []
    for label, extra in attempts:
        config = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                  cache_implementation="static", pad_token_id=0, **extra)
        try:
            with torch.inference_mode():
                for _ in range(2):  # compile and capture
                    out = hf.generate(ids, generation_config=config)
                assert out.shape[1] == len(prompt) + output_len, out.shape
                seconds = timed(lambda: hf.generate(ids, generation_config=config), 5)
        except PartTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - the next fallback runs; all errors are reported
            errors.append(f"{label}: {e!r}"[:400])
            print(f"   {label} failed: {e!r}"[:300], flush=True)
            torch._dynamo.reset()
            continue
        results["hf_latency_ms_per_token"] = round(seconds / output_len * 1e3, 3)
        results["hf_latency_how"] = label
        results["hf_compiled"] = "disable_compile" not in extra and getattr(hf, "_compiled_call", None) is not None
        break
    if errors:
        results["hf_latency_failed_attempts"] = errors


def hf_throughput(hf, prompts: list[list[int]], lengths: list[int], deadline: float, results: dict) -> None:
    """Continuous batching over the requests, each with its own max_new_tokens, until the deadline."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=-1, pad_token_id=0)
    kwargs = {}
    with contextlib.suppress(ImportError):  # generate_batch's sizing hints (an internal module)
        from transformers.generation.continuous_batching.utils import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                                                 max_generated_length=max(lengths), num_requests=len(prompts))
    if hf.device.type != "cuda":  # its cache is sized from free GPU memory; on CPU it must be told
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            block_size=32, num_blocks=len(prompts) * -(-(max(map(len, prompts)) + max(lengths)) // 32) + 8,
            max_batch_tokens=512)
    manager = hf.init_continuous_batching(generation_config=config, **kwargs)
    manager.warmup()  # CUDA graph capture, as generate_batch does before its clock starts
    manager.start()
    done, tokens, expected, all_done = 0, 0, 0, False
    wanted = {f"r{i}": n for i, n in enumerate(lengths)}
    try:
        start = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        while done < len(prompts) and time.perf_counter() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"request {result.request_id}: {result.error}")
                done += 1
                tokens += len(result.generated_tokens)
                expected += wanted[result.request_id]
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped")
        elapsed = time.perf_counter() - start
        all_done = done == len(prompts)
    finally:
        manager.stop(block=True, timeout=30, hard_stop=not all_done)
        with contextlib.suppress(Exception):
            manager.destroy()
    results["hf_cb_requests_done"] = done
    results["hf_cb_output_tokens"] = tokens
    if tokens != expected:
        results["hf_cb_warning"] = f"generated {tokens} tokens where the finished requests asked for {expected}"
    results["hf_cb_output_tok_s"] = round(tokens / elapsed, 1) if elapsed else None
    if not all_done:
        results["hf_cb_note"] = f"stopped at the deadline after {done}/{len(prompts)} requests (finished ones counted)"


def run_ours(args, hf, dtype: torch.dtype, prompt: list[int], prompts: list[list[int]], lengths: list[int],
             hf_slice: slice, results: dict) -> None:
    """Our parts, on transformers' weights; the engine is freed when this returns."""
    llm = None
    with part(results, "ours_setup", args.part_timeout, args.json):
        llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."),
                  max_model_len=args.max_model_len, gpu_memory_utilization=0.5,
                  optimization_level=args.optimization_level)
        llm.core.runner.model.load_weights(hf.state_dict().items())
        results["ours_compilation"] = llm.core.config.compilation.describe()
    if llm is None:
        return
    if "ours_latency" not in args.skip:
        with part(results, "ours_latency", args.part_timeout, args.json):
            params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

            def run() -> None:
                llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)

            for _ in range(2):
                run()
            results["ours_latency_ms_per_token"] = round(timed(run, 5) / args.output_len * 1e3, 3)
    if "ours_throughput" not in args.skip:
        with part(results, "ours_throughput", args.part_timeout, args.json):
            def throughput(batch: slice) -> float:
                params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths[batch]]
                start = time.perf_counter()
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts[batch]], params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                return round(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, 1)

            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
            results["ours_output_tok_s_slice"] = throughput(hf_slice)
            results["ours_output_tok_s"] = throughput(slice(0, args.num_prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("-O", "--optimization-level", type=int, default=2, help="ours")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--hf-num-prompts", type=int, default=64, help="the slice transformers' continuous batching runs")
    parser.add_argument("--input-range", type=int, nargs=2, default=[100, 1024])
    parser.add_argument("--output-range", type=int, nargs=2, default=[100, 1024])
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--part-timeout", type=float, default=240.0, help="seconds each part may take")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ours_latency", "ours_throughput", "hf_latency", "hf_throughput"])
    parser.add_argument("--json", type=Path, help="rewritten after each part")
    parser.add_argument("--jsonl", type=Path, help="the final result appended as one line")
    args = parser.parse_args()

    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    config = transformers.AutoConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    with device:
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    results: dict = {"model": args.model, "dtype": str(dtype), "transformers": transformers.__version__,
                     "weight_bytes": weight_bytes, "roofline_ms_per_token": round(weight_bytes / 3.0e12 * 1e3, 3),
                     "prompt_len": args.prompt_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
                     "hf_num_prompts": args.hf_num_prompts, "input_range": args.input_range,
                     "output_range": args.output_range, "optimization_level": args.optimization_level,
                     "sampling": "greedy, ignore eos (both)"}
    rng = random.Random(0)
    vocab = config.get_text_config().vocab_size
    prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
    prompts, lengths = [], []
    for _ in range(args.num_prompts):
        prompts.append([rng.randrange(vocab) for _ in range(rng.randint(*args.input_range))])
        lengths.append(rng.randint(*args.output_range))
    hf_slice = slice(0, min(args.hf_num_prompts, args.num_prompts))

    run_ours(args, hf, dtype, prompt, prompts, lengths, hf_slice, results)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # our engine is gone: transformers gets the whole device

    if "hf_latency" not in args.skip:
        with part(results, "hf_latency", args.part_timeout, args.json):
            hf_latency(hf, prompt, args.output_len, device, results)
    if "hf_throughput" not in args.skip:
        with part(results, "hf_throughput", args.part_timeout + 60, args.json):
            hf_throughput(hf, prompts[hf_slice], lengths[hf_slice], time.perf_counter() + args.part_timeout, results)

    print(f"batch-1, prompt {args.prompt_len}, {args.output_len} tokens (ms/token): ours "
          f"{results.get('ours_latency_ms_per_token', 'failed')}, transformers {results.get('hf_latency_ms_per_token', 'failed')} "
          f"({results.get('hf_latency_how', '-')}), roofline {results['roofline_ms_per_token']}")
    print(f"throughput (output tok/s): ours {results.get('ours_output_tok_s', 'failed')} ({args.num_prompts} requests), "
          f"ours {results.get('ours_output_tok_s_slice', 'failed')} and transformers continuous batching "
          f"{results.get('hf_cb_output_tok_s', 'failed')} on the first {hf_slice.stop}")
    emit("peer_hf", results, json_path=args.json, jsonl_path=args.jsonl)


if __name__ == "__main__":
    main()
