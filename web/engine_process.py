"""The engine in a process of its own: EngineClient here, AsyncEngine's loop there.

At stream interval 1 and a few hundred streams one process is host-bound: the engine's step
phases and the SSE handlers take turns on one event loop (docs/architecture.md). So `aio-engine
serve` (unless --no-engine-process) runs them apart, as vLLM does: this process keeps the HTTP
server, the SSE and websocket streams, chat templates and the tokenization of text prompts; a
spawned engine process runs AsyncEngine's loop (scheduler, model runner, detokenizer, stop checks)
and nothing else. EngineClient has the AsyncEngine methods the web layer calls (generate, abort,
accepted, compile_grammar, counters, health, shutdown), so the routes do not know which they have.

They talk over a Unix socket, one pickled frame (4-byte length, then the payload) per message:

  client -> engine   ("config", config, log level), once, first
                     ("add", id, prompt text, prompt ids, params, priority, arrival time)   ("abort", id)
                     ("grammar", call, structured_outputs)                    ("shutdown",)
  engine -> client   ("ready", config) or ("failed", reason), once
                     ("added", id, counters) or ("refused", id, error type, message, counters), per add
                     ("out", counters, [output, ...]): every output of one engine iteration
                     ("grammar", call, message or None)   ("dead", reason)

An output crosses as a tuple (request id, completions, finished, cached tokens, metrics, prompt
logprobs): the prompt's ids never go back, the client keeps them. One frame per iteration instead
of one wake-up per stream is what the engine process saves; the client's reader puts each output
in its request's RequestCollector, which merges what a slow stream has not taken yet, as in one
process. A client that goes away sends "abort" (its blocks are freed there); the engine process
ends when asked or when the socket closes (this process died), and a dead engine process fails
every open request with EngineDeadError.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator

from aio_engine.async_engine import (
    LARGE_PROMPT_CHARS,
    AsyncEngine,
    EngineDeadError,
    RequestCollector,
)
from aio_engine.config import EngineConfig
from aio_engine.engine_core import (
    EngineCounters,
    PromptType,
    default_sampling_params,
    tokenize_prompt,
)
from aio_engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from aio_engine.tokenizer import load_tokenizer
from sampling.params import SamplingParams

from . import engine_spawn

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<I")
ERRORS = {"EngineDeadError": EngineDeadError, "ValueError": ValueError}  # what a refusal can be, in this order


class Channel:
    """Pickled frames over one stream connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, message: tuple) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(HEADER.pack(len(payload)) + payload)

    async def recv(self) -> tuple:
        (size,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        return pickle.loads(await self.reader.readexactly(size))

    def close(self) -> None:
        self.writer.close()


def encode_output(o: RequestOutput) -> tuple:
    m = o.metrics
    return (o.request_id,
            [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
             for c in o.outputs],
            o.finished, o.num_cached_tokens,
            None if m is None else (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
                                    m.finished_time),
            o.prompt_logprobs)


# --- the engine process ---

class ProcessEngine(AsyncEngine):
    """AsyncEngine whose outputs go over the channel, one frame per iteration, not to collectors."""

    def __init__(self, config: EngineConfig, channel: Channel) -> None:
        super().__init__(config)
        self.channel = channel
        self._adding: dict[str, bool] = {}  # adds waiting for their grammar -> aborted meanwhile
        self._tasks: set[asyncio.Task] = set()  # (kept referenced until done)

    def _emit(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self.channel.send(("out", self.core.counters(), [encode_output(o) for o in outputs]))

    def _fail_waiting(self, error: EngineDeadError) -> None:
        self.channel.send(("dead", str(error)))

    async def serve_channel(self) -> None:
        """Answer the client's messages until "shutdown" or until its end of the socket closes."""
        channel = self.channel
        while True:
            try:
                message = await channel.recv()
            except (asyncio.IncompleteReadError, ConnectionError):
                logger.info("the API process closed the engine's socket: shutting down")
                return
            kind = message[0]
            if kind == "add":
                if message[1] in self._adding:  # as add_request() would for an id in use
                    self._refuse(message[1], ValueError(f"request id {message[1]!r} is already in use"))
                elif message[4].structured_outputs is not None:  # compiled in a worker thread first
                    self._adding[message[1]] = False
                    self._spawn(self._add_compiled(*message[1:]))
                else:
                    self._add(*message[1:])
            elif kind == "abort":
                if message[1] in self._adding:
                    self._adding[message[1]] = True
                else:
                    self._abort_now_or_after_step(message[1])
            elif kind == "grammar":
                self._spawn(self._check_grammar(message[1], message[2]))
            elif kind == "shutdown":
                return
            else:
                logger.error("unknown message %r from the API process", kind)

    def _add(self, request_id: str, text: str | None, ids: list[int], params: SamplingParams, priority: int,
             arrival: float, grammar=None) -> None:
        try:
            if self.dead_error is not None:
                raise EngineDeadError(f"engine loop died: {self.dead_error!r}")
            self.core.add_request(request_id, text, params, priority, ids, grammar, arrival)
        except Exception as e:
            self._refuse(request_id, e)
            return
        self.channel.send(("added", request_id, self.core.counters()))
        self._ensure_loop()
        self._wakeup.set()

    def _refuse(self, request_id: str, error: Exception) -> None:
        kind = next((name for name, cls in ERRORS.items() if isinstance(error, cls)), type(error).__name__)
        self.channel.send(("refused", request_id, kind, str(error), self.core.counters()))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_compiled(self, request_id: str, text, ids, params: SamplingParams, priority: int,
                            arrival: float) -> None:
        try:
            grammar = await self.compile_grammar(params.structured_outputs)
        except Exception as e:
            grammar, error = None, e
        else:
            error = None
        if self._adding.pop(request_id):  # aborted while it compiled
            error = error or ValueError("aborted")
        if error is not None:
            self._refuse(request_id, error)
        else:
            self._add(request_id, text, ids, params, priority, arrival, grammar)

    async def _check_grammar(self, call: int, structured_outputs) -> None:
        try:
            await self.compile_grammar(structured_outputs)
        except Exception as e:
            self.channel.send(("grammar", call, str(e)))
        else:
            self.channel.send(("grammar", call, None))


def run_engine_process(path: str) -> None:
    """The engine process (after web/engine_spawn.py's imports): connect to `path`, wait for the
    config, build the engine, serve the channel."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    asyncio.run(_run_engine_process(path))


async def _run_engine_process(path: str) -> None:
    from .app import freeze_startup_heap

    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # (uvloop's connect takes no abstract address)
        sock.connect(path)
        sock.setblocking(False)
        channel = Channel(*await asyncio.open_unix_connection(sock=sock))
        _, config, log_level = await channel.recv()
    except (OSError, asyncio.IncompleteReadError):  # the API process went away before it needed us
        return
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # tqdm's default lock is a multiprocessing semaphore; in a spawned process the resource tracker
    # then warns of it as leaked at exit. Progress bars here are written by this process's threads.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        engine = ProcessEngine(config, channel)
    except Exception as e:
        logger.exception("the engine failed to start")
        channel.send(("failed", f"{type(e).__name__}: {e}"))
        await channel.writer.drain()
        channel.close()
        return
    channel.send(("ready", engine.config))
    freeze_startup_heap()
    try:
        await engine.serve_channel()
    finally:
        await engine.shutdown()
        channel.close()


# --- the API process ---

class RequestStream(RequestCollector):
    """A request's collector here, with its prompt (outputs arrive without it) and the engine's
    answer to its add: a future, None once added, the error if refused."""

    def __init__(self, kind, prompt: str | None, prompt_token_ids: list[int]) -> None:
        super().__init__(kind)
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()


class EngineClient:
    """The AsyncEngine interface of the web layer, with the engine in a process of its own.

    `await EngineClient.start(config)` spawns the engine process and returns once its engine is
    built (the model loaded, graphs captured); the tokenizer loads here meanwhile.
    """

    def __init__(self, config: EngineConfig, tokenizer, channel: Channel, spawn: engine_spawn.EngineSpawn) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.channel = channel
        self.spawn = spawn
        self.process = spawn.process
        self.dead_error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        self._calls = itertools.count()
        self._grammar_calls: dict[int, asyncio.Future] = {}
        self._counters = EngineCounters()
        self._unanswered = 0  # adds sent, not yet answered "added" or "refused"
        self._closing = False
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="aio-engine-client")

    @classmethod
    async def start(cls, config: EngineConfig, log_level: int | None = None,
                    startup_timeout: float | None = None) -> EngineClient:
        loop = asyncio.get_running_loop()
        spawn = engine_spawn.take()  # started early by the CLI, or now
        process = spawn.process
        channel = None
        try:
            spawn.listener.setblocking(False)
            accepted = asyncio.ensure_future(loop.sock_accept(spawn.listener))
            connection, _ = await _watching(process, accepted, startup_timeout)
            spawn.close_listener()
            channel = Channel(*await asyncio.open_unix_connection(sock=connection))
            level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
            channel.send(("config", config, level))
            mc = config.model
            tokenizer = loop.run_in_executor(None, load_tokenizer, mc.tokenizer, mc.tokenizer_mode) if mc.tokenizer else None
            first = await _watching(process, asyncio.ensure_future(channel.recv()), startup_timeout)
            if first[0] != "ready":
                raise RuntimeError(f"the engine process failed to start: {first[1]}")
            client = cls(first[1], await tokenizer if tokenizer is not None else None, channel, spawn)
        except BaseException:
            if channel is not None:
                channel.close()
            await loop.run_in_executor(None, spawn.stop, 5.0)
            raise
        logger.info("engine process %d ready", process.pid)
        return client

    # --- what the web layer reads ---
    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    async def check_health(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"engine process died: {self.dead_error}")
        if self._closing:
            raise EngineDeadError("the engine was shut down")

    @property
    def num_waiting(self) -> int:
        """Waiting in the engine as of its last message, plus adds it has not answered yet."""
        return self._counters.waiting + self._unanswered

    def counters(self) -> EngineCounters:
        """As of the engine's last message (every answer to an add and every iteration with outputs)."""
        return self._counters

    def default_sampling_params(self) -> SamplingParams:
        return default_sampling_params(self.config)

    # --- requests ---
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       prompt_token_ids: list[int] | None = None) -> AsyncIterator[RequestOutput]:
        """As AsyncEngine.generate: outputs of one request until it finishes; leaving early aborts it."""
        await self.check_health()
        arrival = time.monotonic()  # (CLOCK_MONOTONIC: one clock for both processes)
        params = sampling_params if sampling_params is not None else self.default_sampling_params()
        request_id = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Registered before a long prompt's tokenization (a worker thread), so that accepted() waits.
        stream = self._streams[request_id] = RequestStream(params.output_kind, None, [])
        try:
            if prompt_token_ids is not None:
                text = prompt if isinstance(prompt, str) else None
            elif isinstance(prompt, str) and len(prompt) > LARGE_PROMPT_CHARS:
                text, prompt_token_ids = await asyncio.get_running_loop().run_in_executor(
                    None, tokenize_prompt, self.tokenizer, prompt)
            else:
                text, prompt_token_ids = tokenize_prompt(self.tokenizer, prompt)
            await self.check_health()
        except BaseException as e:
            self._streams.pop(request_id, None)
            stream.answer.set_result(e if isinstance(e, Exception) else EngineDeadError("cancelled"))
            raise
        stream.prompt, stream.prompt_token_ids = text, list(prompt_token_ids)
        self.channel.send(("add", request_id, text, stream.prompt_token_ids, params, priority, arrival))
        self._unanswered += 1
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished and self.dead_error is None and not self._closing:
                self.channel.send(("abort", request_id))

    async def accepted(self, request_id: str) -> None:
        """Return once the engine has queued the request (ValueError if it refused it): the web
        layer waits for this before it sends a response's first byte."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        refusal = await asyncio.shield(stream.answer)
        if refusal:
            raise refusal

    async def abort(self, request_id: str) -> None:
        """End a request; its generator still receives a final output (finish_reason 'abort')."""
        if self.dead_error is None and not self._closing:
            self.channel.send(("abort", request_id))

    async def compile_grammar(self, structured_outputs) -> None:
        """Compile (and cache) the grammar in the engine process; ValueError if it is invalid."""
        await self.check_health()
        call = next(self._calls)
        future = self._grammar_calls[call] = asyncio.get_running_loop().create_future()
        self.channel.send(("grammar", call, structured_outputs))
        error = await future
        if error is not None:
            raise ValueError(error)

    # --- the reader ---
    async def _read(self) -> None:
        try:
            while True:
                message = await self.channel.recv()
                kind = message[0]
                if kind == "out":
                    self._outputs(message[1], message[2])
                elif kind == "added":
                    self._unanswered -= 1
                    self._counters = message[2]
                    stream = self._streams.get(message[1])
                    if stream is not None and not stream.answer.done():
                        stream.answer.set_result(None)
                elif kind == "refused":
                    self._unanswered -= 1
                    self._counters = message[4]
                    self._refused(*message[1:4])
                elif kind == "grammar":
                    future = self._grammar_calls.pop(message[1], None)
                    if future is not None and not future.done():
                        future.set_result(message[2])
                elif kind == "dead":
                    self._die(message[1])
        except (asyncio.IncompleteReadError, ConnectionError):
            if not self._closing:  # dead at once (health 503, no new request), the exit code after
                self._die("the engine process exited")
                await asyncio.get_running_loop().run_in_executor(None, self.process.join, 5.0)
                logger.error("the engine process's exit code: %s", self.process.exitcode)
        except Exception as e:  # a frame this side cannot read: no later output could be trusted
            logger.exception("reading the engine process's messages failed")
            self._die(f"reading the engine process's messages failed: {e!r}")

    def _outputs(self, counters: EngineCounters, items: list[tuple]) -> None:
        self._counters = counters
        streams = self._streams
        for request_id, completions, finished, cached, metrics, prompt_logprobs in items:
            stream = streams.get(request_id)
            if stream is None or not stream.answer.done():
                # Its consumer left (an abort is on its way) or it ended already; or this id's
                # earlier request, aborted, ends before the engine has answered the new one's add.
                continue
            stream.put(RequestOutput(request_id, stream.prompt, stream.prompt_token_ids,
                                     [CompletionOutput(*c) for c in completions], finished, cached,
                                     None if metrics is None else RequestMetrics(*metrics), prompt_logprobs))
            if finished:
                del streams[request_id]

    def _refused(self, request_id: str, error_type: str, message: str) -> None:
        stream = self._streams.get(request_id)  # generate() forgets it when its consumer sees the error
        if stream is not None:
            error = ERRORS.get(error_type, RuntimeError)(message)
            if not stream.answer.done():
                stream.answer.set_result(error)
            stream.put(error)

    def _die(self, reason: str) -> None:
        logger.error("engine: %s", reason)
        self.dead_error = EngineDeadError(reason)
        self._fail_all(self.dead_error)

    def _fail_all(self, error: EngineDeadError) -> None:
        """Every open request, unanswered add and grammar call ends with `error`."""
        for stream in self._streams.values():
            if not stream.answer.done():
                stream.answer.set_result(error)
            stream.put(error)
        self._streams.clear()
        self._unanswered = 0
        for future in self._grammar_calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(str(error)))
        self._grammar_calls.clear()

    async def shutdown(self) -> None:
        """Ask the engine process to end (requests in flight are aborted there) and wait for it."""
        if self._closing:
            return
        self._closing = True
        try:
            self.channel.send(("shutdown",))
            await self.channel.writer.drain()
        except (ConnectionError, RuntimeError):
            pass
        await asyncio.get_running_loop().run_in_executor(None, self.spawn.stop, 30.0)
        self._reader.cancel()
        self.channel.close()
        self._fail_all(EngineDeadError("the engine was shut down"))


async def _watching(process, future: asyncio.Future, timeout: float | None):
    """`future`'s result, or RuntimeError as soon as the engine process has exited."""
    waited = 0.0
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.5)
            if done:
                return future.result()
            waited += 0.5
            if not process.is_alive():
                raise RuntimeError(f"the engine process exited during startup (exit code {process.exitcode})")
            if timeout is not None and waited >= timeout:
                raise TimeoutError(f"the engine process was not ready after {timeout:.0f} s")
    finally:
        future.cancel()  # a no-op once done
