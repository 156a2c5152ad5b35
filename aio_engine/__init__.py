"""aio-engine: an asyncio-first LLM inference and serving engine.

The names below load on first use (PEP 562): `aio-engine serve` starts its engine process before
this process imports torch (web/engine_spawn.py), and `import aio_engine` alone stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "AsyncEngine": ".async_engine", "EngineDeadError": ".async_engine", "EngineArgs": ".config",
    "EngineConfig": ".config", "LLM": ".llm", "CompletionOutput": ".outputs", "RequestOutput": ".outputs",
    "RequestOutputKind": "sampling.params", "SamplingParams": "sampling.params",
    "StructuredOutputsParams": "structured.params",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
