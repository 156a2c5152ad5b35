"""StructuredOutputsConfig: the engine-wide settings of grammar-constrained decoding.

The flags follow vLLM's `--structured-outputs-config` (`-so.disable_any_whitespace=true`, ...).
aio_engine/config.py nests one of these in the engine config; structured/ only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    # Threads of xgrammar's per-step batch bitmask fill. One by default: more were slower wherever
    # measured (64 rows of a 151,936-token vocabulary: 0.67 ms on one thread, 1.03 ms on four here;
    # 2.65 ms on eight and 3.06 ms on xgrammar's "auto" on the 16-core GPU machine).
    fill_threads: int = 1

    def __post_init__(self) -> None:
        if self.backend not in ("xgrammar", "auto"):
            raise ValueError(f"structured_outputs_config.backend must be 'xgrammar' or 'auto', got {self.backend!r}")
        for name in ("max_cache_entries", "compile_threads", "compile_workers", "fill_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"structured_outputs_config.{name} must be an integer >= 1, got {value!r}")
