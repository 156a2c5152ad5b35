"""Tool calls and reasoning through /v1/chat/completions, on scripted model text.

The tiny random model cannot be made to write a tool call, so these tests swap the engine's
generate() for a script that yields chosen text in pieces (streaming) or whole (non-streaming);
everything between the body and the response is the real web layer.
"""

from __future__ import annotations

import orjson
import pytest

from aio_engine.outputs import CompletionOutput, RequestOutput
from sampling.params import RequestOutputKind

from .conftest import serve_app, sse_events

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def scripted(pieces: list[str]):
    seen: list = []

    async def generate(prompt, params, request_id=None, priority=0, **kwargs):
        seen.append(params)
        ids = prompt["prompt_token_ids"]
        if params.output_kind == RequestOutputKind.DELTA:
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                yield RequestOutput(request_id, None, ids, [CompletionOutput(0, piece, [1], finish_reason="stop" if last else None)],
                                    finished=last)
        else:
            yield RequestOutput(request_id, None, ids, [CompletionOutput(0, "".join(pieces), [1] * len(pieces),
                                                                         finish_reason="stop")], finished=True)

    generate.seen = seen
    return generate


def cut(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


async def run_both(c, body: dict) -> tuple[dict, list[dict]]:
    whole = await (await c.post("/v1/chat/completions", json=body)).json()
    events = await sse_events(await c.post("/v1/chat/completions", json={**body, "stream": True}))
    return whole, events


def streamed_calls(events: list[dict]) -> list[tuple[str, dict]]:
    calls: dict[int, list[str]] = {}
    for e in events:
        for d in e["choices"][0]["delta"].get("tool_calls", []):
            entry = calls.setdefault(d["index"], ["", ""])
            entry[0] += d.get("function", {}).get("name") or ""
            entry[1] += d.get("function", {}).get("arguments") or ""
    return [(name, orjson.loads(args)) for name, args in (calls[i] for i in sorted(calls))]


async def test_hermes_auto_tool_calls_whole_and_streamed(engine, monkeypatch):
    text = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    generate = scripted(cut(text))
    monkeypatch.setattr(engine, "generate", generate)
    async with serve_app(engine, enable_auto_tool_choice=True, tool_call_parser="hermes") as c:
        whole, events = await run_both(c, {"messages": ASK, "tools": TOOLS})
        assert generate.seen[0].skip_special_tokens is False  # <tool_call> may be a special token
        assert generate.seen[0].structured_outputs is None  # auto: the model chooses
    message = whole["choices"][0]["message"]
    assert message["content"] == "I will check." and whole["choices"][0]["finish_reason"] == "tool_calls"
    expected = [("get_weather", {"city": "Paris"}), ("now", {})]
    assert [(t["function"]["name"], orjson.loads(t["function"]["arguments"])) for t in message["tool_calls"]] == expected
    assert streamed_calls(events) == expected
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "I will check."
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_parallel_tool_calls_false_keeps_the_first_call(engine, monkeypatch):
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "now", "parameters": {}}'
    monkeypatch.setattr(engine, "generate", scripted(cut(text, 5)))
    async with serve_app(engine, enable_auto_tool_choice=True, tool_call_parser="llama3_json") as c:
        whole, events = await run_both(c, {"messages": ASK, "tools": TOOLS, "parallel_tool_calls": False})
    assert [t["function"]["name"] for t in whole["choices"][0]["message"]["tool_calls"]] == ["get_weather"]
    assert streamed_calls(events) == [("get_weather", {"city": "Oslo"})]
    assert whole["choices"][0]["message"]["content"] is None


async def test_required_tool_choice_asks_the_engine_for_the_schema(engine, monkeypatch):
    text = '[{"name": "now", "parameters": {}}]'
    generate = scripted(cut(text))
    monkeypatch.setattr(engine, "generate", generate)
    async with serve_app(engine) as c:  # required needs no auto parser
        whole, events = await run_both(c, {"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
    structured = generate.seen[0].structured_outputs
    assert structured.json["type"] == "array" and structured.json["minItems"] == 1
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert [t["function"]["name"] for t in whole["choices"][0]["message"]["tool_calls"]] == ["now"]
    assert streamed_calls(events) == [("now", {})]


@pytest.mark.parametrize("parser, text", [
    ("qwen3", "<think>\nIt is sunny.\n</think>\n\nSunny!"),
    ("deepseek_r1", "\nIt is sunny.\n</think>\n\nSunny!"),
])
async def test_reasoning_content_whole_and_streamed(engine, monkeypatch, parser, text):
    monkeypatch.setattr(engine, "generate", scripted(cut(text, 2)))
    async with serve_app(engine, reasoning_parser=parser) as c:
        whole, events = await run_both(c, {"messages": ASK})
        hidden = await (await c.post("/v1/chat/completions", json={"messages": ASK, "include_reasoning": False})).json()
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "\nIt is sunny.\n" and message["content"] == "\n\nSunny!"
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    first_content = next(i for i, d in enumerate(deltas) if d.get("content") and "role" not in d)
    assert all(not d.get("reasoning_content") for d in deltas[first_content:])
    assert hidden["choices"][0]["message"]["reasoning_content"] is None


async def test_reasoning_then_a_tool_call(engine, monkeypatch):
    text = '<think>Need the weather.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    monkeypatch.setattr(engine, "generate", scripted(cut(text, 4)))
    async with serve_app(engine, reasoning_parser="qwen3", enable_auto_tool_choice=True, tool_call_parser="hermes") as c:
        whole, events = await run_both(c, {"messages": ASK, "tools": TOOLS})
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "Need the weather." and message["content"] is None
    assert streamed_calls(events) == [("get_weather", {"city": "Rome"})]
    assert "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in events) == "Need the weather."


def test_unknown_parsers_are_refused_at_startup():
    from web.settings import ServerSettings

    for kwargs in ({"tool_call_parser": "nope"}, {"reasoning_parser": "nope"}, {"enable_auto_tool_choice": True},
                   {"chat_template_content_format": "xml"}):
        with pytest.raises(ValueError):
            ServerSettings(served_model_names=["x"], **kwargs)
