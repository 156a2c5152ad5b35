"""Pieces of OpenAI response bodies: usage, logprobs in the completions and chat shapes, heads.

Logprob entries come from the engine as one dict per token, {token id: Logprob(logprob, rank,
decoded_token)}, holding the chosen token and the top ones (rank 1 = most likely); a prompt's
first entry is None (nothing predicts the first token).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI clamps the same way


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def head(request_id: str, obj: str, created: int, model: str, fingerprint: str | None = None) -> dict:
    body = {"id": request_id, "object": obj, "created": created, "model": model}
    if fingerprint is not None:
        body["system_fingerprint"] = fingerprint
    return body


def now() -> int:
    return int(time.time())


class TokenNamer:
    """Token ids -> the strings logprobs show (or 'token_id:N' with return_tokens_as_token_ids)."""

    def __init__(self, tokenizer, as_ids: bool) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids or tokenizer is None

    def __call__(self, token_id: int, logprob: Any = None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        decoded = getattr(logprob, "decoded_token", None)
        return decoded if decoded is not None else self.tokenizer.decode([token_id])


def _value(logprob: Any) -> float:
    return max(float(logprob.logprob), MIN_LOGPROB)


def _top(entry: dict, num_top: int) -> list[tuple[int, Any]]:
    """The entries ranked within num_top, most likely first."""
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= num_top]
    return sorted(ranked, key=lambda item: item[1].rank)[:num_top]


def completion_logprobs(token_ids: list[int], entries: list[dict | None] | None, num_top: int, name: TokenNamer,
                        text_offset: int = 0) -> dict | None:
    """The completions `logprobs` object for these tokens (None if the engine gave none)."""
    if entries is None or len(entries) != len(token_ids):
        return None
    tokens, values, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id) if entry else None
        text = name(token_id, chosen)
        tokens.append(text)
        values.append(_value(chosen) if chosen is not None else None)
        tops.append({name(t, lp): _value(lp) for t, lp in _top(entry, num_top)} if entry else None)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(token_ids: list[int], entries: list[dict] | None, num_top: int, name: TokenNamer) -> dict | None:
    """The chat `logprobs` object ({'content': [...]}) for these tokens."""
    if entries is None or len(entries) != len(token_ids):
        return None
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id)
        text = name(token_id, chosen)
        content.append({
            "token": text, "logprob": _value(chosen) if chosen is not None else MIN_LOGPROB,
            "bytes": list(text.encode("utf-8", errors="replace")),
            "top_logprobs": [{"token": (s := name(t, lp)), "logprob": _value(lp), "bytes": list(s.encode("utf-8", errors="replace"))}
                             for t, lp in _top(entry, num_top)],
        })
    return {"content": content}


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)
