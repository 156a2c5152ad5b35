"""EngineCore: one synchronous engine (tokenizer, scheduler, KV-cache manager, runner, outputs).

A step goes through phases: `schedule()` and `stage()` (host work), `enqueue()` (queues the
forward and usually the sampling; computes on CPU), `runner.wait()` (the host sync),
`finish_step()` (tokens -> requests -> outputs) and, when the sampling had to wait for the step
before, `sample()` in the next iteration. `phases()` is the one
description of their order; `step()` runs it in place for the offline LLM, AsyncEngine runs its
blocking calls in a worker thread.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from typing import Any, NamedTuple

from sampling.params import SamplingParams

from .config import EngineConfig
from .kv_cache import KVCacheManager
from .model_runner import LaunchedStep, ModelRunner, StagedStep, StepResult
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .request import Request, RequestStatus
from .scheduler import Scheduler, SchedulerOutput
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class EngineCounters(NamedTuple):
    """The engine's gauges and counters at one moment (what /metrics reports, what admission reads;
    a tuple, so it crosses to web/engine_process.py's client as one)."""
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0  # computed by prefill (prefix-cache hits excluded)
    generated_tokens: int = 0
    steps: int = 0
    preemptions: int = 0


def tokenize_prompt(tokenizer, prompt: PromptType) -> tuple[str | None, list[int]]:
    """A prompt's text (None for token ids) and token ids."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        prompt = prompt["prompt"]
    if isinstance(prompt, list):
        return None, list(prompt)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer (the engine runs with --skip-tokenizer-init)")
    return prompt, tokenizer(prompt).input_ids


def default_sampling_params(config: EngineConfig) -> SamplingParams:
    """SamplingParams carrying the model's generation-config defaults."""
    defaults = {k: v for k, v in config.model.generation_defaults.items() if not k.startswith("_")}
    return SamplingParams(**defaults)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model
        self.tokenizer = load_tokenizer(mc.tokenizer, mc.tokenizer_mode) if mc.tokenizer else None
        self.runner = ModelRunner(config)
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_cuda_graphs()
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                 config.cache.hash_algo)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.outputs = OutputProcessor(self.tokenizer, config.scheduler.stream_interval)
        self.eos_token_ids = self._eos_ids()
        self._ids = itertools.count()
        self.in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None  # launched, not yet read
        self.last_finished: SchedulerOutput | None = None  # the step the last iteration waited for
        # Seeds for requests that bring none: random per request, reproducible per engine seed.
        self._seeds = random.Random(mc.seed)
        # Counters for metrics and tests.
        self.num_prompt_tokens_computed = 0
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.num_steps_run_ahead = 0  # steps finished while the next one was already queued
        self.num_late_samplings = 0  # steps whose sampling waited for the step before (sample())
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, config.cache.block_size,
                    num_blocks * self.runner.bytes_per_block() / 2**20)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = list(self.config.model.generation_defaults.get("_eos_token_ids", ()))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))

    # --- requests ---
    def default_sampling_params(self) -> SamplingParams:
        return default_sampling_params(self.config)

    def counters(self) -> EngineCounters:
        kv, sched = self.kv, self.scheduler
        return EngineCounters(len(sched.running), len(sched.waiting), kv.usage, kv.prefix_queries, kv.prefix_hits,
                              self.num_prompt_tokens_computed, self.num_generated_tokens, self.num_steps,
                              sched.num_preemptions)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        return tokenize_prompt(self.tokenizer, prompt)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (the engine runs with --skip-tokenizer-init)")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @functools.cached_property
    def grammars(self):
        """The grammar compiler of this tokenizer (made on first use: xgrammar loads slowly)."""
        from structured.compiler import GrammarCompilerService

        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer (the engine runs with --skip-tokenizer-init)")
        return GrammarCompilerService(self.tokenizer, self.config.model.vocab_size,
                                      config=self.config.structured_outputs, stop_token_ids=list(self.eos_token_ids))

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0, prompt_token_ids: list[int] | None = None, grammar=None,
                    arrival_time: float | None = None) -> list[Request]:
        """Validate and queue a request (n sequences for n > 1); ValueError for anything the
        engine cannot serve. Returns the queued sequences. `grammar` is the compiled grammar of
        params.structured_outputs when the caller compiled it already (off the event loop);
        `arrival_time` (time.monotonic()) when the request arrived elsewhere first (the API
        process of web/engine_process.py), else now."""
        params = self.default_sampling_params() if params is None else params
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self.outputs.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            text, prompt_token_ids = self.tokenize_prompt(prompt)
        else:
            text = prompt if isinstance(prompt, str) else None
        mc = self.config.model
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < mc.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids outside [0, {mc.vocab_size}): {bad[:5]}")
        params.validate_for_model(mc.vocab_size, mc.max_logprobs)
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise ValueError("stop strings and bad_words need a tokenizer (the engine runs with --skip-tokenizer-init)")
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(1, mc.max_model_len - len(prompt_token_ids)))
        bad_words_ids = self._bad_words_ids(params.bad_words or [])
        if params.structured_outputs is not None and grammar is None:
            grammar = self.grammars.compile_sync(params.structured_outputs)
        samples: list[Request] = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._seeds.getrandbits(62)
            share_prefix = i > 0 and self.config.cache.enable_prefix_caching
            samples.append(Request(
                request_id if params.n == 1 else f"{i}_{request_id}", prompt_token_ids, params, self.eos_token_ids,
                priority, arrival_time, seed=seed, bad_words_ids=bad_words_ids, index=i, parent_id=request_id,
                wait_for=samples[0] if share_prefix else None,
            ))
        if grammar is not None:
            from structured.matcher import RequestGrammar

            for sample in samples:
                sample.grammar = RequestGrammar(grammar)
        added: list[Request] = []
        try:
            for sample in samples:
                self.scheduler.add_request(sample)
                added.append(sample)
        except ValueError:
            for sample in added:
                self.scheduler.finish_request(sample.request_id, RequestStatus.FINISHED_ABORTED)
            raise
        self.outputs.add(samples, text)
        return samples

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as token ids, with and without a leading space (as vLLM bans them)."""
        if not words:
            return []
        ids: list[list[int]] = []
        for word in words:
            for variant in (word, " " + word.lstrip()):
                tokens = self.tokenizer(variant, add_special_tokens=False).input_ids
                if tokens and tokens not in ids:
                    ids.append(tokens)
        return ids

    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> RequestOutput | None:
        """End a request (all its samples) now and free its blocks; its final output, or None
        for unknown ids."""
        final = None
        for sample_id in self.outputs.sample_ids(request_id):
            request = self.scheduler.finish_request(sample_id, status)
            if request is not None:
                final = self.outputs.finish_external(request) or final
        return final

    @property
    def has_unfinished(self) -> bool:
        """Requests left, or a step in flight whose tokens someone still waits for."""
        if self.scheduler.has_unfinished:
            return True
        return self.in_flight is not None and any(not s.request.status.finished for s in self.in_flight[0].scheduled)

    # --- the step ---
    def schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        now = time.monotonic()
        for sched in out.scheduled:
            request = sched.request
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            if sched.start < request.num_prompt_tokens:
                prompt_tokens = min(sched.num_new_tokens, request.num_prompt_tokens - sched.start)
                out.num_prefill_tokens += prompt_tokens
                out.num_prefill_rows += 1
        self.num_prompt_tokens_computed += out.num_prefill_tokens
        return out

    def stage(self, out: SchedulerOutput) -> StagedStep:
        """Build the step's inputs on the host and upload them (nothing waits), feeding it the
        in-flight step's tokens from the GPU at enqueue()."""
        return self.runner.stage(out, self.in_flight[1] if self.in_flight else None)

    def enqueue(self, staged: StagedStep) -> LaunchedStep:
        """Queue the staged step on the GPU without waiting: the forward, and the sampling too
        unless it needs the step in flight finished first."""
        return self.runner.enqueue(staged)

    def sample(self, out: SchedulerOutput, launched: LaunchedStep) -> None:
        """Enqueue the sampling enqueue() left, from the requests' state after the step before."""
        self.num_late_samplings += 1
        self.runner.sample(out, launched)

    def finish_step(self, out: SchedulerOutput, result: StepResult,
                    then_sample: tuple[SchedulerOutput, LaunchedStep] | None = None) -> list[RequestOutput]:
        """Tokens -> requests -> outputs. `then_sample`: the launched step sampled next, whose
        bitmask (if it has constrained rows) starts filling once the grammars have advanced."""
        self.num_steps += 1
        # Grammars first, so that the next step's bitmask starts filling before the tokens are
        # appended: the fill is the longest part of a constrained step's host work. The bitmask's
        # worker takes the tokens (xgrammar's accept, then the fill, both without the GIL) while
        # this thread appends them; or, with no fill to start, they are accepted here, in one
        # call into xgrammar. A token that also ends its request (length, eos) is accepted too,
        # and that request's grammar then left alone.
        constrained = [(r, token) for sched, token in zip(out.scheduled, result.tokens)
                       if token is not None and (r := sched.request).live_grammar is not None]
        accept = ([r.grammar for r, _ in constrained], [token for _, token in constrained]) if constrained else None
        in_worker = then_sample is not None and self.runner.start_fill(*then_sample, accept=accept)
        accepted = None
        if constrained and not in_worker:
            from structured.matcher import accept_batch

            accepted = accept_batch(*accept)
        try:
            changed = self.scheduler.update_after_step(out, result.tokens, result.logprobs, result.prompt_logprobs)
        finally:  # the grammars book their tokens whatever happens (xgrammar has them)
            if in_worker:
                accepted = self.runner.bitmask.accepted()
        self.num_generated_tokens += len(changed)
        if constrained:
            self._end_by_grammar(constrained, accepted)
        return self.outputs.process(changed, self.scheduler.finish_request)

    def _end_by_grammar(self, constrained: list[tuple[Request, int]], accepted: list[bool]) -> None:
        """After the grammars took the step's tokens: a refused token fails its request, a complete
        output ends it ("stop"); requests the step ended otherwise are left as they are."""
        for (request, token), ok in zip(constrained, accepted):
            if request.status.finished:
                continue
            if not ok:
                logger.error("request %s: token %d breaks its grammar", request.request_id, token)
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ERROR)
            elif request.grammar.is_terminated:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)

    def phases(self) -> Generator[Callable[[], Any], Any, list[RequestOutput]]:
        """One iteration of the pipeline, for a driver to run: it yields each blocking call (the
        driver runs it, here or in a worker thread, and sends its result back) and returns the
        outputs. With async scheduling, step N in flight:

            schedule N+1     host
            stage N+1        host       inputs built and uploaded (non-blocking)
            sample N         blocking   only if N's sampling is late (see below): queued now
            enqueue N+1      blocking   forward N+1 queued behind N, its inputs N's ids on the GPU;
                                        its sampling too, unless a row samples from its tokens so far
            wait N           blocking   N's ids home (the one host sync)
            finish N         host       N's tokens handed to the bitmask's worker thread (the
                                        grammars accept them, then N+1's bitmask fills there)
                                        while they are appended here; stops, outputs

        A step whose rows sample from their tokens so far (grammars, penalties, min_tokens, bad
        words) leaves its sampling to the next iteration ("late"), after its step before is
        finished: so only the sampler waits for the host, and the late sampler N and forward N+1
        are queued back to back (the host's schedule and stage of N+1 come before them, while the
        GPU still runs forward N and the bitmask fills). Outputs come one step later. Without async
        scheduling nothing is in flight at the start, and N+1 is waited for and finished at once.
        """
        outputs: list[RequestOutput] = []
        out = self.schedule()
        staged = self.stage(out) if not out.empty else None
        if self.in_flight is not None and self.in_flight[1].needs_sampling:
            yield functools.partial(self.sample, *self.in_flight)
        launched = (yield functools.partial(self.enqueue, staged)) if staged is not None else None
        if self.in_flight is not None:
            if launched is not None:
                self.num_steps_run_ahead += 1
            then_sample = (out, launched) if launched is not None and launched.needs_sampling else None
            outputs += yield from self._finish_phases(then_sample)
        if launched is not None:
            self.in_flight = (out, launched)
            if not self.config.scheduler.async_scheduling:
                outputs += yield from self._finish_phases()
        return outputs

    def _finish_phases(self, then_sample=None) -> Generator[Callable[[], Any], Any, list[RequestOutput]]:
        """Wait for the step in flight (sampled first if its sampling is late; blocking calls) and
        finish it (see finish_step)."""
        out, launched = self.in_flight
        if launched.needs_sampling:
            yield functools.partial(self.sample, out, launched)
        self.in_flight = None
        self.last_finished = out
        result = yield functools.partial(self.runner.wait, launched)
        return self.finish_step(out, result, then_sample)

    def step(self) -> list[RequestOutput]:
        """One iteration, its blocking calls run in this thread (the offline LLM); see phases()."""
        return run_phases(self.phases())

    def _finish_in_flight(self) -> list[RequestOutput]:
        """Wait for the step in flight in this thread and finish it."""
        return run_phases(self._finish_phases())

    def fail_all(self) -> list[str]:
        """After an error in a step: finish every request and free its blocks; their ids."""
        self.in_flight = None
        ids = list(self.outputs.parents)
        for request_id in ids:
            self.abort(request_id, RequestStatus.FINISHED_ERROR)
        for request_id in list(self.scheduler.requests):  # sequences without an output state
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ERROR)
        return ids


def run_phases(phases: Generator[Callable[[], Any], Any, Any]) -> Any:
    """Drive EngineCore.phases() (or a part of it) in this thread: each blocking call runs in place."""
    try:
        call = next(phases)
        while True:
            call = phases.send(call())
    except StopIteration as done:
        return done.value
