"""serve() takes the startup heap out of the garbage collector's walks once the server is up, and
collects the young generation less often."""

from __future__ import annotations

import asyncio
import gc

from aio_engine import AsyncEngine, EngineArgs
from web.app import GC_YOUNG_THRESHOLD, serve
from web.settings import ServerSettings


async def test_serve_freezes_what_startup_allocated_and_collects_less_often(tiny_models):
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(tiny_models["qwen3"]), num_gpu_blocks_override=64,
                                                     max_model_len=256))
    task = asyncio.create_task(serve(engine, ServerSettings(served_model_names=["m"]), "127.0.0.1", 0))
    try:
        for _ in range(500):
            if gc.get_freeze_count():
                break
            await asyncio.sleep(0.01)
        frozen = gc.get_freeze_count()
        assert not task.done()
        assert frozen > 10_000  # the engine, torch and the app, not a handful
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *thresholds[1:])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gc.unfreeze()  # the rest of the suite collects as usual
        gc.set_threshold(*thresholds)
