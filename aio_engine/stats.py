"""Periodic statistics in the log (vLLM's "Avg prompt throughput: ..." line), plus the loop's steps.

The AsyncEngine records each loop iteration (its wall time, consumers included, the time it sat
blocked on the device, and the shape of the step it waited for) and, at most every `interval`
seconds while the engine works and when it goes idle, logs throughput (prompt tokens counted when
scheduled, generated ones when read), running / waiting requests, KV-cache usage, the prefix-cache
hit rate over the interval, the iterations' median, p99 and longest time with what the longest one
held, the p99 of their two parts (the step's own work, then the consumers' and web layer's turn
before the next iteration), and the garbage collector's pauses: the line that says whether a latency tail comes from
prefill chunks (long steps, blocked on the device) or from the host. --disable-log-stats turns it off.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref

logger = logging.getLogger("aio_engine.stats")


class StatsLogger:
    def __init__(self, core, interval: float = 10.0) -> None:
        self.core = core
        self.interval = interval
        self.durations: list[float] = []
        self.engine_parts: list[float] = []  # each iteration's own step work; the rest is its consumers'
        self.longest: tuple[float, float, int, int] = (0.0, 0.0, 0, 0)  # seconds, blocked, prefill tokens, decode rows
        self.gc_pauses: list[float] = []  # the interval's garbage collections (seconds): they stall every stream
        self._gc_start = 0.0
        self._cycle_start: float | None = None  # when the running iteration began (None while idle)
        self._cycle: tuple[float, int, int] = (0.0, 0, 0)  # its blocked seconds, prefill tokens, decode rows
        self._engine_part = 0.0  # seconds from its begin() to its end()
        # The hook holds this logger weakly: an engine dropped without shutdown() must not be kept
        # alive (model, KV cache) by the interpreter's callback list.
        method = weakref.WeakMethod(self._on_gc)

        def hook(phase: str, info: dict) -> None:
            on_gc = method()
            if on_gc is not None:
                on_gc(phase, info)

        self._hook = hook
        gc.callbacks.append(hook)
        self._reset(time.monotonic())

    def close(self) -> None:
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_start)

    def _reset(self, now: float) -> None:
        core, kv = self.core, self.core.kv
        self.since = now
        self.prompt_tokens, self.generated = core.num_prompt_tokens_computed, core.num_generated_tokens
        self.queries, self.hits = kv.prefix_queries, kv.prefix_hits
        self.durations = []
        self.engine_parts = []
        self.longest = (0.0, 0.0, 0, 0)
        self.gc_pauses = []

    def begin(self) -> None:
        """An iteration of the engine loop starts: the one before it (its consumers included) ends."""
        now = time.perf_counter()
        if self._cycle_start is None:  # the first after idling: the interval starts now
            self._reset(time.monotonic())
        else:
            self.record(now - self._cycle_start, *self._cycle, engine_part=self._engine_part)
        self._cycle_start = now

    def end(self, blocked: float, done) -> None:
        """The iteration's step work is over: `blocked` seconds on the device, `done` the
        SchedulerOutput of the step it waited for (None if none)."""
        if self._cycle_start is not None:
            self._engine_part = time.perf_counter() - self._cycle_start
        if done is None:
            self._cycle = (blocked, 0, 0)
        else:
            self._cycle = (blocked, done.num_prefill_tokens, len(done.scheduled) - done.num_prefill_rows)

    def idle(self) -> None:
        """The engine has nothing left: the last iteration ends, and the interval's line is logged."""
        if self._cycle_start is not None:
            self.record(time.perf_counter() - self._cycle_start, *self._cycle, engine_part=self._engine_part)
            self._cycle_start = None
            if self.durations:
                self._log(time.monotonic())

    def record(self, seconds: float, blocked: float, prefill_tokens: int, decode_rows: int,
               engine_part: float) -> None:
        """One loop iteration (`engine_part` of it the step's own work, the rest its consumers
        and the web layer); logs (and starts a new interval) when the interval is over."""
        self.durations.append(seconds)
        self.engine_parts.append(engine_part)
        if seconds > self.longest[0]:
            self.longest = (seconds, blocked, prefill_tokens, decode_rows)
        now = time.monotonic()
        if now - self.since >= self.interval:
            self._log(now)

    def _log(self, now: float) -> None:
        logger.info("%s", self.line(now))
        self._reset(now)

    def line(self, now: float) -> str:
        core, kv, sched = self.core, self.core.kv, self.core.scheduler
        elapsed = max(now - self.since, 1e-9)
        queries = kv.prefix_queries - self.queries
        hit_rate = 100.0 * (kv.prefix_hits - self.hits) / queries if queries else 0.0
        text = (f"Avg prompt throughput: {(core.num_prompt_tokens_computed - self.prompt_tokens) / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {(core.num_generated_tokens - self.generated) / elapsed:.1f} tokens/s, "
                f"Running: {len(sched.running)} reqs, Waiting: {len(sched.waiting)} reqs, "
                f"GPU KV cache usage: {100.0 * kv.usage:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%")
        if self.durations:
            ms = sorted(1e3 * d for d in self.durations)
            seconds, blocked, prefill, decode = self.longest
            text += (f"; loop: {len(ms)} iterations, median {ms[len(ms) // 2]:.2f} ms, p99 {_p99(ms):.2f} ms, "
                     f"longest {1e3 * seconds:.2f} ms ({prefill} prefill tokens, {decode} decode rows, "
                     f"{1e3 * blocked:.2f} ms blocked on the device)")
            # What of the tail is the engine's step, what its consumers' turn.
            own = sorted(1e3 * e for e in self.engine_parts)
            rest = sorted(1e3 * (d - e) for d, e in zip(self.durations, self.engine_parts))
            text += (f"; the step's own part p99 {_p99(own):.2f} ms (longest {own[-1]:.2f}), "
                     f"consumers' part p99 {_p99(rest):.2f} ms (longest {rest[-1]:.2f})")
        if self.gc_pauses:
            text += (f"; GC: {len(self.gc_pauses)} collections, {1e3 * sum(self.gc_pauses):.1f} ms, "
                     f"longest {1e3 * max(self.gc_pauses):.1f} ms")
        return text


def _p99(ordered: list[float]) -> float:
    return ordered[int(0.99 * (len(ordered) - 1))]
