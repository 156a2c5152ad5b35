"""Scheduler: continuous batching with chunked prefill, decode first, preemption by recompute.

Each step it decides how many new tokens every request computes (a decode: 1; a prefill: a chunk
within the token budget) and admits waiting requests while blocks and max_num_seqs allow. It never
touches tensors: the runner turns a SchedulerOutput into a flat batch.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from .config import SchedulerConfig
from .kv_cache import KVCacheManager
from .request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    samples: bool  # this chunk reaches the end of the tokens, so its last logits are sampled
    start: int = 0  # position of the chunk's first token (num_computed_tokens before this step)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    num_prefill_tokens: int = 0  # prompt tokens among num_tokens (EngineCore.schedule counts them)
    num_prefill_rows: int = 0

    @property
    def empty(self) -> bool:
        return not self.scheduled


class WaitingQueue:
    """FCFS deque or priority heap, behind one small interface."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[tuple[int, float], int, Request]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._fifo) if self.policy == "fcfs" else len(self._heap)

    def __iter__(self):
        return iter(self._fifo) if self.policy == "fcfs" else iter(r for _, _, r in sorted(self._heap))

    def push(self, request: Request, front: bool = False) -> None:
        if self.policy == "fcfs":
            (self._fifo.appendleft if front else self._fifo.append)(request)
        else:
            heapq.heappush(self._heap, (request.sort_key(), next(self._counter), request))

    def peek(self) -> Request:
        return self._fifo[0] if self.policy == "fcfs" else self._heap[0][2]

    def pop(self) -> Request:
        return self._fifo.popleft() if self.policy == "fcfs" else heapq.heappop(self._heap)[2]

    def remove(self, request: Request) -> None:
        if self.policy == "fcfs":
            self._fifo.remove(request)
        else:
            self._heap = [item for item in self._heap if item[2] is not request]
            heapq.heapify(self._heap)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting = WaitingQueue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # A request this long ends by length, whatever its max_tokens: max_model_len, or the
        # cache's size (past it, it could never fit even alone: it would preempt itself forever).
        self.max_len = min(config.max_model_len, kv.num_blocks * kv.block_size)

    # --- requests in and out ---
    def add_request(self, request: Request) -> None:
        """Queue a request; refuse one that could never be scheduled."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        limit = self.config.max_model_len
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        if request.num_prompt_tokens >= limit:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens; with at least one output token it needs "
                f"more than max_model_len ({limit})"
            )
        if self.kv.blocks_needed(request.num_prompt_tokens + 1) > self.kv.num_blocks:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens, more than the whole KV cache holds "
                f"({self.kv.num_blocks} blocks of {self.kv.block_size})"
            )
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Stop a request (abort, stop string, error) and free its blocks. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif not request.status.finished:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        return request

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # --- the step ---
    def _preempt_one(self) -> Request:
        """Free the blocks of the request that should yield (newest, or lowest priority)."""
        if self.config.policy == "priority":
            victim = max(self.running, key=lambda r: r.sort_key())
        else:
            victim = self.running[-1]
        self.running.remove(victim)
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(victim, front=True)
        return victim

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        max_model_len = self.config.max_model_len
        running_status = RequestStatus.RUNNING  # hoisted: a member lookup on the enum class costs ~75 ns
        running, scheduled, allocate = self.running, out.scheduled, self.kv.allocate  # read per row

        # 1. Running requests first (decodes and unfinished prefill chunks), oldest first.
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            num_tokens = request.num_tokens + request.num_pending  # its length once the tokens on their way arrive
            if request.num_pending and (num_tokens >= request.max_num_tokens or num_tokens >= max_model_len):
                i += 1  # its last token (max_tokens / max_model_len) is still on the GPU; it ends when that arrives
                continue
            num_new = min(num_tokens - request.num_computed_tokens, budget)
            while not allocate(request, num_new):
                victim = self._preempt_one()
                out.preempted.append(victim)
                if victim is request:
                    break
                for j, sched in enumerate(scheduled):  # a request scheduled earlier this step yielded
                    if sched.request is victim:
                        del scheduled[j]
                        budget += sched.num_new_tokens
                        if sched.samples:  # its pending token, counted below when scheduled, will not come
                            victim.num_pending -= 1
                        i -= 1
                        break
            if request.status != running_status:
                continue  # it preempted itself, and was the last in self.running
            start = request.num_computed_tokens
            samples = start + num_new == num_tokens
            scheduled.append(ScheduledRequest(request, num_new, samples, start))
            # The step will compute these tokens: count them now, so that the next step can be
            # scheduled before this one's sampled tokens reach the host (async scheduling).
            request.num_computed_tokens = start + num_new
            if samples:
                request.num_pending += 1
            budget -= num_new
            i += 1

        # 2. Admit waiting requests while budget, seats and blocks allow (none if anyone was preempted).
        while len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            request = self.waiting.peek()
            if request.num_pending:
                break  # preempted with a token still on the GPU: after that token arrives
            first = request.wait_for
            if first is not None and not first.status.finished and first.num_output_tokens == 0:
                break  # a later sample of an n > 1 request: its prompt comes from the prefix cache once cached
            cached = self.kv.find_cached_prefix(request)
            num_cached = len(cached) * self.kv.block_size
            remaining = request.num_tokens - num_cached
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.kv.allocate(request, num_new, cached):
                break
            self.waiting.pop()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                self.kv.record_prefix_lookup(request.num_tokens, num_cached)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            samples = num_cached + num_new == request.num_tokens
            scheduled.append(ScheduledRequest(request, num_new, samples, num_cached))
            request.num_computed_tokens = num_cached + num_new  # counted now, as above
            if samples:
                request.num_pending += 1
            budget -= num_new
        out.num_tokens = self.config.max_num_batched_tokens - budget  # every token scheduled came out of the budget
        return out

    def update_after_step(self, out: SchedulerOutput, tokens: list[int | None], logprobs: list | None = None,
                          prompt_logprobs: dict | None = None) -> list[Request]:
        """Append the step's sampled tokens (and logprobs), finish by eos / stop ids / length.
        Returns the requests that got a new token (finished ones included, already freed)."""
        changed: list[Request] = []
        block_size = self.kv.block_size
        max_len = self.max_len
        # Hoisted: a member lookup on the enum class costs ~75 ns.
        running_status, preempted_status = RequestStatus.RUNNING, RequestStatus.PREEMPTED
        for i, (sched, token) in enumerate(zip(out.scheduled, tokens)):
            request = sched.request
            status = request.status
            if status > preempted_status:
                continue  # finished (aborted or stopped) while the step ran: its token is dropped
            # (a block filled up since the last registration: most decode steps fill none)
            computed = request.num_computed_tokens
            if status == running_status and computed >= (request.num_hashed_blocks + 1) * block_size:
                self.kv.cache_full_blocks(request, computed)
            if prompt_logprobs and i in prompt_logprobs:
                request.prompt_logprobs.extend(prompt_logprobs[i])
            if token is None:
                continue
            # A preempted request keeps its token too: it recomputes with it when readmitted.
            request.num_pending -= 1
            request.append_token(token)
            if logprobs is not None and logprobs[i] is not None:
                request.logprobs.append(logprobs[i])
                request.cumulative_logprob += logprobs[i][1][0]
            # Most tokens end nothing: one set lookup and two comparisons rule that out first.
            num_tokens = request.num_tokens
            if token in request.stop_ids or num_tokens >= request.max_num_tokens or num_tokens >= max_len:
                status = self._check_stop(request, token)
                if status is not None:
                    self.finish_request(request.request_id, status)
            changed.append(request)
        return changed

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        """How the new token ends the request, if it does (update_after_step calls this only for a
        token in request.stop_ids or a length at one of the limits)."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_tokens >= request.max_num_tokens or request.num_tokens >= self.max_len:
            return RequestStatus.FINISHED_LENGTH  # max_tokens, max_model_len or the cache's size
        return None
