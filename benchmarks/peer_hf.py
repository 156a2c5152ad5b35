"""aio-engine beside Hugging Face transformers on the same GPU, weights and workload, in one run.

Latency: batch 1, a random prompt of --prompt-len tokens, --output-len greedy tokens (ignore
eos), ms per output token with the prefill included; transformers runs `generate` with a static
cache and torch.compile (reduce-overhead), as its docs recommend for latency.
Throughput: --num-prompts random requests with prompt/output lengths uniform in the ranges;
transformers runs its continuous-batching `generate_batch`.
Both engines hold the same random weights (transformers initializes, we load its state dict).
(2026-11-23: the first run on the H100 failed inside transformers' compiled static-cache path when
forward was wrapped in torch.compile by hand; now transformers compiles it itself. Not re-run yet.)

  python benchmarks/peer_hf.py --model benchmarks/models/qwen3-0.6b --json peer.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aio_engine.llm import LLM  # noqa: E402
from sampling.params import SamplingParams  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-range", type=int, nargs=2, default=[100, 1024])
    parser.add_argument("--output-range", type=int, nargs=2, default=[100, 1024])
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import transformers

    config = transformers.AutoConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096,
              gpu_memory_utilization=0.55)
    llm.core.runner.model.load_weights(hf.state_dict().items())
    rng = random.Random(0)
    vocab = config.vocab_size
    results: dict = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "weight_bytes": weight_bytes,
                     "roofline_ms_per_token": round(weight_bytes / 3.0e12 * 1e3, 3)}

    # --- batch-1 latency ---
    prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    ours = timed(lambda: llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False), 5)
    results["ours_latency_ms_per_token"] = round(ours / args.output_len * 1e3, 3)
    ids = torch.tensor([prompt], device="cuda")
    # A static cache makes transformers compile its forward itself (generation_config.compile_config);
    # wrapping forward in torch.compile(mode="reduce-overhead") by hand trips its CUDA-graph checks.
    gen = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False,
               cache_implementation="static", pad_token_id=0)
    with torch.inference_mode():
        for _ in range(2):  # compile and capture
            hf.generate(ids, **gen)
        theirs = timed(lambda: hf.generate(ids, **gen), 5)
    results["hf_static_compile_latency_ms_per_token"] = round(theirs / args.output_len * 1e3, 3)
    print(f"batch-1 latency, prompt {args.prompt_len}, {args.output_len} tokens: ours {results['ours_latency_ms_per_token']} "
          f"ms/token, transformers static+compile {results['hf_static_compile_latency_ms_per_token']} ms/token, "
          f"roofline {results['roofline_ms_per_token']} ms/token")

    # --- throughput ---
    if not args.skip_throughput:
        prompts, lengths = [], []
        for _ in range(args.num_prompts):
            prompts.append([rng.randrange(vocab) for _ in range(rng.randint(*args.input_range))])
            lengths.append(rng.randint(*args.output_range))
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in lengths], use_tqdm=False)
        elapsed = time.perf_counter() - start
        results["ours_output_tok_s"] = round(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, 1)
        try:
            from transformers.generation import GenerationConfig

            hf.set_attn_implementation("sdpa_paged") if hasattr(hf, "set_attn_implementation") else None
            config_cb = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, eos_token_id=-1, pad_token_id=0)
            start = time.perf_counter()
            batch = hf.generate_batch(inputs=prompts, generation_config=config_cb, progress_bar=False)
            elapsed = time.perf_counter() - start
            generated = sum(len(out.generated_tokens) for out in batch.values())
            results["hf_generate_batch_output_tok_s"] = round(generated / elapsed, 1)
            results["hf_generate_batch_note"] = f"max_new_tokens={max(lengths)} for every request (one config)"
        except Exception as e:  # report, don't hide
            results["hf_generate_batch_error"] = repr(e)[:300]
        print(f"throughput, {args.num_prompts} requests: ours {results['ours_output_tok_s']} output tok/s, "
              f"transformers generate_batch {results.get('hf_generate_batch_output_tok_s', results.get('hf_generate_batch_error'))}")
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
