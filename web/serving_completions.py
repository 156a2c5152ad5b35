"""POST /v1/completions as a Job: prompts (text, ids, lists of either) -> text_completion bodies.

Choice i*n + k is sample k of prompt i. `echo` puts the prompt (and, with logprobs, the prompt's
logprobs) before the generated text; `echo` with max_tokens 0 returns the prompt alone and runs
nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from . import protocol
from .errors import RequestError
from .protocol import expect
from .responses import completion_logprobs, merge_completion_logprobs
from .serving import ChoiceBuffer, Generation, Job


class CompletionJob(Job):
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    async def prepare(self) -> None:
        body, ctx = self.body, self.ctx
        self._common()
        fields = protocol.sampling_fields(body, ctx.generation_defaults, chat=False, stream=self.stream)
        ctx.check_n(fields["n"])
        structured = protocol.structured_outputs(body)
        await self.check_grammar(structured, protocol.structured_param(body))
        self.echo = expect(body, "echo", bool, False)
        if expect(body, "suffix", str):
            raise RequestError("'suffix' is not supported", param="suffix")
        add_special = expect(body, "add_special_tokens", bool, True)
        truncate = expect(body, "truncate_prompt_tokens", int)
        requested = protocol.requested_max_tokens(body, chat=False)
        self.n = fields["n"]
        self.num_top = fields["logprobs"]
        self.prompts: list[tuple[str, list[int]]] = []
        for prompt in protocol.completion_prompts(body):
            ids = await ctx.tokenize(prompt, add_special) if isinstance(prompt, str) else prompt
            if truncate is not None and truncate > 0:
                ids = ids[-truncate:]
            text = prompt if isinstance(prompt, str) and truncate is None else (
                ctx.tokenizer.decode(ids) if ctx.tokenizer is not None and self.echo else None)
            self.prompts.append((text, ids))
        self.prompt_tokens = sum(len(ids) for _, ids in self.prompts)
        self.choices = [ChoiceBuffer(i, self.num_top is not None) for i in range(len(self.prompts) * self.n)]
        self._echo_pending = [self.echo] * len(self.choices)
        self._prompt_logprobs: list[list | None] = [None] * len(self.prompts)
        if self.echo and requested == 0:  # the prompt alone: nothing to generate
            for i, choice in enumerate(self.choices):
                choice.finish_reason = "length"
                self._echo(i)
            return
        inputs = []
        for text, ids in self.prompts:
            params = protocol.make_params(fields, requested, len(ids), ctx.max_model_len,
                                          ctx.generation_defaults.get("max_tokens"), structured)
            inputs.append(({"prompt": text, "prompt_token_ids": ids} if text is not None else
                           {"prompt_token_ids": ids}, params))
        self.generation = Generation(ctx, inputs, self.priority)

    def _echo(self, i: int) -> None:
        """Put prompt i // n in front of choice i, once."""
        if not self._echo_pending[i]:
            return
        self._echo_pending[i] = False
        text, ids = self.prompts[i // self.n]
        self.choices[i].prepend(text or "", list(ids), self._prompt_logprobs[i // self.n])

    def _take(self, choice: ChoiceBuffer, offset: int) -> dict:
        text, ids, entries = choice.take()
        logprobs = None
        if self.num_top is not None:
            logprobs = completion_logprobs(ids, entries, self.num_top, self.namer, offset)
        return {"index": choice.index, "text": text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}

    def _add(self, prompt_index: int, out) -> list[ChoiceBuffer]:
        """Fold one engine output into its choices; the choices it touched."""
        if out.prompt_logprobs is not None:
            self._prompt_logprobs[prompt_index] = out.prompt_logprobs
        if out.finished:
            self.cached_tokens += out.num_cached_tokens
        touched = []
        for c in out.outputs:
            i = prompt_index * self.n + c.index
            self._echo(i)
            self.choices[i].add(c)
            touched.append(self.choices[i])
        return touched

    async def chunks(self) -> AsyncIterator[dict]:
        interval = self.options.stream_interval
        offsets = [0] * len(self.choices)  # text sent so far per choice (logprobs' text_offset)
        if self.generation is None:  # echo only
            for choice in self.choices:
                yield self.with_usage({**self.head(True), "choices": [self._take(choice, 0)]})
        else:
            async for prompt_index, out in self.generation:
                for choice in self._add(prompt_index, out):
                    if choice.due(interval):
                        body = self._take(choice, offsets[choice.index])
                        offsets[choice.index] += len(body["text"])
                        yield self.with_usage({**self.head(True), "choices": [body]})
        if self.options.include_usage:
            yield self.usage_chunk()

    async def result(self) -> dict:
        bodies: dict[int, dict] = {}
        if self.generation is None:
            bodies = {c.index: self._take(c, 0) for c in self.choices}
        else:
            async for prompt_index, out in self.generation:
                for choice in self._add(prompt_index, out):
                    body = self._take(choice, len(bodies[choice.index]["text"]) if choice.index in bodies else 0)
                    if choice.index in bodies:  # several outputs for one choice: join them
                        prev = bodies[choice.index]
                        body["logprobs"] = merge_completion_logprobs(prev["logprobs"], body["logprobs"])
                        body["text"] = prev["text"] + body["text"]
                    bodies[choice.index] = body
        return {**self.head(False), "choices": [bodies[i] for i in sorted(bodies)], "usage": self.usage()}
