"""POST /v1/chat/completions as a Job: messages -> chat.completion bodies and chunks.

Each choice's text goes through the reasoning parser (reasoning_content) and then the tool parser
(tool_calls), streamed or whole. tool_choice required / named also constrain decoding with a JSON
schema (structured_outputs), which the engine enforces.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from structured.params import StructuredOutputsParams

from . import protocol
from .errors import RequestError
from .protocol import expect
from .reasoning import ReasoningStream, make_reasoning_parser
from .responses import chat_logprobs
from .serving import ChoiceBuffer, Generation, Job
from .tools import (
    ToolParser,
    check_tools,
    make_tool_parser,
    merge_tool_call_deltas,
    tool_choice_schema,
)


class ChatChoice(ChoiceBuffer):
    """A choice's buffer plus its parsers: raw text in, OpenAI deltas out."""

    def __init__(self, index: int, want_logprobs: bool, reasoning: ReasoningStream | None,
                 tools: ToolParser | None, parallel_tool_calls: bool, include_reasoning: bool) -> None:
        super().__init__(index, want_logprobs)
        self.reasoning = reasoning
        self.tools = tools
        self.parallel = parallel_tool_calls
        self.include_reasoning = include_reasoning

    def parse(self, text: str, final: bool) -> tuple[str, str, list[dict]]:
        """(reasoning, content, tool-call deltas) for the next piece of text."""
        reasoning, content = (self.reasoning.feed(text) if self.reasoning else ("", text))
        if final and self.reasoning:
            r, c = self.reasoning.finish()
            reasoning, content = reasoning + r, content + c
        deltas: list[dict] = []
        if self.tools is not None:
            content, deltas = self.tools.feed(content)
            if final:
                c, d = self.tools.finish()
                content, deltas = content + c, deltas + d
            if not self.parallel:
                deltas = [d for d in deltas if d["index"] == 0]
        return (reasoning if self.include_reasoning else ""), content, deltas


class ChatJob(Job):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    async def prepare(self) -> None:
        body, ctx, settings = self.body, self.ctx, self.ctx.settings
        self._common()
        fields = protocol.sampling_fields(body, ctx.generation_defaults, chat=True, stream=self.stream)
        ctx.check_n(fields["n"])
        structured = protocol.structured_outputs(body)
        messages = protocol.chat_messages(body)
        tools, self.tool_choice = check_tools(body)
        schema = tool_choice_schema(tools, self.tool_choice) if tools else None
        structured_param = protocol.structured_param(body)
        if schema is not None:
            if structured is not None:
                raise RequestError("a required or named 'tool_choice' cannot be combined with response_format "
                                   "or structured_outputs", param="tool_choice")
            structured, structured_param = StructuredOutputsParams(json=schema), "tools"
        await self.check_grammar(structured, structured_param)
        if self.tool_choice == "auto" and tools and not settings.enable_auto_tool_choice:
            raise RequestError('"auto" tool choice needs the server to run with --enable-auto-tool-choice and '
                               '--tool-call-parser', param="tool_choice")
        if self.tool_choice != "none" and tools and settings.tool_call_parser == "hermes":
            fields["skip_special_tokens"] = False  # <tool_call> may be a special token
        self.auto_parser = settings.tool_call_parser if tools else None
        self.parallel_tool_calls = expect(body, "parallel_tool_calls", bool, True)
        self.include_reasoning = expect(body, "include_reasoning", bool, True)
        add_generation_prompt = expect(body, "add_generation_prompt", bool, True)
        continue_final = expect(body, "continue_final_message", bool, False)
        template_tools = None if self.tool_choice == "none" and settings.exclude_tools_when_tool_choice_none else tools
        text, ids = await ctx.chat.render(
            messages, add_special_tokens=expect(body, "add_special_tokens", bool, False), tools=template_tools,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final,
            chat_template=expect(body, "chat_template", str), kwargs=expect(body, "chat_template_kwargs", dict))
        self.role = settings.response_role if add_generation_prompt else messages[-1]["role"]
        self.echo = ""
        if expect(body, "echo", bool, False) and messages[-1].get("role") == self.role:
            content = messages[-1].get("content")
            self.echo = content if isinstance(content, str) else "".join(p.get("text", "") for p in content or [])
        self.num_top = fields["logprobs"]
        params = protocol.make_params(fields, protocol.requested_max_tokens(body, chat=True), len(ids),
                                      ctx.max_model_len, ctx.generation_defaults.get("max_tokens"), structured,
                                      what="messages")
        self.prompt_tokens = len(ids)
        self.choices = [self._choice(i) for i in range(params.n)]
        self.generation = Generation(ctx, [({"prompt": text, "prompt_token_ids": ids}, params)], self.priority)

    def _choice(self, index: int) -> ChatChoice:
        parser = self.ctx.settings.reasoning_parser
        return ChatChoice(index, self.num_top is not None, make_reasoning_parser(parser) if parser else None,
                          make_tool_parser(self.tool_choice, self.auto_parser), self.parallel_tool_calls,
                          self.include_reasoning)

    def _finish_reason(self, choice: ChatChoice) -> str | None:
        if choice.finish_reason == "stop" and choice.tools is not None and choice.tools.num_calls:
            return choice.tools.calls_finish_reason
        return choice.finish_reason

    def _logprobs(self, ids: list[int], entries: list | None) -> dict | None:
        if self.num_top is None:
            return None
        return chat_logprobs(ids, entries, self.num_top, self.namer)

    def _add(self, out) -> list[ChatChoice]:
        if out.finished:
            self.cached_tokens += out.num_cached_tokens
        for c in out.outputs:
            self.choices[c.index].add(c)
        return [self.choices[c.index] for c in out.outputs]

    async def chunks(self) -> AsyncIterator[dict]:
        interval = self.options.stream_interval
        for choice in self.choices:
            first = {"role": self.role, "content": self.echo}
            yield self.with_usage({**self.head(True), "choices": [
                {"index": choice.index, "delta": first, "logprobs": None, "finish_reason": None}]})
        async for _, out in self.generation:
            for choice in self._add(out):
                if not choice.due(interval):
                    continue
                final = choice.finished
                text, ids, entries = choice.take()
                reasoning, content, calls = choice.parse(text, final)
                delta: dict = {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                if content:
                    delta["content"] = content
                if calls:
                    delta["tool_calls"] = calls
                logprobs = self._logprobs(ids, entries)
                if not delta and not final and logprobs is None:
                    continue  # the parsers hold this text back (it may open a tag)
                yield self.with_usage({**self.head(True), "choices": [
                    {"index": choice.index, "delta": delta, "logprobs": logprobs,
                     "finish_reason": self._finish_reason(choice) if final else None,
                     "stop_reason": choice.stop_reason if final else None}]})
        if self.options.include_usage:
            yield self.usage_chunk()

    async def result(self) -> dict:
        texts: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        entries: dict[int, list | None] = {}
        async for _, out in self.generation:
            for choice in self._add(out):
                text, new_ids, new_entries = choice.take()
                texts[choice.index] = texts.get(choice.index, "") + text
                ids[choice.index] = ids.get(choice.index, []) + new_ids
                old = entries.get(choice.index, [])
                entries[choice.index] = None if old is None or new_entries is None else old + new_entries
        choices = []
        for choice in self.choices:
            reasoning, content, deltas = choice.parse(texts.get(choice.index, ""), final=True)
            message: dict = {"role": self.role, "content": (self.echo + content) or None,
                             "tool_calls": merge_tool_call_deltas(deltas)}
            if self.ctx.settings.reasoning_parser:
                message["reasoning_content"] = reasoning or None
            if choice.tools is None and message["content"] is None:
                message["content"] = ""
            choices.append({"index": choice.index, "message": message,
                            "logprobs": self._logprobs(ids.get(choice.index, []), entries.get(choice.index)),
                            "finish_reason": self._finish_reason(choice), "stop_reason": choice.stop_reason})
        return {**self.head(False), "choices": choices, "usage": self.usage()}
