"""OutputProcessor: new token ids -> text, stop strings, logprobs, and RequestOutputs at the
stream interval.

One SampleState per sequence (a request with n > 1 has n of them) holds its detokenizer and what
it has emitted; one ParentState per request gathers its samples into RequestOutputs. Stop strings
are found here (they need text); the engine then finishes the sequence in the scheduler.
"""

from __future__ import annotations

import time

from sampling.params import RequestOutputKind

from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .request import Request, RequestStatus
from .tokenizer import IncrementalDetokenizer


class SampleState:
    def __init__(self, request: Request, tokenizer) -> None:
        params = request.sampling_params
        self.request = request
        self.tokenizer = tokenizer
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens,
                                   params.spaces_between_special_tokens)
            if tokenizer is not None and params.detokenize else None
        )
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        # Text that could still turn out to start a stop string is held back while streaming.
        self.holdback = 0 if self.include_stop or not self.stop else max(len(s) for s in self.stop) - 1
        self.text = ""
        # Ids whose text the detokenizer still holds back (an incomplete character), and the
        # released ids just before them as decoding context: flushed when the sequence finishes.
        self.held_ids: list[int] = []
        self.context_ids: list[int] = list(request.prompt_token_ids[-6:])
        self.num_tokens_seen = 0
        self.sent_text = 0  # chars of text already emitted (for DELTA)
        self.sent_tokens = 0
        self.final_sent = False

    def add_tokens(self, token_ids: list[int], final: bool = False) -> str | None:
        """Detokenize new tokens (and, if final, what is held back); return the stop string that
        matched, if any (text is cut there)."""
        self.num_tokens_seen += len(token_ids)
        if self.detokenizer is None:
            return None
        before = len(self.text)
        for token in token_ids:
            piece = self.detokenizer.step(token)
            self.held_ids.append(token)
            if piece:
                self.text += piece
                self.context_ids = (self.context_ids + self.held_ids)[-6:]
                self.held_ids = []
        if final:
            self.text += self._flush()
        if not self.stop or len(self.text) == before:
            return None
        longest = max(len(s) for s in self.stop)
        search_from = max(0, before - longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def _flush(self) -> str:
        """The held-back tail as a one-shot decode shows it (a cut character becomes U+FFFD)."""
        if not self.held_ids:
            return ""
        tokenizer, held, context = self.detokenizer.tokenizer, self.held_ids, self.context_ids
        self.held_ids = []
        kw = {"skip_special_tokens": self.request.sampling_params.skip_special_tokens,
              "clean_up_tokenization_spaces": False}
        prefix, full = tokenizer.decode(context, **kw), tokenizer.decode(context + held, **kw)
        return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(held, **kw)

    def due(self, stream_interval: int, kind: RequestOutputKind) -> bool:
        if self.request.status.finished:
            return not self.final_sent
        return kind != RequestOutputKind.FINAL_ONLY and self.num_tokens_seen - self.sent_tokens >= stream_interval

    def completion(self, kind: RequestOutputKind) -> CompletionOutput:
        """Everything so far (CUMULATIVE, FINAL_ONLY) or what is new since the last call (DELTA)."""
        request = self.request
        finished = request.status.finished
        visible = len(self.text) if finished else max(self.sent_text, len(self.text) - self.holdback)
        delta = kind == RequestOutputKind.DELTA
        start_text, start_tok = (self.sent_text, self.sent_tokens) if delta else (0, 0)
        output_ids = request.output_token_ids
        completion = CompletionOutput(
            index=request.index, text=self.text[start_text:visible], token_ids=output_ids[start_tok:self.num_tokens_seen],
            finish_reason=request.status.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None,
        )
        if request.sampling_params.logprobs is not None:
            completion.logprobs = [self._logprob_dict(e) for e in request.logprobs[start_tok:self.num_tokens_seen]]
            completion.cumulative_logprob = request.cumulative_logprob
        self.sent_text, self.sent_tokens = visible, self.num_tokens_seen
        self.final_sent = finished
        return completion

    def _logprob_dict(self, entry: tuple[list[int], list[float], int]) -> dict[int, Logprob]:
        ids, values, rank = entry
        return logprob_dict(ids, values, rank, self.tokenizer)


def logprob_dict(ids: list[int], values: list[float], rank: int, tokenizer) -> dict[int, Logprob]:
    """ids[0] is the chosen token (rank given), then the top tokens in order (ranks 1..N)."""
    def decode(token: int) -> str | None:
        return tokenizer.decode([token]) if tokenizer is not None else None

    result = {ids[0]: Logprob(values[0], rank, decode(ids[0]))}
    for i, (token, value) in enumerate(zip(ids[1:], values[1:]), start=1):
        result.setdefault(token, Logprob(value, i, decode(token)))
    return result


class ParentState:
    """One request as its caller sees it: n samples gathered into RequestOutputs."""

    def __init__(self, samples: list[Request], prompt: str | None, tokenizer, stream_interval: int) -> None:
        first = samples[0]
        self.request_id = first.parent_id
        self.prompt = prompt
        self.prompt_token_ids = first.prompt_token_ids
        self.kind = first.sampling_params.output_kind
        self.stream_interval = stream_interval
        self.tokenizer = tokenizer
        self.samples = [SampleState(r, tokenizer) for r in samples]
        self.metrics = RequestMetrics(arrival_time=first.arrival_time)
        self.prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        samples = self.samples
        if len(samples) == 1:  # the common case, once per request per step: no generator
            return samples[0].request.status.finished
        return all(s.request.status.finished for s in samples)

    def make_output(self) -> RequestOutput | None:
        """The output due now, or None (stream interval not reached; FINAL_ONLY before the end)."""
        finished = self.finished
        if self.kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        due = [s for s in self.samples if s.due(self.stream_interval, self.kind)]
        if not due:
            return None
        chosen = due if self.kind == RequestOutputKind.DELTA else self.samples
        outputs = [s.completion(self.kind) for s in chosen]
        now = time.monotonic()
        if self.metrics.first_token_time is None and any(o.token_ids for o in outputs):
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        if finished:
            self.metrics.finished_time = now
        first = self.samples[0].request
        self.metrics.first_scheduled_time = first.first_scheduled_time
        out = RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids, outputs=outputs,
            finished=finished, num_cached_tokens=max(first.num_cached_tokens, 0), metrics=self.metrics,
        )
        if first.sampling_params.prompt_logprobs is not None and (not self.prompt_logprobs_sent or self.kind != RequestOutputKind.DELTA):
            out.prompt_logprobs = [None] + [logprob_dict(*e, self.tokenizer) for e in first.prompt_logprobs]
            self.prompt_logprobs_sent = True
        return out


class OutputProcessor:
    def __init__(self, tokenizer, stream_interval: int) -> None:
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.parents: dict[str, ParentState] = {}
        self.sample_of: dict[str, tuple[ParentState, SampleState]] = {}

    def add(self, samples: list[Request], prompt: str | None) -> None:
        parent = ParentState(samples, prompt, self.tokenizer, self.stream_interval)
        self.parents[parent.request_id] = parent
        for state in parent.samples:
            self.sample_of[state.request.request_id] = (parent, state)

    def sample_ids(self, request_id: str) -> list[str]:
        """The sequence ids behind a request id (itself when n == 1)."""
        parent = self.parents.get(request_id)
        return [s.request.request_id for s in parent.samples] if parent else [request_id]

    def process(self, changed: list[Request], finish) -> list[RequestOutput]:
        """Detokenize the step's new tokens; `finish(request_id, status)` ends stop-string matches."""
        touched: dict[str, ParentState] = {}
        for request in changed:
            entry = self.sample_of.get(request.request_id)
            if entry is None:
                continue
            parent, state = entry
            new = request.num_output_tokens - state.num_tokens_seen
            stop = state.add_tokens(request.output_token_ids[-new:], request.status.finished) if new > 0 else None
            if stop is not None and not request.status.finished:
                request.stop_reason = stop
                finish(request.request_id, RequestStatus.FINISHED_STOPPED)
            elif stop is not None:  # the same token also hit eos/length: the stop string wins
                request.stop_reason = stop
                request.status = RequestStatus.FINISHED_STOPPED
            touched[parent.request_id] = parent
        return [out for parent in touched.values() if (out := self._emit(parent)) is not None]

    def finish_external(self, request: Request) -> RequestOutput | None:
        """Output for a sequence ended from outside the step (abort, error)."""
        entry = self.sample_of.get(request.request_id)
        if entry is None:
            return None
        parent, state = entry
        state.add_tokens([], final=True)
        return self._emit(parent)

    def _emit(self, parent: ParentState) -> RequestOutput | None:
        out = parent.make_output()
        if out is not None and out.finished:
            del self.parents[parent.request_id]
            for s in parent.samples:
                self.sample_of.pop(s.request.request_id, None)
        return out
