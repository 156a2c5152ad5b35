"""aio-engine: an asyncio-first LLM inference and serving engine."""

from sampling.params import RequestOutputKind, SamplingParams
from structured.params import StructuredOutputsParams

from .async_engine import AsyncEngine, EngineDeadError
from .config import EngineArgs, EngineConfig
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput

__all__ = [
    "AsyncEngine", "CompletionOutput", "EngineArgs", "EngineConfig", "EngineDeadError", "LLM",
    "RequestOutput", "RequestOutputKind", "SamplingParams", "StructuredOutputsParams",
]
__version__ = "0.1.0"
