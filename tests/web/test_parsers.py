"""Tool-call and reasoning parsers on crafted text, whole and cut into random streamed pieces;
request-side mapping of tool_choice and response formats onto structured outputs."""

from __future__ import annotations

import random

import orjson
import pytest

from structured.params import StructuredOutputsParams
from web.errors import RequestError
from web.protocol import structured_outputs
from web.reasoning import make_reasoning_parser
from web.tools import (
    HermesToolParser,
    Llama3JsonToolParser,
    NamedToolParser,
    RequiredToolParser,
    check_tools,
    merge_tool_call_deltas,
    tool_choice_schema,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "opts": {"unit": "c"}}}'


def stream(parser, text: str, seed: int) -> tuple[str, list[dict], list[dict]]:
    """Feed text in random 1..6-character pieces: (content, merged calls, raw deltas)."""
    rnd, i, content, deltas = random.Random(seed), 0, "", []
    while i < len(text):
        n = rnd.randint(1, 6)
        c, d = parser.feed(text[i:i + n])
        content, deltas, i = content + c, deltas + d, i + n
    c, d = parser.finish()
    return content + c, merge_tool_call_deltas(deltas + d), deltas + d


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in calls]


HERMES_CASES = [
    ("Let me look.\n<tool_call>\n" + WEATHER + "\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>",
     "Let me look.", [("get_weather", {"city": "Paris", "days": [1, 2], "opts": {"unit": "c"}}), ("now", {})]),
    ("Just text, no calls <tool_ at all.\n", "Just text, no calls <tool_ at all.\n", []),
    ("<tool_call>" + WEATHER + "</tool_call>", None, [("get_weather", {"city": "Paris", "days": [1, 2], "opts": {"unit": "c"}})]),
    ('<tool_call>{"arguments": {"a": 1}, "name": "late"}</tool_call>', None, [("late", {"a": 1})]),
    ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    ('<tool_call>\n{"name": "cut", "arguments": {"a": 1}}', None, [("cut", {"a": 1})]),  # no close tag (eos)
]


@pytest.mark.parametrize("text, content, calls", HERMES_CASES)
def test_hermes_whole_and_streamed_agree(text, content, calls):
    whole_content, whole_calls = HermesToolParser().parse(text)
    assert whole_content == content and calls_of(whole_calls) == calls
    for seed in range(6):
        streamed, merged, deltas = stream(HermesToolParser(), text, seed)
        assert (streamed or None) == content and calls_of(merged) == calls
        assert all(c["id"].startswith("call_") and c["type"] == "function" for c in merged)


def test_hermes_streams_the_name_first_then_argument_pieces():
    text = "<tool_call>\n" + WEATHER + "\n</tool_call>"
    _, merged, deltas = stream(HermesToolParser(), text, 1)
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and "id" in deltas[0]
    assert len(deltas) > 3 and all("id" not in d for d in deltas[1:])
    # The arguments are the model's own JSON text, byte for byte.
    assert merged[0]["function"]["arguments"] == WEATHER[WEATHER.index('{"city"'):-1]


def test_hermes_holds_back_a_partial_tag_but_not_plain_text():
    parser = HermesToolParser()
    assert parser.feed("Hello <tool") == ("Hello", [])
    assert parser.feed("box> ok") == (" <toolbox> ok", [])


LLAMA_CASES = [
    ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "z"}}', None,
     [("a", {"x": 1}), ("b", {"y": "z"})]),
    ('  {"name": "a", "parameters": {}}', None, [("a", {})]),
    ("Hello {not a call}", "Hello {not a call}", []),
    ('{"just": "json"}', '{"just": "json"}', []),
]


@pytest.mark.parametrize("text, content, calls", LLAMA_CASES)
def test_llama3_json_whole_and_streamed_agree(text, content, calls):
    whole_content, whole_calls = Llama3JsonToolParser().parse(text)
    assert whole_content == content and calls_of(whole_calls) == calls
    for seed in range(6):
        streamed, merged, _ = stream(Llama3JsonToolParser(), text, seed)
        assert (streamed or None) == content and calls_of(merged) == calls


def test_required_and_named_choices_parse_their_constrained_output():
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]'
    for seed in range(4):
        content, merged, _ = stream(RequiredToolParser(), text, seed)
        assert content == "" and calls_of(merged) == [("a", {"x": 1}), ("b", {})]
    assert RequiredToolParser().parse("no list here") == ("no list here", [])
    content, merged, deltas = stream(NamedToolParser("f"), '{"x": [1, 2]}', 0)
    assert content == "" and calls_of(merged) == [("f", {"x": [1, 2]})]
    assert NamedToolParser.calls_finish_reason == "stop" and RequiredToolParser.calls_finish_reason == "tool_calls"


REASONING_CASES = [
    ("qwen3", "<think>\nstep 1\n</think>\n\nThe answer.", "\nstep 1\n", "\n\nThe answer."),
    ("qwen3", "No thinking here.", None, "No thinking here."),
    ("qwen3", "<think>cut short", "cut short", None),
    ("deepseek_r1", "step 1</think>The answer.", "step 1", "The answer."),
    ("deepseek_r1", "<think>step 1</think>The answer.", "step 1", "The answer."),
    ("deepseek_r1", "all reasoning", "all reasoning", None),
]


@pytest.mark.parametrize("name, text, reasoning, content", REASONING_CASES)
def test_reasoning_parsers_whole_and_streamed_agree(name, text, reasoning, content):
    assert make_reasoning_parser(name).parse(text) == (reasoning, content)
    for seed in range(6):
        parser, rnd, i, r, c = make_reasoning_parser(name), random.Random(seed), 0, "", ""
        while i < len(text):
            n = rnd.randint(1, 5)
            dr, dc = parser.feed(text[i:i + n])
            r, c, i = r + dr, c + dc, i + n
        dr, dc = parser.finish()
        assert ((r + dr) or None, (c + dc) or None) == (reasoning, content)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}}]


def test_tool_choice_defaults_and_schemas():
    assert check_tools({}) == (None, "none")
    assert check_tools({"tools": TOOLS})[1] == "auto"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert tool_choice_schema(TOOLS, named) == TOOLS[0]["function"]["parameters"]
    schema = tool_choice_schema(TOOLS, "required")
    assert schema["type"] == "array" and schema["minItems"] == 1
    names = [alt["properties"]["name"]["enum"] for alt in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["now"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert tool_choice_schema(TOOLS, "auto") is None
    for body in ({"tool_choice": "required"}, {"tools": TOOLS, "tool_choice": "sometimes"},
                 {"tools": [{"type": "function"}]}, {"tools": TOOLS, "tool_choice": {"type": "function"}}):
        with pytest.raises(RequestError):
            check_tools(body)


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}},
     StructuredOutputsParams(json={"type": "object"})),
    ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutputsParams(regex="[a-z]+")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputsParams(choice=["a", "b"])),
    ({"guided_json": {"type": "string"}}, StructuredOutputsParams(json={"type": "string"})),
    ({"guided_regex": "\\d+", "guided_whitespace_pattern": " "}, StructuredOutputsParams(regex="\\d+", whitespace_pattern=" ")),
    ({"guided_choice": ["yes", "no"]}, StructuredOutputsParams(choice=["yes", "no"])),
    ({"guided_grammar": "root ::= \"a\""}, StructuredOutputsParams(grammar="root ::= \"a\"")),
])
def test_response_formats_map_onto_structured_outputs(body, expected):
    assert structured_outputs(body) == expected


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_*"),
    ({"structured_outputs": {"regex": "a", "bogus": 1}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
])
def test_conflicting_or_broken_formats_are_400(body, param):
    with pytest.raises(RequestError) as e:
        structured_outputs(body)
    assert e.value.param == param
