"""StructuredOutputsConfig: the engine-wide settings of grammar-constrained decoding.

The flags follow vLLM's `--structured-outputs-config` (`-so.disable_any_whitespace=true`, ...).
aio_engine/config.py nests one of these in the engine config; structured/ only reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def default_fill_threads() -> int:
    """A quarter of the host's cores, from 1 to 4 (see StructuredOutputsConfig.fill_threads)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


@dataclass(frozen=True)
class StructuredOutputsConfig:
    # Only xgrammar is implemented; "auto" is accepted because vLLM users pass it.
    backend: str = "xgrammar"
    # Server-wide defaults, OR-ed with the per-request flags of StructuredOutputsParams.
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    # Compiled grammars kept (LRU); one compiled grammar holds a token mask cache of the vocabulary.
    max_cache_entries: int = 128
    # Threads xgrammar uses inside one compile, and compiles that may run at once.
    compile_threads: int = 8
    compile_workers: int = 2
    # Threads of xgrammar's per-step batch bitmask fill: a quarter of the cores, 1 to 4. Measured,
    # 64 rows of Qwen3's vocabulary mid-JSON: on the 16-core GPU machine 1.47 ms on one thread,
    # 0.75 ms on four (constrained throughput 38.6% -> 48.6% of unconstrained); on a 2-core host
    # two threads were slower than one.
    fill_threads: int = field(default_factory=default_fill_threads)

    def __post_init__(self) -> None:
        if self.backend not in ("xgrammar", "auto"):
            raise ValueError(f"structured_outputs_config.backend must be 'xgrammar' or 'auto', got {self.backend!r}")
        for name in ("max_cache_entries", "compile_threads", "compile_workers", "fill_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"structured_outputs_config.{name} must be an integer >= 1, got {value!r}")
