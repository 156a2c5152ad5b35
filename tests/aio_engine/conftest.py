"""Engine fixtures: LLMs built once per configuration, async engines built per test, and the check
that every engine test leaves all KV blocks free."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import torch

from aio_engine import LLM, AsyncEngine, EngineArgs
from aio_engine.engine_core import EngineCore

ALL_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mistral_window"]
# Small engines: a short context and a small cache keep memory and time low.
SMALL = dict(max_model_len=128, num_gpu_blocks_override=256, max_num_seqs=64)

_live_cores: list[EngineCore] = []


def assert_all_blocks_free(core: EngineCore) -> None:
    """Nothing is queued or running and every KV block is back in the free queue."""
    assert not core.has_unfinished, f"requests left: {list(core.scheduler.requests)}"
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert all(count == 0 for count in core.kv.ref_counts)
    assert core.outputs.parents == {} and core.outputs.sample_of == {}


@pytest.fixture(autouse=True)
def _blocks_free_after_test():
    """Every engine a test touched must end with all of its KV blocks free."""
    yield
    for core in _live_cores:
        try:
            assert_all_blocks_free(core)
        finally:  # a leak fails this test only, not every later one sharing the engine
            for request_id in list(core.scheduler.requests):
                core.abort(request_id)


@pytest.fixture(scope="session")
def make_llm(tiny_models):
    """make_llm(arch, **engine_args) -> an LLM, built once per distinct configuration."""
    cache: dict[tuple, LLM] = {}

    def make(arch: str = "llama", **kwargs) -> LLM:
        args = {**SMALL, **kwargs}
        key = (arch, tuple(sorted(args.items())))
        if key not in cache:
            cache[key] = LLM(model=str(tiny_models[arch]), **args)
            _live_cores.append(cache[key].core)
        return cache[key]

    yield make
    _live_cores.clear()


@pytest_asyncio.fixture
async def make_async_engine(tiny_models):
    """make_async_engine(arch, **engine_args) -> a fresh AsyncEngine, shut down after the test."""
    engines: list[AsyncEngine] = []

    def make(arch: str = "llama", **kwargs) -> AsyncEngine:
        args = EngineArgs(model=str(tiny_models[arch]), **{**SMALL, **kwargs})
        engine = AsyncEngine.from_engine_args(args)
        engines.append(engine)
        return engine

    yield make
    try:
        for engine in engines:
            # Aborts of closed generators land at the end of the step in flight: give them a moment.
            await wait_until_idle(engine)
            assert_all_blocks_free(engine.core)
    finally:
        for engine in engines:
            await engine.shutdown()


async def wait_until_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Wait until the engine holds no requests (or the timeout passes; the caller then asserts)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.core.has_unfinished and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def random_prompt(length: int, seed: int, low: int = 3, high: int = 400) -> list[int]:
    """Token ids of the tokenizer's ordinary vocabulary (no special tokens), fixed by seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (length,), generator=generator).tolist()
