"""Structured outputs: grammar compile time (cold and cached), the per-step cost of the batch
bitmask, and decode throughput through the engine, constrained vs unconstrained.

--mode library: structured/ alone (compile, fill on the CPU, apply on the logits' device).
--mode engine: an LLM on a model (default: Qwen3-0.6B's config, dummy weights, bf16 on CUDA) with the
  tokenizer below (ids past its vocabulary are padding, never allowed), its core driven step by
  step with final outputs only, as LLM.generate asks for them. `--batch` requests run once
  unconstrained (ignore_eos, max_tokens), under SCHEMA (same max_tokens; a random model rarely
  closes a free string, so most run to max_tokens, a third end at the grammar's eos), each
  constrained run paired with its unconstrained twin, every request stopping at its constrained
  length (the same shrinking batch), --repeats pairs per --fill-threads value, the twin first in
  every second pair (at the lengths the seeded requests reached before).
  Reported: decode tokens/s of each run (steps that compute no prompt tokens) and its decode step
  p50 / p90 / max, the median over pairs of constrained / twin (issue 5's goal: >= 90%; against the
  fixed-length run too), output tokens/s end to end, the bitmask fill per step and per request
  (timed where it runs) and the host's wait for it, the engine thread's time taking the worker's
  accept back (accepted()), the sampler's CUDA graphs captured (and the host's time for it) and
  its eager runs, the compiler made for the model's vocabulary, and the schema's compile cold and
  cached. --profile: one more pair first, under cProfile.

The default --tokenizer is Qwen3's, benchmarks/tokenizers/qwen3, where it was built (`make
qwen-tokenizer`, see benchmarks/qwen_tokenizer.py): xgrammar's fill costs time per token of the
vocabulary, so only the real one measures it. Without it, the embedded model's (4096 tokens).

  python benchmarks/structured.py --mode library --vocab-size 151936 --device cuda
  python benchmarks/structured.py --mode engine --json out.json                       # batch 64, on the GPU
  python benchmarks/structured.py --mode engine --batch 4 --max-tokens 24 --max-model-len 256   # CPU, slow
  python benchmarks/structured.py --batch 8 --max-tokens 48 --max-model-len 256 --steps 20 \
      --model aio_engine/default_model --tokenizer aio_engine/default_model --load-format auto   # CPU smoke, 15 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structured import (  # noqa: E402
    BatchBitmask,
    GrammarCompilerService,
    RequestGrammar,
    StructuredOutputsParams,
    accept_batch,
)

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_TOKENIZER = ROOT / "aio_engine" / "default_model"
QWEN_TOKENIZER = ROOT / "benchmarks" / "tokenizers" / "qwen3"  # qwen_tokenizer.py's output
DEFAULT_TOKENIZER = QWEN_TOKENIZER if (QWEN_TOKENIZER / "tokenizer.json").is_file() else EMBEDDED_TOKENIZER
DEFAULT_MODEL = ROOT / "benchmarks" / "models" / "qwen3-0.6b"
# A JSON schema of moderate size: nesting, arrays, enums, ranges, patterns, optional fields.
SCHEMA = {
    "type": "object",
    "required": ["id", "name", "status", "tags", "address", "scores"],
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{2,10}\\.(com|org|net)$"},
        "status": {"enum": ["active", "inactive", "pending"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 5},
        "address": {"type": "object", "required": ["city", "zip"], "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 100}, "maxItems": 4},
        "manager": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("library", "engine", "all"), default="all")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--vocab-size", type=int, default=None, help="library: the lm_head width (>= tokenizer's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="library: bitmask steps")
    parser.add_argument("--profile", action="store_true",
                        help="engine: one more pair per fill-thread count, first, under cProfile (kept out of the ratios)")
    parser.add_argument("--repeats", type=_positive, default=3,
                        help="engine: constrained runs per fill-thread count, each paired with its unconstrained twin (the twin first in every second pair)")
    parser.add_argument("--fill-threads", nargs="+", default=["1"],
                        help="threads for one batch fill: integers (the engine's default: a quarter of the cores, 1 to 4), or auto for "
                             "xgrammar's (half the host's cores); engine mode runs the constrained batch once "
                             "per value (--repeats times), library mode uses the first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    engine = parser.add_argument_group("engine mode")
    engine.add_argument("--model", default=str(DEFAULT_MODEL))
    engine.add_argument("--load-format", default="dummy")
    engine.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, the engine's default on CPU")
    engine.add_argument("--max-tokens", type=int, default=256, help="per request, constrained or not")
    engine.add_argument("--max-model-len", type=int, default=1024)
    engine.add_argument("--any-whitespace", action="store_true", help="let the JSON grammar allow free whitespace")
    engine.add_argument("--enforce-eager", action="store_true")
    engine.add_argument("--no-async-scheduling", action="store_true", help="every step in order (to compare)")
    engine.add_argument("--sampler-graphs", type=_positive, default=None,
                        help="CUDA graphs the sampler keeps (its LRU; default: the engine's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    embedded = Path(args.tokenizer).resolve() == EMBEDDED_TOKENIZER
    print(f"tokenizer: {args.tokenizer}" + (" (the embedded one; `make qwen-tokenizer` builds Qwen3's)" if embedded else ""))
    results = {}
    if args.mode in ("engine", "all"):  # first: nothing of the library run's threads is left around
        results["engine"] = engine_level(args)
    if args.mode in ("library", "all"):
        results["library"] = library(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def library(args) -> dict:
    """structured/ alone: compile, and fill + apply over a batch of matchers fed random tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    start = time.perf_counter()
    service = GrammarCompilerService(tokenizer, args.vocab_size)
    info_s = time.perf_counter() - start
    params = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    compiled = service.compile_sync(params)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        service.compile_sync(params)
    cached_s = (time.perf_counter() - start) / 100

    vocab = service.vocab_size
    bitmask = BatchBitmask(args.batch, vocab, args.device, fill_threads=_threads(args.fill_threads[0]))
    grammars = [RequestGrammar(compiled) for _ in range(args.batch)]
    gen = torch.Generator(device=args.device).manual_seed(0)
    fills, applies = [], []
    for _ in range(args.steps):
        live = [i for i, g in enumerate(grammars) if not g.is_terminated]
        if not live:  # every row finished: start them over, the cost is per step
            for g in grammars:
                g.reset()
            live = list(range(args.batch))
        start = time.perf_counter()
        bitmask.fill([grammars[i] for i in live], live)
        fills.append(time.perf_counter() - start)
        logits = torch.randn(args.batch, vocab, device=args.device, generator=gen)  # [batch, vocab]
        _sync(args.device)
        start = time.perf_counter()
        bitmask.apply(logits)
        _sync(args.device)
        applies.append(time.perf_counter() - start)
        tokens = torch.multinomial(torch.softmax(logits[live], -1), 1, generator=gen)[:, 0].tolist()
        assert all(accept_batch([grammars[i] for i in live], tokens))

    fill_ms, apply_ms = statistics.median(fills) * 1e3, statistics.median(applies) * 1e3
    print(f"tokenizer {Path(args.tokenizer).name}, vocab {vocab}, batch {args.batch}, device {args.device}")
    print("| TokenizerInfo (s) | compile cold (ms) | compile cached (us) | fill / step (ms) | "
          "fill / row (us) | apply / step (ms) |")
    print("|---|---|---|---|---|---|")
    print(f"| {info_s:.3f} | {cold_s * 1e3:.1f} | {cached_s * 1e6:.1f} | {fill_ms:.3f} | "
          f"{fill_ms * 1e3 / args.batch:.1f} | {apply_ms:.3f} |")
    service.close()
    return {"tokenizer": Path(args.tokenizer).name, "vocab_size": vocab, "batch": args.batch, "device": args.device,
            "tokenizer_info_s": info_s, "compile_cold_ms": cold_s * 1e3, "compile_cached_us": cached_s * 1e6,
            "fill_per_step_ms": fill_ms, "fill_per_row_us": fill_ms * 1e3 / args.batch, "apply_per_step_ms": apply_ms}


def engine_level(args) -> dict:
    """Decode throughput through LLM, unconstrained then constrained by SCHEMA, and the bitmask's cost."""
    from aio_engine import LLM, RequestOutputKind, SamplingParams

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "auto")
    start = time.perf_counter()
    llm = LLM(args.model, tokenizer=args.tokenizer, load_format=args.load_format, dtype=dtype, device=args.device,
              max_num_seqs=max(args.batch, 1), max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
              async_scheduling=not args.no_async_scheduling, use_tqdm_on_load=False)
    startup_s = time.perf_counter() - start
    core = llm.core
    vocab = core.config.model.vocab_size
    start = time.perf_counter()
    service = core.grammars  # made on first use: xgrammar's tables of the whole vocabulary
    compiler_s = time.perf_counter() - start
    structured = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=not args.any_whitespace)
    start = time.perf_counter()
    service.compile_sync(structured)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        service.compile_sync(structured)
    cached_s = (time.perf_counter() - start) / 100

    # Every bitmask fill of the engine, timed where it runs (the fill's worker thread, or the loop's
    # thread for a fill made at sampling): (seconds, rows filled); and the loop's thread's waits
    # for a fill (the part of it the host's step did not hide), in seconds; and its time in
    # accepted() (the worker's accept handed back, the grammars' counts booked), in seconds.
    fills: list[tuple[float, int]] = []
    waits: list[float] = []
    handbacks: list[float] = []

    def timed_fill(fill):
        def timed(handles, bitmask, rows, debug) -> None:
            start = time.perf_counter()
            fill(handles, bitmask, rows, debug)
            fills.append((time.perf_counter() - start, len(rows)))
        return timed

    def use_bitmask(threads: str) -> None:
        """The runner's bitmask, with `threads` for a fill, its fills and the waits for them timed."""
        bitmask = BatchBitmask(core.runner.max_num_seqs, vocab, core.config.device, fill_threads=_threads(threads))
        bitmask._fill = timed_fill(bitmask._fill)
        finish_fill = bitmask.finish_fill

        def timed_finish_fill() -> None:
            if bitmask._filling:
                start = time.perf_counter()
                finish_fill()
                waits.append(time.perf_counter() - start)

        accepted = bitmask.accepted

        def timed_accepted() -> list[bool]:
            start = time.perf_counter()
            try:
                return accepted()
            finally:
                handbacks.append(time.perf_counter() - start)

        bitmask.finish_fill, bitmask.accepted = timed_finish_fill, timed_accepted
        core.runner.bitmask = bitmask

    use_bitmask(args.fill_threads[0])
    graphs = getattr(core.runner.sampler, "graphs", None)  # the sampler's CUDA graphs (None: eager)
    if graphs is not None:
        if args.sampler_graphs:
            graphs.max_graphs = args.sampler_graphs
        _time_captures(graphs)
    prompts = [f"Record {i} of the registry, as JSON:" for i in range(args.batch)]

    def params(constrained: bool, seed: int) -> SamplingParams:
        # Final outputs only, as LLM.generate asks for them (a cumulative output per request per step
        # is host work that the unconstrained run hides behind the GPU and the constrained one cannot).
        final = RequestOutputKind.FINAL_ONLY
        if constrained:
            return SamplingParams(temperature=1.0, seed=seed, max_tokens=args.max_tokens, structured_outputs=structured,
                                  output_kind=final)
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=args.max_tokens, ignore_eos=True, output_kind=final)

    # Warm up both paths (CUDA graphs, Triton, the sampler and bitmask buffers).
    for constrained in (False, True):
        llm.generate(prompts[:2], [params(constrained, 0)] * 2, use_tqdm=False)
    fills.clear()

    runs = {}
    runs["unconstrained"] = _timed_batch(core, prompts, [params(False, i) for i in range(args.batch)])
    runs["unconstrained"]["fill_calls"] = len(fills)
    # Constrained requests end where their grammar does (a random model's JSON object ends at its
    # eos), so the batch thins out; the same run unconstrained, each request stopping at the
    # length it had constrained, has the same shape: the ratio to it is the constraint's own cost.
    # Each constrained run is paired with its unconstrained twin, --repeats times, the twin first in
    # every second pair (the host's speed drifts within a process: a pair's ratio is the figure,
    # their median the result).
    free = runs["unconstrained"]
    pair_ratios: dict[str, list[float]] = {}
    fixed_pairs: dict[str, list[float]] = {}  # against the one fixed-length unconstrained run above

    def ratio_of(a: dict, b: dict) -> float:
        return a["decode_tok_s"] / b["decode_tok_s"] if b["decode_tok_s"] else float("nan")

    def twin_of(lengths: list[int], profile: bool = False) -> dict:
        """The batch unconstrained, each request stopping at `lengths`."""
        twin = _timed_batch(core, prompts, [replace(params(False, i), max_tokens=n) for i, n in enumerate(lengths)],
                            profile)
        assert twin["lengths"] == lengths, "the unconstrained run did not stop at the constrained lengths"
        return twin

    def pair(name: str, threads: str, profile: bool = False, lengths: list[int] | None = None) -> tuple[dict, dict]:
        """A constrained run and its unconstrained twin at the lengths it reaches. Given the
        lengths an earlier run reached (seeded requests reach them again), the twin runs first,
        so that over the repeats the host's drift favours neither side; should the constrained
        run end elsewhere after all, that twin is dropped and another runs after it."""
        twin = twin_of(lengths, profile) if lengths is not None else None
        fills.clear()
        waits.clear()
        handbacks.clear()
        runs[name] = run = _timed_batch(core, prompts, [params(True, i) for i in range(args.batch)], profile)
        run["fill_calls"], run["fill_threads"] = len(fills), threads
        run["fill_per_step_ms"] = statistics.median(t for t, _ in fills) * 1e3 if fills else 0.0
        run["fill_wait_per_step_ms"] = sum(waits) / max(1, len(fills)) * 1e3
        run["accept_handback_per_step_ms"] = sum(handbacks) / max(1, len(fills)) * 1e3
        run["fill_per_row_us"] = sum(t for t, _ in fills) / max(1, sum(n for _, n in fills)) * 1e6
        run["twin_first"] = twin is not None and run["lengths"] == lengths
        if not run["twin_first"]:
            twin = twin_of(run["lengths"], profile)
        runs[f"unconstrained, the lengths of {name}"] = twin
        return run, twin

    for threads in dict.fromkeys(args.fill_threads):  # each value once, in order
        use_bitmask(threads)
        label = "constrained" if len(set(args.fill_threads)) == 1 else f"constrained, {threads} fill threads"
        if args.profile:  # a pair of its own: the profiler's cost stays out of the ratios
            pair(f"{label} (profiled)", threads, profile=True)
        lengths = None
        for repeat in range(1, args.repeats + 1):
            run, twin = pair(label if repeat == 1 else f"{label} #{repeat}", threads,
                             lengths=lengths if repeat % 2 == 0 else None)
            lengths = run["lengths"]
            pair_ratios.setdefault(label, []).append(ratio_of(run, twin))
            fixed_pairs.setdefault(label, []).append(ratio_of(run, free))
    ratios = {label: statistics.median(values) for label, values in pair_ratios.items()}
    fixed_ratios = {label: statistics.median(values) for label, values in fixed_pairs.items()}
    assert runs["unconstrained"]["fill_calls"] == 0, "an unconstrained batch filled bitmask rows"
    ratio = max(ratios.values())
    print(f"model {Path(args.model).name} ({args.load_format}, {core.config.model.dtype}), tokenizer "
          f"{Path(args.tokenizer).name}, vocab {vocab}, batch {args.batch}, max_tokens {args.max_tokens}, "
          f"device {core.config.device}, async scheduling {core.config.scheduler.async_scheduling}, "
          f"fill threads {' '.join(args.fill_threads)}, startup {startup_s:.1f}s")
    print("| run | decode tok/s | output tok/s | mean output len | decode step p50 / p90 / max (ms) | "
          "finished by grammar | valid JSON | fill / step (ms) | fill / request (us) | "
          "waited for the fill / step (ms) | accept handed back / step (ms) | steps run ahead | late samplings | sampler graphs captured (ms), eager runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        constrained = not name.startswith("unconstrained")
        if run.get("twin_first"):
            name += " (after its twin)"
        fill_cells = (f"{run['fill_per_step_ms']:.3f} | {run['fill_per_row_us']:.1f} | {run['fill_wait_per_step_ms']:.3f} | "
                      f"{run['accept_handback_per_step_ms']:.3f}" if constrained else "- | - | - | -")
        steps = " / ".join(f"{run[k]:.2f}" for k in ("step_ms_p50", "step_ms_p90", "step_ms_max"))
        print(f"| {name} | {run['decode_tok_s']:.0f} | {run['output_tok_s']:.0f} | {run['mean_output_len']:.1f} | "
              f"{steps} | {run['stopped']}/{args.batch} | {run['valid'] if constrained else '-'} | {fill_cells} | "
              f"{run['steps_run_ahead']}/{run['steps']} | {run['late_samplings']} | "
              f"{run.get('sampler_captures', '-')} ({run.get('sampler_capture_ms', 0):.1f}), {run.get('sampler_eager', '-')} |")
    for name, value in ratios.items():
        pairs = ", ".join(f"{r:.1%}" for r in pair_ratios[name])
        print(f"{name} / unconstrained decode throughput at the same lengths: median {value:.1%} of {pairs} "
              f"(goal >= 90%); against the one run of {args.max_tokens} tokens each: median {fixed_ratios[name]:.1%}")
    print("| compiler for the vocabulary (s) | compile cold (ms) | compile cached (us) |")
    print("|---|---|---|")
    print(f"| {compiler_s:.3f} | {cold_s * 1e3:.1f} | {cached_s * 1e6:.1f} |")
    return {"model": Path(args.model).name, "tokenizer": Path(args.tokenizer).name, "load_format": args.load_format,
            "dtype": str(core.config.model.dtype), "device": str(core.config.device), "vocab_size": vocab,
            "batch": args.batch, "max_tokens": args.max_tokens,
            "async_scheduling": core.config.scheduler.async_scheduling, "fill_threads": args.fill_threads,
            "runs": runs, "decode_ratio": ratio, "decode_ratios": ratios, "decode_ratio_pairs": pair_ratios,
            "decode_ratios_fixed_length": fixed_ratios,
            "compiler_s": compiler_s, "compile_cold_ms": cold_s * 1e3,
            "compile_cached_us": cached_s * 1e6}


def _timed_batch(core, prompts, params, profile: bool = False) -> dict:
    """Run one batch to the end on the core, step by step; decode steps are those computing no
    prompt token. `profile`: under cProfile, its 25 functions of most own time printed (the
    times then include the profiler's cost)."""
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(_timed_batch, core, prompts, params)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return result
    finals = {}
    ids = [core.add_request(None, prompt, p)[0].parent_id for prompt, p in zip(prompts, params)]
    decode_s, decode_tokens, step_times = 0.0, 0, []
    start = time.perf_counter()
    generated = core.num_generated_tokens
    steps, ahead, late = core.num_steps, core.num_steps_run_ahead, core.num_late_samplings
    graphs = getattr(core.runner.sampler, "graphs", None)
    if graphs is not None:
        captures, replays, runs, capture_s = graphs.captures, graphs.replays, graphs.runs, graphs.capture_s
    while core.has_unfinished:
        prompt_before, tokens_before = core.num_prompt_tokens_computed, core.num_generated_tokens
        step_start = time.perf_counter()
        for out in core.step():
            if out.finished:
                finals[out.request_id] = out
        if core.num_prompt_tokens_computed == prompt_before:
            step_times.append(time.perf_counter() - step_start)
            decode_tokens += core.num_generated_tokens - tokens_before
    decode_s = sum(step_times)
    step_ms = sorted(t * 1e3 for t in step_times) or [0.0]
    elapsed = time.perf_counter() - start
    total = core.num_generated_tokens - generated
    outputs = [o.outputs[0] for o in finals.values()]
    valid = 0
    for c in outputs:
        if c.finish_reason == "stop":
            try:
                json.loads(c.text)
                valid += 1
            except ValueError:
                pass
    return {"elapsed_s": elapsed, "output_tokens": total, "output_tok_s": total / elapsed,
            "decode_s": decode_s, "decode_tokens": decode_tokens,
            "decode_tok_s": decode_tokens / decode_s if decode_s else 0.0,
            "step_ms_p50": step_ms[len(step_ms) // 2], "step_ms_p90": step_ms[int(len(step_ms) * 0.9)],
            "step_ms_max": step_ms[-1],
            "mean_output_len": total / max(1, len(outputs)),
            "lengths": [len(finals[i].outputs[0].token_ids) for i in ids],
            "stopped": sum(c.finish_reason == "stop" for c in outputs), "valid": valid,
            # async scheduling: steps finished with the next one already queued, and steps whose
            # sampling waited for the host (grammars: all of them but the first)
            "steps": core.num_steps - steps, "steps_run_ahead": core.num_steps_run_ahead - ahead,
            "late_samplings": core.num_late_samplings - late,
            # the sampler's CUDA graphs: layouts captured (and the host's time for it), eager runs
            **({"sampler_captures": graphs.captures - captures, "sampler_capture_ms": (graphs.capture_s - capture_s) * 1e3,
                "sampler_eager": (graphs.runs - runs) - (graphs.replays - replays)} if graphs is not None else {})}


def _time_captures(graphs) -> None:
    """Count the sampler's runs and time its graph captures (graphs.capture_s), for _timed_batch."""
    capture, run = graphs._capture, graphs.run
    graphs.capture_s, graphs.runs = 0.0, 0

    def timed_capture(*args, **kwargs):
        start = time.perf_counter()
        try:
            return capture(*args, **kwargs)
        finally:
            graphs.capture_s += time.perf_counter() - start

    def counted_run(*args, **kwargs):
        graphs.runs += 1
        return run(*args, **kwargs)

    graphs._capture, graphs.run = timed_capture, counted_run


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _threads(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
