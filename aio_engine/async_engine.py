"""AsyncEngine: the engine loop as one asyncio task, and `async for` over each request's outputs.

The loop runs EngineCore.phases(), the one description of a step: it schedules and stages each
step (builds its inputs) on the event loop, enqueues it (on CUDA on the loop, where that only
queues work; on CPU in one worker thread, which also computes it), waits for its tokens in that
thread unless they are already home (so the loop stays free to accept requests and stream), then turns
tokens into outputs and hands them to each request's collector. With async scheduling step N+1 is
launched before step N's tokens are read. A collector keeps only what the consumer has not taken
yet, merged, so a slow consumer never grows a queue. Unless --disable-log-stats, a statistics line
goes to the log every 10 s of work (aio_engine/stats.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sampling.params import RequestOutputKind, SamplingParams

from .config import EngineArgs, EngineConfig
from .engine_core import EngineCore, EngineCounters, PromptType
from .outputs import RequestOutput
from .stats import StatsLogger

logger = logging.getLogger(__name__)

LARGE_PROMPT_CHARS = 20_000  # a text prompt longer than this is tokenized in a worker thread


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served until restart."""


class RequestCollector:
    """Latest undelivered output of one request, merged if the consumer falls behind."""

    def __init__(self, kind: RequestOutputKind) -> None:
        self.kind = kind
        self.pending: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput | BaseException) -> None:
        pending = self.pending
        if pending is None or isinstance(output, BaseException) or isinstance(pending, BaseException):
            self.pending = output if not isinstance(pending, BaseException) else pending
        elif self.kind == RequestOutputKind.DELTA:
            for old, new in zip(pending.outputs, output.outputs):
                new.text = old.text + new.text
                new.token_ids = old.token_ids + new.token_ids
            self.pending = output
        else:
            self.pending = output
        self.ready.set()

    async def get(self) -> RequestOutput:
        await self.ready.wait()
        output, self.pending = self.pending, None
        self.ready.clear()
        if isinstance(output, BaseException):
            raise output
        return output


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = self.core.tokenizer
        self._collectors: dict[str, RequestCollector] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aio-engine-step")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stepping = False
        self._pending_aborts: set[str] = set()
        self.dead_error: BaseException | None = None
        self._grammars: asyncio.Future | None = None  # the core's grammar compiler, made off the loop
        obs = config.observability
        self.stats = StatsLogger(self.core, obs.log_stats_interval) if obs.log_stats else None
        self._blocked = 0.0  # seconds this iteration waited for the worker thread (the device, on CUDA)
        # On CUDA a launch only queues work; on CPU it computes the step, so it goes to the worker.
        self._launch_inline = config.device.type == "cuda"

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncEngine:
        return cls(args.create_engine_config())

    # --- health ---
    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    async def check_health(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"engine loop died: {self.dead_error!r}")

    # --- requests ---
    def _ensure_loop(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"engine loop died: {self.dead_error!r}")
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aio-engine-loop")

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       prompt_token_ids: list[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs of one request until it finishes. Leaving early aborts it."""
        self._ensure_loop()
        params = sampling_params if sampling_params is not None else self.core.default_sampling_params()
        if prompt_token_ids is None and isinstance(prompt, str) and len(prompt) > LARGE_PROMPT_CHARS:
            # Tokenizing a huge prompt takes long: keep the loop free.
            loop = asyncio.get_running_loop()
            _, prompt_token_ids = await loop.run_in_executor(None, self.core.tokenize_prompt, prompt)
        grammar = None
        if params.structured_outputs is not None:  # compiled in a worker thread; the loop runs on
            grammar = await self.compile_grammar(params.structured_outputs)
        request_id = self.core.add_request(request_id, prompt, params, priority, prompt_token_ids, grammar)[0].parent_id
        collector = RequestCollector(params.output_kind)
        self._collectors[request_id] = collector
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                output = await collector.get()
                finished = output.finished
                yield output
        finally:
            self._collectors.pop(request_id, None)
            if not finished:
                self._abort_now_or_after_step(request_id)

    async def accepted(self, request_id: str) -> None:
        """Return once the engine has queued the request, ValueError if it refused it. Here the
        generator's first step queues it (or raises): nothing to wait for. (The web layer waits
        for this before a response's first byte; web/engine_process.py's client must.)"""

    async def compile_grammar(self, structured_outputs):
        """The compiled grammar of a StructuredOutputsParams (cached); ValueError if it is invalid.

        Everything slow happens in worker threads: the compile, and on first use importing xgrammar
        and reading the vocabulary into the compiler (seconds, for a large vocabulary).
        """
        if self._grammars is None:
            self._grammars = asyncio.get_running_loop().run_in_executor(None, lambda: self.core.grammars)
        grammars = await asyncio.shield(self._grammars)
        return await grammars.compile(structured_outputs)

    async def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
                   request_id: str | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                   **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """generate() over the model's chat template applied to `messages`."""
        ids = self.core.render_chat(messages, **(chat_template_kwargs or {}))
        async for out in self.generate({"prompt_token_ids": ids}, sampling_params, request_id, **kwargs):
            yield out

    async def abort(self, request_id: str) -> None:
        """Abort a request; its generator (if any) receives a final output with finish_reason 'abort'."""
        self._abort_now_or_after_step(request_id)

    def _abort_now_or_after_step(self, request_id: str) -> None:
        if self._stepping:  # the worker thread may be reading this request (blocks, tokens, grammar)
            self._pending_aborts.add(request_id)
            return
        final = self.core.abort(request_id)
        if final is not None:
            self._emit([final])
        else:
            self._collectors.pop(request_id, None)

    # --- the loop ---
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        stats = self.stats
        try:
            while True:
                if not core.has_unfinished:
                    if stats is not None:
                        stats.idle()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if stats is not None:
                    stats.begin()
                self._blocked = 0.0
                self._emit(await self._run_phases(loop, core.phases()))
                if stats is not None:
                    stats.end(self._blocked, core.last_finished)
                    core.last_finished = None
                await asyncio.sleep(0)  # let consumers and the web layer run between steps
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # every waiting caller hears of it; the engine is dead
            logger.exception("engine step failed; failing requests %s", list(core.outputs.parents))
            self.dead_error = e
            core.fail_all()
            error = EngineDeadError(f"engine step failed: {e!r}")
            error.__cause__ = e
            self._fail_waiting(error)

    async def _run_phases(self, loop: asyncio.AbstractEventLoop, phases) -> list[RequestOutput]:
        """Drive EngineCore.phases(): its host parts here on the loop, each blocking call in the
        worker thread. On CUDA, enqueue and a late sampling only queue work (no sync) and run here
        too: handing them to the worker costs two thread switches and, worse, the worker fights the
        loop's consumers for the GIL (measured: launch 1.2 -> 2.1 ms per step at batch 64). The wait
        for a step goes to the worker unless its CUDA event has already fired (a host-bound loop:
        then reading the ids here costs no blocking). Aborts that arrive while the worker runs (it
        may read those requests' blocks and tokens) apply when it returns."""
        runner = self.core.runner
        try:
            call = next(phases)
            while True:
                if self._launch_inline and (getattr(call, "func", None) != runner.wait or runner.is_done(*call.args)):
                    result = call()
                else:
                    self._stepping = True
                    blocked_from = time.perf_counter()
                    try:
                        result = await loop.run_in_executor(self._executor, call)
                    finally:
                        self._stepping = False
                        self._blocked += time.perf_counter() - blocked_from
                    self._apply_pending_aborts()
                call = phases.send(result)
        except StopIteration as done:
            return done.value

    def _apply_pending_aborts(self) -> None:
        pending, self._pending_aborts = self._pending_aborts, set()
        for request_id in pending:
            self._abort_now_or_after_step(request_id)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        """Hand one iteration's outputs (or an abort's final one) to their requests' collectors.
        The engine process (web/engine_process.py) sends them over its socket instead."""
        collectors = self._collectors
        for output in outputs:
            collector = collectors.get(output.request_id)
            if collector is not None:
                collector.put(output)
                if output.finished:
                    del collectors[output.request_id]

    def _fail_waiting(self, error: EngineDeadError) -> None:
        """The loop died: every request still waiting hears `error`."""
        for collector in self._collectors.values():
            collector.put(error)
        self._collectors.clear()

    @property
    def num_waiting(self) -> int:
        """Requests waiting to be scheduled (the server's admission check)."""
        return len(self.core.scheduler.waiting)

    def counters(self) -> EngineCounters:
        """The engine's gauges and counters now (what /metrics reports)."""
        return self.core.counters()

    async def shutdown(self) -> None:
        if self.stats is not None:
            self.stats.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.core.in_flight is not None:  # let the GPU finish it; its tokens are dropped
            self.core.runner.wait(self.core.in_flight[1])
            self.core.in_flight = None
        for request_id in list(self.core.outputs.parents):
            self.core.abort(request_id)
        self._executor.shutdown(wait=True)
