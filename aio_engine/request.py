"""Request: one sequence's state as the scheduler and the KV-cache manager see it."""

from __future__ import annotations

import enum
import sys
import time

from sampling.params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Finished states come last: status > PREEMPTED means finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        # A module global: looking a member up on the enum class costs ~75 ns on Python 3.11,
        # several times the comparison, and this is read per request per step.
        return self > _PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_PREEMPTED = RequestStatus.PREEMPTED
_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}


class Request:
    """Tokens and progress of one sequence. `num_computed_tokens` counts tokens whose KV is cached."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), priority: int = 0, arrival_time: float | None = None,
                 seed: int = 0, bad_words_ids: list[list[int]] | None = None, index: int = 0,
                 parent_id: str | None = None, wait_for: Request | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []  # the tail of all_token_ids, kept apart so reading it copies nothing
        # len(all_token_ids) and len(output_token_ids), kept by append_token (the only writer of
        # either list): plain attributes, as they are read several times per request per step.
        self.num_tokens = self.num_prompt_tokens
        self.num_output_tokens = 0
        self.num_computed_tokens = 0  # tokens whose KV is written (or being written by the step in flight)
        self.num_pending = 0  # sampled on the GPU, not yet appended: async scheduling runs one step ahead
        self.num_cached_tokens = -1  # prompt tokens found in the prefix cache at first admission
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # What can end it, for a cheap test per token: a token outside stop_ids, at a length below
        # max_num_tokens (prompt + max_tokens) and the scheduler's own limits, ends nothing.
        self.stop_ids = frozenset(sampling_params.stop_token_ids).union(
            () if sampling_params.ignore_eos else eos_token_ids)
        max_tokens = sampling_params.max_tokens
        self.max_num_tokens = self.num_prompt_tokens + max_tokens if max_tokens is not None else sys.maxsize
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        # Sampling: the seed of this request's random stream (the step is its output length).
        self.seed = seed
        self.bad_words_ids = bad_words_ids or []
        # Logprobs as the runner returns them: per output token (ids, values, sampled rank).
        self.logprobs: list[tuple[list[int], list[float], int]] = []
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list = []
        # n > 1: this is sample `index` of parent `parent_id`; samples after the first wait for
        # the first's prompt to be computed, so that they find it in the prefix cache.
        self.index = index
        self.parent_id = parent_id or request_id
        self.wait_for = wait_for
        self.grammar = None  # structured.RequestGrammar when the output is constrained
        self.sampling_row = None  # sampling.metadata.SamplingRow: the runner's, made once, kept across steps
        # Filled by the KV-cache manager.
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_hashed_blocks = 0  # leading blocks of block_ids registered in the prefix cache

    @property
    def live_grammar(self):
        """The grammar the next token is drawn under: None unconstrained, or once finished (a
        finished request's token is dropped and its grammar left alone)."""
        return self.grammar if not self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.num_tokens += 1
        self.num_output_tokens += 1

    def banned_token_ids(self) -> list[int]:
        """Tokens this request may not sample next: stop tokens before min_tokens, bad-word endings."""
        params = self.sampling_params
        if not self.bad_words_ids and self.num_output_tokens >= params.min_tokens:
            return []  # the usual case, per sampling row per step
        banned: list[int] = []
        # A complete grammar allows only stops. Its matcher is asked only before min_tokens: the
        # runner waits for the bitmask's fill (which moves the matcher) only then.
        if self.num_output_tokens < params.min_tokens and not (self.grammar is not None and self.grammar.is_completed):
            if not params.ignore_eos:
                banned.extend(self.eos_token_ids)
            banned.extend(params.stop_token_ids)
        for word in self.bad_words_ids:
            prefix = word[:-1]
            if not prefix or self.all_token_ids[len(self.all_token_ids) - len(prefix):] == prefix:
                banned.append(word[-1])
        return banned

    def sort_key(self) -> tuple[int, float]:
        """Order under the priority policy: lower priority value first, then arrival."""
        return (self.priority, self.arrival_time)
