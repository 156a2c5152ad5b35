"""Structured outputs, library level: grammar compile time (cold and cached) and the per-step cost
of the batch bitmask (fill on the CPU, apply on the logits' device), without the engine.

  python benchmarks/structured.py                                   # embedded model's tokenizer
  python benchmarks/structured.py --tokenizer path/to/Qwen3-0.6B --vocab-size 151936 --device cuda

The engine-level figure of issue 5 (decode throughput constrained vs unconstrained) needs the
engine wiring; this script isolates the part structured/ owns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
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

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "aio_engine" / "default_model"
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--vocab-size", type=int, default=None, help="the model's lm_head width (>= tokenizer's)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

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
    bitmask = BatchBitmask(args.batch, vocab, args.device)
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
