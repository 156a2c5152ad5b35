"""Structured outputs through the OpenAI routes, on the embedded default model: response_format
(json_object, json_schema), vLLM's structured_outputs and guided_* fields, named and required
tool choices, whole and streamed; an invalid schema, regex or grammar is a 400 naming its field,
streamed or not.

The session's tiny random model (tests/web/conftest.py) cannot be steered into closing a JSON
string, so this module runs its own engine on the default model (a Shakespeare Llama), with
disable_any_whitespace server-wide and a logit_bias towards the closing tokens and eos in each
request (the bias only chooses among the tokens the grammar allows).
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import pytest_asyncio

from aio_engine import AsyncEngine, EngineArgs

from .conftest import serve_app, sse_events

ASK = [{"role": "user", "content": "What says the weather in Verona?"}]
WEATHER = {"type": "object", "required": ["city", "unit"], "additionalProperties": False, "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
COUNT = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "count", "parameters": COUNT}}]
PERSON = {"type": "object", "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["lord", "lady", "fool"]}, "maxItems": 3}}}


@pytest_asyncio.fixture(scope="module")
async def engine():
    engine = AsyncEngine.from_engine_args(EngineArgs(
        max_model_len=512, max_num_seqs=16, structured_outputs_config={"disable_any_whitespace": True}))
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="module")
def bias(engine) -> dict[str, float]:
    """logit_bias (OpenAI's shape: token id strings) towards '"', ')', ']', '}' and eos."""
    tok = engine.tokenizer
    out = {}
    for i in range(len(tok)):
        text = tok.decode([i])
        if text and set(text) <= set('"])}'):
            out[str(i)] = 8.0 if text in ("]", "}") else 6.0
    out.update({str(eos): 8.0 for eos in engine.core.eos_token_ids})
    return out


@pytest.fixture
async def client(engine):
    async with serve_app(engine) as c:
        yield c


def validate(schema: dict, value) -> None:
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(value)


def sampled(bias: dict, seed: int, **body) -> dict:
    return {"temperature": 1.0, "seed": seed, "max_tokens": 300, "logit_bias": bias, **body}


async def chat_both(c, body: dict) -> tuple[dict, dict, list[dict]]:
    """(whole choice, its message, the streamed events) for one chat body."""
    resp = await c.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    whole = (await resp.json())["choices"][0]
    events = await sse_events(await c.post("/v1/chat/completions", json={**body, "stream": True}))
    return whole, whole["message"], events


def streamed_content(events: list[dict]) -> tuple[str, str | None]:
    deltas = [e["choices"][0] for e in events if e["choices"]]
    return "".join(d["delta"].get("content") or "" for d in deltas), deltas[-1]["finish_reason"]


async def completion_both(c, body: dict) -> tuple[dict, str, str | None]:
    """(whole choice, streamed text, streamed finish_reason) for one completions body."""
    resp = await c.post("/v1/completions", json=body)
    assert resp.status == 200, await resp.text()
    whole = (await resp.json())["choices"][0]
    events = await sse_events(await c.post("/v1/completions", json={**body, "stream": True}))
    choices = [e["choices"][0] for e in events if e["choices"]]
    return whole, "".join(ch["text"] for ch in choices), choices[-1]["finish_reason"]


# --- response_format ---

@pytest.mark.parametrize("seed", [0, 1])
async def test_response_format_json_object_whole_and_streamed(client, bias, seed):
    body = sampled(bias, seed, messages=ASK, response_format={"type": "json_object"})
    whole, message, events = await chat_both(client, body)
    assert whole["finish_reason"] == "stop"
    assert isinstance(json.loads(message["content"]), dict)
    text, reason = streamed_content(events)
    assert reason == "stop" and text == message["content"]  # seeded: the same output either way


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_response_format_json_schema_strict_whole_and_streamed(client, bias, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    whole, message, events = await chat_both(client, sampled(bias, seed, messages=ASK, response_format=fmt))
    assert whole["finish_reason"] == "stop"
    validate(PERSON, json.loads(message["content"]))
    text, reason = streamed_content(events)
    assert reason == "stop"
    validate(PERSON, json.loads(text))


# --- vLLM's fields ---

@pytest.mark.parametrize("structured, check", [
    ({"json": PERSON}, lambda t: validate(PERSON, json.loads(t))),
    ({"json": json.dumps(PERSON), "disable_additional_properties": True},
     lambda t: validate({**PERSON, "additionalProperties": False}, json.loads(t))),
    ({"regex": r"[A-Z][a-z]{2,6} (of|to) [A-Z][a-z]{2,6}"},
     lambda t: re.fullmatch(r"[A-Z][a-z]{2,6} (of|to) [A-Z][a-z]{2,6}", t) or pytest.fail(t)),
    ({"choice": ["Montague", "Capulet", "neither"]},
     lambda t: t in ("Montague", "Capulet", "neither") or pytest.fail(t)),
    ({"grammar": 'root ::= "O " name "!"\nname ::= "Romeo" | "Juliet" | "Tybalt"'},
     lambda t: t in ("O Romeo!", "O Juliet!", "O Tybalt!") or pytest.fail(t)),
], ids=["json", "json_string_closed", "regex", "choice", "grammar"])
async def test_structured_outputs_extra_body_on_completions(client, bias, structured, check):
    body = sampled(bias, 3, prompt="ROMEO:", structured_outputs=structured)
    whole, streamed, reason = await completion_both(client, body)
    assert whole["finish_reason"] == "stop" and reason == "stop"
    check(whole["text"])
    check(streamed)


@pytest.mark.parametrize("field, value, check", [
    ("guided_json", PERSON, lambda t: validate(PERSON, json.loads(t))),
    ("guided_regex", r"\d{2}:\d{2} (am|pm)", lambda t: re.fullmatch(r"\d{2}:\d{2} (am|pm)", t) or pytest.fail(t)),
    ("guided_choice", ["ay", "nay"], lambda t: t in ("ay", "nay") or pytest.fail(t)),
    ("guided_grammar", 'root ::= [0-9]+ ("+" [0-9]+)*',
     lambda t: re.fullmatch(r"[0-9]+(\+[0-9]+)*", t) or pytest.fail(t)),
])
async def test_guided_fields_on_completions_and_chat(client, bias, field, value, check):
    for seed in (4, 5):
        whole, streamed, reason = await completion_both(client, sampled(bias, seed, prompt="JULIET:", **{field: value}))
        assert whole["finish_reason"] == "stop" and reason == "stop"
        check(whole["text"])
        check(streamed)
    whole, message, events = await chat_both(client, sampled(bias, 6, messages=ASK, **{field: value}))
    assert whole["finish_reason"] == "stop"
    check(message["content"])
    check(streamed_content(events)[0])


async def test_n2_gives_two_valid_outputs(client, bias):
    resp = await client.post("/v1/completions", json=sampled(bias, 8, prompt="ROMEO:", n=2, guided_json=PERSON))
    choices = (await resp.json())["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for c in choices:
        assert c["finish_reason"] == "stop"
        validate(PERSON, json.loads(c["text"]))


# --- bad constraints: a 400 naming the field, before any stream starts ---

BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}}}, "response_format", "invalid JSON schema"),
    ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs", "invalid regex"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs", "invalid EBNF grammar"),
    ({"structured_outputs": {"regex": "a+", "whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"guided_regex": "(ab"}, "guided_regex", "invalid regex"),
    ({"guided_json": {"type": "object", "properties": {"x": {"type": "string", "pattern": "[a-"}}}},
     "guided_json", "invalid JSON schema"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar", "invalid EBNF grammar"),
]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_constraint_is_a_400_naming_the_field(client, route, stream):
    base = {"prompt": "ROMEO:"} if route == "/v1/completions" else {"messages": ASK}
    for extra, param, message in BAD:
        resp = await client.post(route, json={**base, **extra, "max_tokens": 4, "stream": stream})
        assert resp.status == 400, (extra, await resp.text())
        assert resp.headers["Content-Type"].startswith("application/json")
        error = (await resp.json())["error"]
        assert error["param"] == param and message in error["message"], (extra, error)


async def test_bad_tool_parameters_schema_is_a_400_naming_tools(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"$ref": "#/$defs/missing"}}}}}]
    for choice in ({"type": "function", "function": {"name": "f"}}, "required"):
        resp = await client.post("/v1/chat/completions", json={"messages": ASK, "tools": tools, "tool_choice": choice,
                                                                 "stream": True})
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["param"] == "tools" and "invalid JSON schema" in error["message"]


async def test_requests_in_flight_finish_while_a_bad_one_is_refused(client, bias):
    good = [client.post("/v1/completions", json=sampled(bias, s, prompt="ROMEO:", guided_json=PERSON))
            for s in range(3)]
    bad = client.post("/v1/completions", json={"prompt": "x", "guided_regex": "[", "max_tokens": 4})
    *oks, refused = await asyncio.gather(*good, bad)
    assert refused.status == 400
    for resp in oks:
        choice = (await resp.json())["choices"][0]
        assert choice["finish_reason"] == "stop"
        validate(PERSON, json.loads(choice["text"]))


# --- tool choices ---

@pytest.mark.parametrize("seed", [0, 1])
async def test_named_tool_choice_arguments_follow_the_parameters_schema(client, bias, seed):
    body = sampled(bias, seed, messages=ASK, tools=TOOLS,
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole, message, events = await chat_both(client, body)
    assert whole["finish_reason"] == "stop" and message["content"] is None
    [call] = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    validate(WEATHER, json.loads(call["function"]["arguments"]))
    deltas = [d for e in events if e["choices"] for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather"
    validate(WEATHER, json.loads("".join(d["function"].get("arguments") or "" for d in deltas)))


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_required_tool_choice_gives_parseable_calls(client, bias, seed):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    whole, message, events = await chat_both(client, sampled(bias, seed, messages=ASK, tools=TOOLS,
                                                             tool_choice="required"))
    assert whole["finish_reason"] == "tool_calls"
    calls = message["tool_calls"]
    assert calls and not message["content"]
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        validate(schemas[call["function"]["name"]], json.loads(call["function"]["arguments"]))
    streamed: dict[int, list[str]] = {}
    for e in events:
        for d in (e["choices"][0]["delta"].get("tool_calls", []) if e["choices"] else []):
            entry = streamed.setdefault(d["index"], ["", ""])
            entry[0] += d["function"].get("name") or ""
            entry[1] += d["function"].get("arguments") or ""
    assert [name for name, _ in streamed.values()] == [c["function"]["name"] for c in calls]
    for name, args in streamed.values():
        validate(schemas[name], json.loads(args))
    assert streamed_content(events)[1] == "tool_calls"
