"""OutputProcessor: new token ids -> text, stop strings, and RequestOutputs at the stream interval.

One RequestState per request holds its detokenizer and what has been emitted. Stop strings are
found here (they need text); the engine then finishes the request in the scheduler.
"""

from __future__ import annotations

import time

from sampling.params import RequestOutputKind

from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .request import Request, RequestStatus
from .tokenizer import IncrementalDetokenizer


class RequestState:
    def __init__(self, request: Request, prompt: str | None, tokenizer, stream_interval: int) -> None:
        params = request.sampling_params
        self.request = request
        self.prompt = prompt
        self.kind = params.output_kind
        self.stream_interval = stream_interval
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
        # released ids just before them as decoding context: flushed when the request finishes.
        self.held_ids: list[int] = []
        self.context_ids: list[int] = list(request.prompt_token_ids[-6:])
        self.num_tokens_seen = 0
        self.sent_text = 0  # chars of text already emitted (for DELTA)
        self.sent_tokens = 0
        self.metrics = RequestMetrics(arrival_time=request.arrival_time)

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

    def make_output(self, finished: bool) -> RequestOutput | None:
        """The output due now, or None if the stream interval has not been reached."""
        request = self.request
        new_tokens = self.num_tokens_seen - self.sent_tokens
        if not finished:
            if self.kind == RequestOutputKind.FINAL_ONLY or new_tokens < self.stream_interval:
                return None
        visible = len(self.text) if finished else max(self.sent_text, len(self.text) - self.holdback)
        output_ids = request.output_token_ids
        if self.kind == RequestOutputKind.DELTA:
            text = self.text[self.sent_text:visible]
            token_ids = output_ids[self.sent_tokens:]
        else:
            text = self.text[:visible]
            token_ids = list(output_ids)
        self.sent_text, self.sent_tokens = visible, self.num_tokens_seen
        now = time.monotonic()
        if self.metrics.first_token_time is None and output_ids:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        if finished:
            self.metrics.finished_time = now
        completion = CompletionOutput(
            index=0, text=text, token_ids=token_ids,
            finish_reason=request.status.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None,
        )
        return RequestOutput(
            request_id=request.request_id, prompt=self.prompt, prompt_token_ids=request.prompt_token_ids,
            outputs=[completion], finished=finished, num_cached_tokens=max(request.num_cached_tokens, 0),
            metrics=self.metrics,
        )


class OutputProcessor:
    def __init__(self, tokenizer, stream_interval: int) -> None:
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.states: dict[str, RequestState] = {}

    def add(self, request: Request, prompt: str | None) -> None:
        self.states[request.request_id] = RequestState(request, prompt, self.tokenizer, self.stream_interval)

    def process(self, changed: list[Request], finish) -> list[RequestOutput]:
        """Detokenize the step's new tokens; `finish(request_id, status)` ends stop-string matches."""
        outputs: list[RequestOutput] = []
        for request in changed:
            state = self.states.get(request.request_id)
            if state is None:
                continue
            new = request.num_output_tokens - state.num_tokens_seen
            stop = state.add_tokens(request.output_token_ids[-new:], request.status.finished) if new > 0 else None
            if stop is not None and not request.status.finished:
                request.stop_reason = stop
                finish(request.request_id, RequestStatus.FINISHED_STOPPED)
            elif stop is not None:  # the same token also hit eos/length: the stop string wins
                request.stop_reason = stop
                request.status = RequestStatus.FINISHED_STOPPED
            finished = request.status.finished
            out = state.make_output(finished)
            if out is not None:
                outputs.append(out)
            if finished:
                del self.states[request.request_id]
        return outputs

    def finish_external(self, request: Request) -> RequestOutput | None:
        """Final output for a request ended from outside the step (abort, error)."""
        state = self.states.pop(request.request_id, None)
        if state is None:
            return None
        state.add_tokens([], final=True)
        return state.make_output(True)
