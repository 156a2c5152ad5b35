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

# Enum members as globals: a member lookup on the enum class costs ~75 ns on Python 3.11, and
# these are compared per sequence per step.
_FINAL_ONLY, _DELTA = RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA
_PREEMPTED, _FINISHED_STOPPED = RequestStatus.PREEMPTED, RequestStatus.FINISHED_STOPPED


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
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.holdback = 0 if self.include_stop or not self.stop else self.longest_stop - 1
        self.text = ""
        self.num_tokens_seen = 0  # output tokens given to add_tokens
        # Output tokens whose text is in self.text; the detokenizer holds back the text of those
        # after them (an incomplete character), flushed when the sequence finishes.
        self.num_tokens_released = 0
        self.sent_text = 0  # chars of text already emitted (for DELTA)
        self.sent_tokens = 0
        self.final_sent = False

    def add_tokens(self, num_new: int, final: bool = False) -> str | None:
        """Detokenize the request's next num_new output tokens (and, if final, what is held back);
        return the stop string that matched, if any (text is cut there)."""
        seen = self.num_tokens_seen
        self.num_tokens_seen = seen + num_new
        if self.detokenizer is None:
            return None
        if final and seen == 0:  # the whole output at once (final outputs only): one decode
            self.text = self._decode_from(0, self.detokenizer.context)
            self.num_tokens_released = num_new
            return self._find_stop(0)
        # Grown in a local that holds the only reference: CPython then extends the string in
        # place, where `self.text += piece` would copy the whole text every step.
        text, self.text = self.text, ""
        before = len(text)
        output_ids = self.request.output_token_ids
        for i in range(seen, seen + num_new):
            piece = self.detokenizer.step(output_ids[i])
            if piece:
                text += piece
                self.num_tokens_released = i + 1
        if final:
            text += self._flush()
        self.text = text
        return self._find_stop(before)

    def _find_stop(self, before: int) -> str | None:
        """The first stop string in the text past its first `before` chars (seen before): the
        text is cut there."""
        if not self.stop or len(self.text) == before:
            return None
        search_from = max(0, before - self.longest_stop + 1)
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
        if self.num_tokens_released == self.num_tokens_seen:
            return ""
        # Decoded after the six tokens before it (prompt or released output) as context.
        start = self.request.num_prompt_tokens + self.num_tokens_released
        text = self._decode_from(self.num_tokens_released, self.request.all_token_ids[max(0, start - 6):start])
        self.num_tokens_released = self.num_tokens_seen
        return text

    def _decode_from(self, first: int, context) -> str:
        """The text of output tokens first..num_tokens_seen, decoded in one call after `context`
        (token ids) as an incremental decode reads them (the tokenizer's decode of context + tokens,
        less that of the context)."""
        ids = self.request.output_token_ids[first:self.num_tokens_seen]
        tokenizer, kw = self.detokenizer.tokenizer, self.detokenizer.decode_kwargs
        context = list(context)
        prefix, full = tokenizer.decode(context, **kw), tokenizer.decode(context + ids, **kw)
        return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(ids, **kw)

    def due(self, stream_interval: int, kind: RequestOutputKind) -> bool:
        if self.request.status > _PREEMPTED:  # finished
            return not self.final_sent
        return kind is not _FINAL_ONLY and self.num_tokens_seen - self.sent_tokens >= stream_interval

    def completion(self, kind: RequestOutputKind) -> CompletionOutput:
        """Everything so far (CUMULATIVE, FINAL_ONLY) or what is new since the last call (DELTA)."""
        request = self.request
        finished = request.status > _PREEMPTED
        visible = len(self.text) if finished else max(self.sent_text, len(self.text) - self.holdback)
        delta = kind is _DELTA
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
        kind, samples = self.kind, self.samples
        if kind is _FINAL_ONLY and not finished:
            return None
        if len(samples) == 1:  # the common case, per request per step when streaming: no lists to filter
            if not samples[0].due(self.stream_interval, kind):
                return None
            outputs = [samples[0].completion(kind)]
        else:
            due = [s for s in samples if s.due(self.stream_interval, kind)]
            if not due:
                return None
            outputs = [s.completion(kind) for s in (due if kind is _DELTA else samples)]
        now = time.monotonic()
        metrics = self.metrics
        if metrics.first_token_time is None and any(o.token_ids for o in outputs):
            metrics.first_token_time = now
        metrics.last_token_time = now
        if finished:
            metrics.finished_time = now
        first = samples[0].request
        metrics.first_scheduled_time = first.first_scheduled_time
        out = RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids, outputs=outputs,
            finished=finished, num_cached_tokens=max(first.num_cached_tokens, 0), metrics=metrics,
        )
        if first.sampling_params.prompt_logprobs is not None and (not self.prompt_logprobs_sent or kind is not _DELTA):
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
        stream_interval = self.stream_interval
        for request in changed:
            entry = self.sample_of.get(request.request_id)
            if entry is None:
                continue
            parent, state = entry
            new = request.num_output_tokens - state.num_tokens_seen
            finished = request.status > _PREEMPTED
            if new > 0 and (finished or state.stop or parent.kind is not _FINAL_ONLY):
                # Final outputs without stop strings are decoded once, at the end (add_tokens).
                stop = state.add_tokens(new, finished)
                if stop is not None:
                    request.stop_reason = stop
                    if finished:  # the same token also hit eos/length: the stop string wins
                        request.status = _FINISHED_STOPPED
                    else:
                        finish(request.request_id, _FINISHED_STOPPED)
            if len(parent.samples) == 1 and not state.due(stream_interval, parent.kind):
                continue  # no output due (stream interval not reached, FINAL_ONLY before the end)
            touched[parent.request_id] = parent
        return [out for parent in touched.values() if (out := self._emit(parent)) is not None]

    def finish_external(self, request: Request) -> RequestOutput | None:
        """Output for a sequence ended from outside the step (abort, error)."""
        entry = self.sample_of.get(request.request_id)
        if entry is None:
            return None
        parent, state = entry
        state.add_tokens(request.num_output_tokens - state.num_tokens_seen, final=True)
        return self._emit(parent)

    def _emit(self, parent: ParentState) -> RequestOutput | None:
        out = parent.make_output()
        if out is not None and out.finished:
            del self.parents[parent.request_id]
            for s in parent.samples:
                self.sample_of.pop(s.request.request_id, None)
        return out
