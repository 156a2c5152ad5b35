"""OpenAI (and vLLM extra) request fields -> engine inputs: SamplingParams, prompts, messages.

Validation happens here and in SamplingParams / StructuredOutputsParams; every problem is a
RequestError naming the field. Response bodies are built in responses.py. Unknown fields are
ignored, as vLLM and OpenAI's SDKs expect (clients send extras freely).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from sampling.params import RequestOutputKind, SamplingParams
from structured.params import StructuredOutputsParams

from .errors import RequestError

NUMBER = (int, float)
STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag", "whitespace_pattern",
                   "disable_any_whitespace", "disable_additional_properties")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object (413 past client_max_size, 400 if not JSON)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def expect(body: dict, name: str, types: type | tuple, default: Any = None) -> Any:
    """body[name] if it has the given type(s); the default when absent or null; else a 400."""
    value = body.get(name)
    if value is None:
        return default
    numeric = types in (int, float, NUMBER)
    if (isinstance(value, bool) and numeric) or not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise RequestError(f"'{name}' must be of type {names}, got {type(value).__name__}", param=name)
    return value


def expect_int_list(body: dict, name: str) -> list[int] | None:
    value = expect(body, name, list)
    if value is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"'{name}' must be a list of integers", param=name)
    return value


@dataclass
class StreamOptions:
    include_usage: bool = False
    continuous_usage_stats: bool = False
    stream_interval: int = 1  # tokens per flush, on top of the engine's own interval

    @classmethod
    def parse(cls, body: dict, stream: bool, force_usage: bool) -> StreamOptions:
        raw = expect(body, "stream_options", dict)
        if raw is not None and not stream:
            raise RequestError("'stream_options' is only allowed with 'stream': true", param="stream_options")
        raw = raw or {}
        opts = cls(include_usage=expect(raw, "include_usage", bool, False) or force_usage,
                   continuous_usage_stats=expect(raw, "continuous_usage_stats", bool, False),
                   stream_interval=expect(raw, "stream_interval", int, 1))
        if opts.stream_interval < 1:
            raise RequestError("'stream_options.stream_interval' must be >= 1", param="stream_options")
        opts.continuous_usage_stats = opts.continuous_usage_stats and opts.include_usage
        return opts


def sampling_fields(body: dict, defaults: dict, *, chat: bool, stream: bool) -> dict[str, Any]:
    """The SamplingParams fields of a body except max_tokens (which needs the prompt's length)."""
    fields: dict[str, Any] = {
        "n": expect(body, "n", int, 1),
        "temperature": expect(body, "temperature", NUMBER, defaults.get("temperature", 1.0)),
        "top_p": expect(body, "top_p", NUMBER, defaults.get("top_p", 1.0)),
        "top_k": expect(body, "top_k", int, defaults.get("top_k", 0)),
        "min_p": expect(body, "min_p", NUMBER, defaults.get("min_p", 0.0)),
        "seed": expect(body, "seed", int),
        "presence_penalty": expect(body, "presence_penalty", NUMBER, 0.0),
        "frequency_penalty": expect(body, "frequency_penalty", NUMBER, 0.0),
        "repetition_penalty": expect(body, "repetition_penalty", NUMBER, defaults.get("repetition_penalty", 1.0)),
        "min_tokens": expect(body, "min_tokens", int, 0),
        "stop": expect(body, "stop", (str, list)),
        "stop_token_ids": expect_int_list(body, "stop_token_ids"),
        "bad_words": expect(body, "bad_words", list),
        "ignore_eos": expect(body, "ignore_eos", bool, False),
        "include_stop_str_in_output": expect(body, "include_stop_str_in_output", bool, False),
        "skip_special_tokens": expect(body, "skip_special_tokens", bool, True),
        "spaces_between_special_tokens": expect(body, "spaces_between_special_tokens", bool, True),
        "logit_bias": expect(body, "logit_bias", dict),
        "allowed_token_ids": expect_int_list(body, "allowed_token_ids"),
        "prompt_logprobs": expect(body, "prompt_logprobs", int),
        "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    }
    stop = fields["stop"]
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    if fields["bad_words"] is not None and not all(isinstance(s, str) for s in fields["bad_words"]):
        raise RequestError("'bad_words' must be a list of strings", param="bad_words")
    if fields["logit_bias"] is not None:
        try:
            fields["logit_bias"] = {int(k): float(v) for k, v in fields["logit_bias"].items()}
        except (TypeError, ValueError):
            raise RequestError("'logit_bias' maps token ids to numbers", param="logit_bias") from None
    best_of = expect(body, "best_of", int)
    if best_of is not None and best_of != fields["n"]:
        raise RequestError("'best_of' other than n is not supported", param="best_of")
    if chat:
        logprobs = expect(body, "logprobs", bool, False)
        top = expect(body, "top_logprobs", int)
        if top is not None and not logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if top is not None and not 0 <= top <= 20:
            raise RequestError("'top_logprobs' must be in [0, 20]", param="top_logprobs")
        fields["logprobs"] = (top or 0) if logprobs else None
    else:
        fields["logprobs"] = expect(body, "logprobs", int)
        if fields["logprobs"] is not None and fields["logprobs"] < 0:
            raise RequestError("'logprobs' must be >= 0", param="logprobs")
        if expect(body, "echo", bool, False) and fields["logprobs"] is not None and fields["prompt_logprobs"] is None:
            fields["prompt_logprobs"] = fields["logprobs"]
    return fields


def requested_max_tokens(body: dict, chat: bool) -> int | None:
    if chat:
        value = expect(body, "max_completion_tokens", int)
        if value is not None:
            return value
    return expect(body, "max_tokens", int)


def make_params(fields: dict, requested: int | None, prompt_len: int, max_model_len: int, default_max: int | None,
                structured: StructuredOutputsParams | None, what: str = "prompt") -> SamplingParams:
    """SamplingParams for one prompt; max_tokens defaults to what remains of the context."""
    room = max_model_len - prompt_len
    if room < 1:
        raise RequestError(f"the {what} has {prompt_len} tokens; with at least one output token it needs "
                           f"more than max_model_len ({max_model_len})", param="messages" if what == "messages" else "prompt")
    if requested is not None and requested > room:
        raise RequestError(
            f"This model's maximum context length (max_model_len) is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the completion). "
            f"Please reduce the length of the {what} or completion.", param="max_tokens")
    max_tokens = requested if requested is not None else min(room, default_max or room)
    return SamplingParams(**fields, max_tokens=max_tokens, structured_outputs=structured)  # ValueError: a 400


def structured_outputs(body: dict) -> StructuredOutputsParams | None:
    """response_format, structured_outputs or the older guided_* fields; at most one of them."""
    found: list[tuple[str, dict]] = []
    fmt = expect(body, "response_format", dict)
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, bool)):
                raise RequestError("'response_format.json_schema.schema' must be a JSON schema object", param="response_format")
            found.append(("response_format", {"json": schema if isinstance(schema, dict) else {}}))
        elif kind == "structural_tag":
            found.append(("response_format", {"structural_tag": {k: v for k, v in fmt.items() if k != "type"}}))
        elif kind != "text":
            raise RequestError("'response_format.type' must be text, json_object, json_schema or structural_tag",
                               param="response_format")
    raw = expect(body, "structured_outputs", dict)
    if raw is not None:
        unknown = sorted(set(raw) - set(STRUCTURED_KEYS))
        if unknown:
            raise RequestError(f"'structured_outputs' has unknown keys {unknown}; allowed: {list(STRUCTURED_KEYS)}",
                               param="structured_outputs")
        found.append(("structured_outputs", dict(raw)))
    guided = {key: body[name] for name, key in GUIDED.items() if body.get(name) is not None}
    if guided:
        if body.get("guided_whitespace_pattern") is not None:
            guided["whitespace_pattern"] = body["guided_whitespace_pattern"]
        found.append(("guided_*", guided))
    if len(found) > 1:
        raise RequestError(f"give one of response_format, structured_outputs, guided_*; got {[f[0] for f in found]}",
                           param=found[1][0])
    if not found:
        return None
    name, kwargs = found[0]
    try:
        return StructuredOutputsParams(**kwargs)
    except (TypeError, ValueError) as e:
        raise RequestError(str(e), param=name if name != "guided_*" else next(iter(GUIDED))) from None


def structured_param(body: dict) -> str:
    """The field a body's structured_outputs() came from, for errors found later (compiling)."""
    for name in ("response_format", "structured_outputs", *GUIDED):
        if body.get(name) is not None:
            return name
    return "structured_outputs"


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
    raise RequestError("'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists",
                       param="prompt")


def chat_messages(body: dict) -> list[dict]:
    """`messages`, checked: a role each, content as a string, null, or a list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "refusal"):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RequestError(f"messages[{i}].content: part type {kind!r} is not supported (text only)",
                                       param="messages")
                if not isinstance(part.get("text", part.get("refusal")), str):
                    raise RequestError(f"messages[{i}].content parts need a string 'text'", param="messages")
        elif content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string, null or a list of parts", param="messages")
        calls = m.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
            raise RequestError(f"messages[{i}].tool_calls must be a list of objects", param="messages")
    return messages
