"""What every generation route shares, whatever the transport (SSE, plain JSON, websocket).

- ServingContext: the engine, the settings, metrics, the chat renderer, admission checks.
- Generation: the engine requests behind one API request (one per prompt), started together so
  that the engine's validation errors arrive before any header is sent, and merged as they come.
  Leaving it early (client gone, socket closed) aborts them; `abort()` ends them on purpose, which
  still yields their final output (finish_reason "abort").
- ChoiceBuffer: one choice's not yet sent text and tokens, flushed every `stream_interval` tokens.
- Job: the base of CompletionJob and ChatJob: prepare (validate, tokenize) -> start -> chunks()
  for streaming or result() for one body; the same chunks go out as SSE events or ws messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aio_engine.async_engine import LARGE_PROMPT_CHARS, AsyncEngine, EngineDeadError
from aio_engine.outputs import CompletionOutput, RequestOutput
from sampling.params import SamplingParams

from .chat import ChatRenderer
from .errors import OverloadedError, RequestError
from .metrics import ServerMetrics
from .protocol import StreamOptions, expect
from .responses import TokenNamer, head, now, usage
from .settings import ServerSettings, clip

logger = logging.getLogger(__name__)


@dataclass
class ServingContext:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    chat: ChatRenderer
    load: int = 0  # generation requests in flight (GET /load)

    @classmethod
    def create(cls, engine: AsyncEngine, settings: ServerSettings) -> ServingContext:
        return cls(engine, settings, ServerMetrics(engine, settings.model_name), ChatRenderer(engine.tokenizer, settings))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.model.max_model_len

    @property
    def generation_defaults(self) -> dict:
        return {k: v for k, v in self.engine.config.model.generation_defaults.items() if not k.startswith("_")}

    def check_model(self, body: dict) -> str:
        names = self.settings.served_model_names
        model = expect(body, "model", str) or names[0]
        if model not in names:
            raise RequestError(f"the model {model!r} does not exist; this server serves {names}", 404,
                               "NotFoundError", "model")
        return model

    def check_admission(self) -> None:
        """Refuse new work when the engine is dead or too many requests wait (both 503)."""
        if self.engine.dead_error is not None:
            raise EngineDeadError(f"engine loop died: {self.engine.dead_error!r}")
        limit = self.settings.max_waiting_requests
        if limit is not None and self.engine.num_waiting >= limit:
            raise OverloadedError(f"server overloaded: {limit} requests are already waiting; retry later")

    def check_priority(self, body: dict) -> int:
        priority = expect(body, "priority", int, 0)
        if priority != 0 and self.engine.config.scheduler.policy != "priority":
            raise RequestError("'priority' needs the server to run with --scheduling-policy priority", param="priority")
        return priority

    def check_n(self, n: int) -> None:
        limit = self.engine.config.scheduler.max_num_seqs
        if n > limit:
            raise RequestError(f"'n' must be <= max_num_seqs ({limit}), got {n}", param="n")

    def namer(self, as_ids: bool | None = None) -> TokenNamer:
        return TokenNamer(self.tokenizer, self.settings.return_tokens_as_token_ids if as_ids is None else as_ids)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("text prompts need a tokenizer (the engine runs with --skip-tokenizer-init)", param="prompt")
        if len(text) < LARGE_PROMPT_CHARS:
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        loop = asyncio.get_running_loop()  # a huge prompt: keep the loop free
        return await loop.run_in_executor(None, lambda: self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


class Generation:
    """The engine requests of one API request; iterate for (prompt index, RequestOutput)."""

    def __init__(self, ctx: ServingContext, inputs: list[tuple[dict, SamplingParams]], priority: int = 0) -> None:
        self.ctx = ctx
        base = uuid.uuid4().hex
        self.inputs = inputs
        self.request_ids = [f"{base}-{i}" for i in range(len(inputs))]
        self.priority = priority
        self._gens: list = []
        self._tasks: list[asyncio.Future] = []
        self.started = False

    async def start(self) -> None:
        """Queue every engine request now; the engine's refusals raise here, before any response."""
        engine = self.ctx.engine
        settings = self.ctx.settings
        if settings.enable_log_requests:
            limit = settings.max_log_len
            for (prompt, params), rid in zip(self.inputs, self.request_ids):
                text, ids = (prompt.get("prompt"), prompt.get("prompt_token_ids")) if isinstance(prompt, dict) else (prompt, None)
                logger.info("request %s: prompt %s, prompt_token_ids %s, params %s", rid, clip(repr(text), limit),
                            clip(ids, limit), params)
        self._gens = [engine.generate(prompt, params, rid, self.priority)
                      for (prompt, params), rid in zip(self.inputs, self.request_ids)]
        # The first step of each generator registers its request (it then waits for a token).
        self._firsts = [asyncio.ensure_future(anext(g)) for g in self._gens]
        self._tasks = list(self._firsts)
        await asyncio.sleep(0)
        for first, rid in zip(self._firsts, self.request_ids):
            error = None
            try:
                await engine.accepted(rid)
            except Exception as e:
                error = e
            if error is None and first.done() and not first.cancelled():
                error = first.exception()
            if error is not None:
                await self.aclose()
                raise error
        self.started = True
        self.ctx.load += 1

    async def _one(self, i: int) -> AsyncIterator[RequestOutput]:
        """Outputs of engine request i, with the timings metrics need."""
        last, tokens = None, 0
        metrics = self.ctx.metrics
        log_outputs = self.ctx.settings.enable_log_outputs
        texts: dict[int, str] = {}
        out = await self._firsts[i]
        while True:
            t = time.monotonic()
            new = sum(len(c.token_ids) for c in out.outputs)
            if last is not None and new:
                metrics.observe_gap(t - last, new)
            if new:
                last = t
            tokens += new  # DELTA outputs add up; a FINAL_ONLY output holds them all
            if log_outputs:
                for c in out.outputs:
                    texts[c.index] = texts.get(c.index, "") + c.text
            if out.finished:
                metrics.observe_finished(out, tokens)
                if log_outputs:
                    limit = self.ctx.settings.max_log_len
                    logger.info("request %s finished (%s): %s", self.request_ids[i],
                                ", ".join(str(c.finish_reason) for c in out.outputs),
                                " | ".join(clip(repr(texts[k]), limit) for k in sorted(texts)))
            yield out
            if out.finished:
                return
            out = await anext(self._gens[i])

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self._gens) == 1:
            async for out in self._one(0):
                yield 0, out
            return
        # Each pump hands over one output at a time and waits until it is taken, so a slow client
        # leaves the rest in the engine's collectors (merged there) rather than in a growing queue.
        queue: asyncio.Queue = asyncio.Queue()
        taken = [asyncio.Event() for _ in self._gens]

        async def pump(i: int) -> None:
            try:
                async for out in self._one(i):
                    taken[i].clear()
                    queue.put_nowait((i, out))
                    await taken[i].wait()
            except BaseException as e:
                queue.put_nowait((i, e))
            finally:
                queue.put_nowait((i, None))

        self._tasks += [asyncio.create_task(pump(i)) for i in range(len(self._gens))]
        remaining = len(self._gens)
        while remaining:
            i, item = await queue.get()
            taken[i].set()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item

    async def abort(self) -> None:
        """End every engine request now; their final outputs (finish_reason 'abort') still come."""
        for rid in self.request_ids:
            await self.ctx.engine.abort(rid)

    async def aclose(self) -> None:
        """Stop listening; engine requests not finished yet are aborted and their blocks freed."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for gen in self._gens:
            try:
                await gen.aclose()
            except RuntimeError:  # closing a generator a cancelled task left mid-step
                pass
        if self.started:
            self.started = False
            self.ctx.load -= 1


class ChoiceBuffer:
    """One choice's text, tokens and logprobs not yet sent."""

    def __init__(self, index: int, want_logprobs: bool) -> None:
        self.index = index
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if want_logprobs else None
        self.num_tokens = 0  # all tokens so far, sent or not
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def prepend(self, text: str, token_ids: list[int], logprobs: list | None) -> None:
        self.text = text + self.text
        self.token_ids = token_ids + self.token_ids
        if self.logprobs is not None:
            self.logprobs = None if logprobs is None else logprobs + self.logprobs

    def add(self, c: CompletionOutput) -> None:
        self.text += c.text
        self.token_ids += c.token_ids
        self.num_tokens += len(c.token_ids)
        if self.logprobs is not None:
            self.logprobs = self.logprobs + c.logprobs if c.logprobs is not None else None
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def due(self, interval: int) -> bool:
        return self.finished or (bool(self.text) and len(self.token_ids) >= interval)

    def take(self) -> tuple[str, list[int], list | None]:
        out = (self.text, self.token_ids, self.logprobs)
        self.text, self.token_ids = "", []
        if self.logprobs is not None:
            self.logprobs = []
        return out


class Job:
    """One completions or chat request, from body to chunks or a whole response body."""

    object_name = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, ctx: ServingContext, body: dict, request_id: str | None = None) -> None:
        self.ctx = ctx
        self.body = body
        self.request_id = f"{self.id_prefix}-{request_id or uuid.uuid4().hex}"
        self.created = now()
        self.generation: Generation | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.choices: list[ChoiceBuffer] = []

    def _common(self) -> None:
        body, ctx = self.body, self.ctx
        self.model = ctx.check_model(body)
        self.stream = expect(body, "stream", bool, False)
        self.options = StreamOptions.parse(body, self.stream, ctx.settings.enable_force_include_usage)
        self.priority = ctx.check_priority(body)
        expect(body, "user", str)  # accepted, for the client's own tracking
        self.namer = ctx.namer(expect(body, "return_tokens_as_token_ids", bool))
        ctx.check_admission()

    async def prepare(self) -> None:
        raise NotImplementedError

    async def check_grammar(self, structured, param: str) -> None:
        """Compile the request's grammar now (the engine caches it): an invalid schema, regex or
        grammar is a 400 naming `param`, before any byte of a stream goes out."""
        if structured is None:
            return
        try:
            await self.ctx.engine.compile_grammar(structured)
        except ValueError as e:
            raise RequestError(str(e), param=param) from None

    async def start(self) -> None:
        if self.generation is not None:
            await self.generation.start()

    async def abort(self) -> None:
        if self.generation is not None and self.generation.started:
            await self.generation.abort()

    async def close(self) -> None:
        if self.generation is not None:
            await self.generation.aclose()

    def head(self, chunk: bool) -> dict:
        return head(self.request_id, self.chunk_object if chunk else self.object_name, self.created, self.model,
                    self.ctx.settings.system_fingerprint)

    def usage(self) -> dict:
        completion = sum(c.num_tokens for c in self.choices)
        cached = self.cached_tokens if self.ctx.settings.enable_prompt_tokens_details else None
        return usage(self.prompt_tokens, completion, cached)

    def usage_chunk(self) -> dict:
        return {**self.head(True), "choices": [], "usage": self.usage()}

    def with_usage(self, chunk: dict) -> dict:
        if self.options.continuous_usage_stats:
            chunk["usage"] = self.usage()
        return chunk

    def chunks(self) -> AsyncIterator[dict]:
        raise NotImplementedError

    async def result(self) -> dict:
        raise NotImplementedError


def make_job(ctx: ServingContext, kind: str, body: dict, request_id: str | None = None) -> Job:
    from .serving_chat import ChatJob
    from .serving_completions import CompletionJob

    if kind in ("chat.completions", "chat"):
        return ChatJob(ctx, body, request_id)
    if kind in ("completions", "completion"):
        return CompletionJob(ctx, body, request_id)
    raise RequestError(f"unknown request type {kind!r}; use 'chat.completions' or 'completions'", param="type")
