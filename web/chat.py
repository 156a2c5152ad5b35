"""Chat messages -> prompt text and token ids through the chat template.

The template is --chat-template (file or inline) if given, else the tokenizer's own. Message
content reaches the template as a plain string ("string") or as OpenAI's list of text parts
("openai"); "auto" looks at the template to see which it iterates. Tool-call arguments become
objects, as Hugging Face templates expect. Rendering runs on the loop for small conversations and
in a worker thread for large ones.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from .errors import RequestError
from .settings import ServerSettings

# Keys of apply_chat_template itself: a request may not smuggle them in through chat_template_kwargs.
RESERVED_KWARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                   "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                   "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "messages"}
_ITERATES_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+(\[\s*['\"]content['\"]\s*\]|\.content)")
LARGE_CONVERSATION_CHARS = 20_000


def content_format_of(template: str | None) -> str:
    """'openai' if the template loops over message content parts, else 'string'."""
    return "openai" if template and _ITERATES_CONTENT.search(template) else "string"


def _part_text(part: dict) -> str:
    return part.get("text", part.get("refusal", ""))


def normalize_message(message: dict, content_format: str) -> dict:
    """A copy of the message as the template wants it."""
    out = dict(message)
    content = message.get("content")
    if content_format == "string":
        out["content"] = "\n".join(_part_text(p) for p in content) if isinstance(content, list) else (content or "")
    else:
        if isinstance(content, str):
            out["content"] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            out["content"] = [{"type": "text", "text": _part_text(p)} for p in content]
        else:
            out["content"] = []
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [_call_for_template(c) for c in calls]
    return out


def _call_for_template(call: dict) -> dict:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**fn, "arguments": args}}


class ChatRenderer:
    """Applies one server's chat settings to each request's messages."""

    def __init__(self, tokenizer, settings: ServerSettings) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = settings.chat_template or (getattr(tokenizer, "chat_template", None) if tokenizer else None)
        fmt = settings.chat_template_content_format
        self.content_format = content_format_of(self.template) if fmt == "auto" else fmt

    def template_kwargs(self, body_kwargs: dict | None) -> dict:
        kwargs = {**self.settings.default_chat_template_kwargs, **(body_kwargs or {})}
        reserved = sorted(RESERVED_KWARGS & set(body_kwargs or {}))
        if reserved:
            raise RequestError(f"'chat_template_kwargs' may not set {reserved}; use the request fields",
                               param="chat_template_kwargs")
        return kwargs

    def render_text(self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template: str | None = None,
                    kwargs: dict | None = None) -> str:
        """The prompt text for these messages (raises RequestError for template problems)."""
        if self.tokenizer is None:
            raise RequestError("chat needs a tokenizer (the engine runs with --skip-tokenizer-init)")
        if chat_template is not None and not self.settings.trust_request_chat_template:
            raise RequestError("a per-request 'chat_template' is not allowed on this server "
                               "(start it with --trust-request-chat-template)", param="chat_template")
        template = chat_template or self.template
        if not template:
            raise RequestError("the model has no chat template; start the server with --chat-template",
                               param="messages")
        if add_generation_prompt and continue_final_message:
            raise RequestError("'add_generation_prompt' and 'continue_final_message' cannot both be true",
                               param="continue_final_message")
        if continue_final_message and messages[-1].get("role") != "assistant":
            raise RequestError("'continue_final_message' needs the last message to be the assistant's",
                               param="continue_final_message")
        fmt = content_format_of(template) if chat_template and self.settings.chat_template_content_format == "auto" \
            else self.content_format
        conversation = [normalize_message(m, fmt) for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **self.template_kwargs(kwargs))
        except RequestError:
            raise
        except Exception as e:  # jinja errors (raise_exception in templates, bad roles) are the request's fault
            raise RequestError(f"could not apply the chat template: {e}", param="messages") from None

    def token_ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    async def render(self, messages: list[dict], add_special_tokens: bool = False, **kwargs: Any) -> tuple[str, list[int]]:
        """(prompt text, prompt token ids); large conversations render in a worker thread."""
        def work() -> tuple[str, list[int]]:
            text = self.render_text(messages, **kwargs)
            return text, self.token_ids(text, add_special_tokens)

        size = sum(len(str(m.get("content") or "")) for m in messages)
        if size < LARGE_CONVERSATION_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(None, work)
