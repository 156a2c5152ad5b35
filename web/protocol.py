"""OpenAI request bodies -> engine inputs, and engine outputs -> OpenAI response bodies.

Validation happens here and in SamplingParams; every problem is a ValueError naming the field,
which app.py turns into a 400 error object.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aio_engine.outputs import RequestOutput
from sampling.params import RequestOutputKind, SamplingParams


class RequestError(ValueError):
    """A client error with an HTTP status and an OpenAI error type."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.err_type, self.param = status, err_type, param


def error_body(message: str, err_type: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def _expect(body: dict, name: str, types: type | tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and types in (int, float, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {value!r}", param=name)
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise RequestError(f"'{name}' must be of type {names}, got {type(value).__name__}", param=name)
    return value


def sampling_params_from(body: dict, defaults: dict, stream: bool, max_tokens_key: str = "max_tokens") -> SamplingParams:
    """The sampling fields of a completions or chat body (OpenAI's and vLLM's extra fields)."""
    num = (int, float)
    max_tokens = _expect(body, max_tokens_key, int)
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens = _expect(body, "max_tokens", int)
    kwargs: dict[str, Any] = {
        "n": _expect(body, "n", int, 1),
        "temperature": _expect(body, "temperature", num, defaults.get("temperature", 1.0)),
        "top_p": _expect(body, "top_p", num, defaults.get("top_p", 1.0)),
        "top_k": _expect(body, "top_k", int, defaults.get("top_k", 0)),
        "min_p": _expect(body, "min_p", num, defaults.get("min_p", 0.0)),
        "seed": _expect(body, "seed", int),
        "presence_penalty": _expect(body, "presence_penalty", num, 0.0),
        "frequency_penalty": _expect(body, "frequency_penalty", num, 0.0),
        "repetition_penalty": _expect(body, "repetition_penalty", num, defaults.get("repetition_penalty", 1.0)),
        "max_tokens": max_tokens if max_tokens is not None else defaults.get("max_tokens"),
        "min_tokens": _expect(body, "min_tokens", int, 0),
        "stop": _expect(body, "stop", (str, list)),
        "stop_token_ids": _expect(body, "stop_token_ids", list),
        "ignore_eos": _expect(body, "ignore_eos", bool, False),
        "include_stop_str_in_output": _expect(body, "include_stop_str_in_output", bool, False),
        "skip_special_tokens": _expect(body, "skip_special_tokens", bool, True),
        "spaces_between_special_tokens": _expect(body, "spaces_between_special_tokens", bool, True),
        "logit_bias": _expect(body, "logit_bias", dict),
        "allowed_token_ids": _expect(body, "allowed_token_ids", list),
        "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    }
    if kwargs["stop"] is not None and isinstance(kwargs["stop"], list) and not all(isinstance(s, str) for s in kwargs["stop"]):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise RequestError(str(e), param=str(e).split(" ", 1)[0]) from None


def completion_prompts(body: dict) -> list[str | list[int]]:
    """`prompt` as text, token ids, or a list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise RequestError("'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists", param="prompt")


def chat_messages(body: dict) -> list[dict]:
    """`messages`, with content given as a string or a list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    result = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}", param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")
        result.append({**m, "content": content or ""})
    return result


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, outputs: list[RequestOutput], created: int | None = None) -> dict:
    choices = []
    prompt_tokens = completion_tokens = 0
    for i, out in enumerate(outputs):
        c = out.outputs[0]
        choices.append({"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
        prompt_tokens += len(out.prompt_token_ids)
        completion_tokens += len(c.token_ids)
    return {"id": request_id, "object": "text_completion", "created": created or int(time.time()),
            "model": model, "system_fingerprint": "aio-engine", "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(request_id: str, model: str, out: RequestOutput, role: str, created: int | None = None) -> dict:
    c = out.outputs[0]
    return {"id": request_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "system_fingerprint": "aio-engine",
            "choices": [{"index": 0, "message": {"role": role, "content": c.text}, "logprobs": None,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}],
            "usage": usage(len(out.prompt_token_ids), len(c.token_ids))}
