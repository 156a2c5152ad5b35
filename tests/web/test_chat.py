"""POST /v1/chat/completions: shapes, streaming, chat-template settings and request fields."""

from __future__ import annotations

import orjson
import pytest

from web.chat import ChatRenderer, content_format_of, normalize_message
from web.settings import ServerSettings

from .conftest import serve_app, sse_events

GREEDY = {"temperature": 0, "ignore_eos": True}
HI = [{"role": "user", "content": "Hi there"}]


async def test_chat_completion_has_the_openai_shape(client):
    body = await (await client.post("/v1/chat/completions", json={"messages": HI, "max_completion_tokens": 6,
                                                                   **GREEDY})).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "tiny" and body["system_fingerprint"] and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["message"]["tool_calls"] == [] and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6
    ids = (await (await client.post("/tokenize", json={"messages": HI})).json())["tokens"]
    assert body["usage"]["prompt_tokens"] == len(ids)


async def test_chat_stream_sends_the_role_first_then_content_then_usage(client):
    req = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you"}]}],
           "max_tokens": 8, **GREEDY}
    full = await (await client.post("/v1/chat/completions", json=req)).json()
    events = await sse_events(await client.post("/v1/chat/completions", json={
        **req, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"] == full["usage"]


async def test_response_role_and_continuing_the_final_message(engine):
    async with serve_app(engine, response_role="bot") as c:
        body = await (await c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})).json()
        assert body["choices"][0]["message"]["role"] == "bot"
        msgs = [*HI, {"role": "assistant", "content": "Well"}]
        tok = await (await c.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False,
                                                     "continue_final_message": True})).json()
        text = c.engine.tokenizer.decode(tok["tokens"])
        assert text.endswith("<|im_start|>assistant\nWell")
        body = await (await c.post("/v1/chat/completions", json={
            "messages": msgs, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 2})).json()
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["prompt_tokens"] == tok["count"]
        resp = await c.post("/v1/chat/completions", json={"messages": msgs, "continue_final_message": True})
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "continue_final_message"


async def test_chat_template_override_inline_and_from_a_file(engine, tmp_path):
    inline = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
    file = tmp_path / "t.jinja"
    file.write_text(inline.replace("[A]", "[B]"))
    for template, tail in ((inline, "[A]"), (str(file), "[B]")):
        async with serve_app(engine, chat_template=template) as c:
            tok = await (await c.post("/tokenize", json={"messages": HI})).json()
            assert c.engine.tokenizer.decode(tok["tokens"]) == "[user]Hi there" + tail
            body = await (await c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1})).json()
            assert body["usage"]["prompt_tokens"] == tok["count"]
    with pytest.raises(ValueError, match="chat_template"):
        ServerSettings(served_model_names=["x"], chat_template="no/such/file.jinja")


async def test_chat_template_kwargs_reach_the_template_and_reserved_ones_are_refused(engine):
    template = "{{ greeting | default('none') }}:{% for m in messages %}{{ m['content'] }}{% endfor %}"
    async with serve_app(engine, chat_template=template, default_chat_template_kwargs={"greeting": "hey"}) as c:
        decode = c.engine.tokenizer.decode
        tok = await (await c.post("/tokenize", json={"messages": HI})).json()
        assert decode(tok["tokens"]) == "hey:Hi there"
        tok = await (await c.post("/tokenize", json={"messages": HI, "chat_template_kwargs": {"greeting": "yo"}})).json()
        assert decode(tok["tokens"]) == "yo:Hi there"
        resp = await c.post("/v1/chat/completions", json={"messages": HI, "chat_template_kwargs": {"tokenize": True}})
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "chat_template_kwargs"


async def test_request_chat_template_needs_trust(engine):
    req = {"messages": HI, "max_tokens": 1, "chat_template": "{{ messages[0]['content'] }}"}
    async with serve_app(engine) as c:
        resp = await c.post("/v1/chat/completions", json=req)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "chat_template"
    async with serve_app(engine, trust_request_chat_template=True) as c:
        body = await (await c.post("/v1/chat/completions", json=req)).json()
        assert body["usage"]["prompt_tokens"] == len(c.engine.tokenizer("Hi there", add_special_tokens=False).input_ids)


def test_content_format_follows_the_template_or_the_setting():
    assert content_format_of("{% for p in message['content'] %}{{ p['text'] }}{% endfor %}") == "openai"
    assert content_format_of("{% for m in messages %}{{ m.content }}{% endfor %}") == "string"
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert normalize_message(parts, "string")["content"] == "a\nb"
    assert normalize_message({"role": "user", "content": "a"}, "openai")["content"] == [{"type": "text", "text": "a"}]
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    assert normalize_message(call, "string")["tool_calls"][0]["function"]["arguments"] == {"x": 1}


async def test_openai_content_format_gives_the_template_parts(engine):
    template = "{% for m in messages %}{% for p in m['content'] %}<{{ p['text'] }}>{% endfor %}{% endfor %}"
    async with serve_app(engine, chat_template=template, chat_template_content_format="openai") as c:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        tok = await (await c.post("/tokenize", json={"messages": msgs})).json()
        assert c.engine.tokenizer.decode(tok["tokens"]) == "<a><b>"


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"content": "no role"}], "messages"),
    ([{"role": "user", "content": 5}], "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages"),
])
async def test_bad_messages_are_400_naming_messages(client, messages, param):
    resp = await client.post("/v1/chat/completions", json={"messages": messages})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == param


async def test_chat_logprobs_fields_are_checked(client):
    resp = await client.post("/v1/chat/completions", json={"messages": HI, "top_logprobs": 2})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "top_logprobs"


async def test_tools_need_auto_tool_choice_enabled_and_a_known_named_function(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    resp = await client.post("/v1/chat/completions", json={"messages": HI, "tools": tools})
    err = (await resp.json())["error"]
    assert resp.status == 400 and err["param"] == "tool_choice" and "enable-auto-tool-choice" in err["message"]
    resp = await client.post("/v1/chat/completions", json={
        "messages": HI, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "tool_choice"
    resp = await client.post("/v1/chat/completions", json={"messages": HI, "tools": "x"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "tools"
    body = await (await client.post("/v1/chat/completions", json={
        "messages": HI, "tools": tools, "tool_choice": "none", "max_tokens": 2})).json()
    assert body["choices"][0]["message"]["tool_calls"] == []


async def test_named_tool_choice_returns_the_output_as_the_call_arguments(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    req = {"messages": HI, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
           "max_tokens": 5, **GREEDY}
    body = await (await client.post("/v1/chat/completions", json=req)).json()
    message = body["choices"][0]["message"]
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert message["content"] is None
    events = await sse_events(await client.post("/v1/chat/completions", json={**req, "stream": True}))
    deltas = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["function"]["arguments"] == ""
    assert "".join(d["function"]["arguments"] for d in deltas) == call["function"]["arguments"]


def test_tool_prompt_reaches_the_template(engine):
    """Tools go to the chat template as given."""
    renderer = ChatRenderer(engine.tokenizer, ServerSettings(
        served_model_names=["x"], chat_template="{{ tools | tojson }}|{{ messages[0]['content'] }}"))
    tools = [{"type": "function", "function": {"name": "f"}}]
    text = renderer.render_text(HI, tools=tools)
    assert orjson.loads(text.split("|")[0]) == tools
