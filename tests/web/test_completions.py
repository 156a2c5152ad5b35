"""POST /v1/completions: OpenAI shapes, SSE streaming, usage options, echo, max_tokens, field errors."""

from __future__ import annotations

import pytest

from .conftest import MAX_MODEL_LEN, greedy_text, serve_app, sse_events

GREEDY = {"temperature": 0, "ignore_eos": True}


async def test_completion_has_the_openai_shape_and_the_engine_greedy_text(client):
    resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello world", "max_tokens": 7, **GREEDY})
    assert resp.status == 200
    body = await resp.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == "tiny"
    assert body["system_fingerprint"].startswith("aio-engine")
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert choice["text"] == await greedy_text(client.engine, "Hello world", 7)
    usage = body["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7 and usage["prompt_tokens"] > 0


async def test_streamed_completion_joins_to_the_whole_text_with_usage(client):
    req = {"prompt": [5, 6, 7, 8], "max_tokens": 12, **GREEDY}
    full = await (await client.post("/v1/completions", json=req)).json()
    events = await sse_events(await client.post("/v1/completions", json={
        **req, "stream": True, "stream_options": {"include_usage": True}}))
    assert len({(e["id"], e["created"], e["model"]) for e in events}) == 1
    assert all(e["object"] == "text_completion" for e in events)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == full["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    assert all("usage" not in e for e in events[:-1])


async def test_continuous_usage_stats_count_up_on_every_chunk(client):
    events = await sse_events(await client.post("/v1/completions", json={
        "prompt": "abc", "max_tokens": 10, **GREEDY, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 10
    assert all(e["usage"]["prompt_tokens"] == events[0]["usage"]["prompt_tokens"] for e in events)


async def test_stream_interval_option_flushes_every_n_tokens(client):
    events = await sse_events(await client.post("/v1/completions", json={
        "prompt": "abc", "max_tokens": 13, **GREEDY, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True, "stream_interval": 4}}))
    counts = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
    steps = [b - a for a, b in zip([0, *counts], counts)]
    assert all(s >= 4 for s in steps[:-1]) and counts[-1] == 13


async def test_echo_puts_the_prompt_first_and_max_tokens_zero_returns_it_alone(client):
    body = await (await client.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 3, "echo": True,
                                                              **GREEDY})).json()
    assert body["choices"][0]["text"] == "Hello world" + await greedy_text(client.engine, "Hello world", 3)
    events = await sse_events(await client.post("/v1/completions", json={
        "prompt": "Hello world", "max_tokens": 3, "echo": True, "stream": True, **GREEDY}))
    assert events[0]["choices"][0]["text"].startswith("Hello world")
    assert "".join(e["choices"][0]["text"] for e in events) == body["choices"][0]["text"]
    only = await (await client.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 0,
                                                              "echo": True})).json()
    assert only["choices"][0]["text"] == "Hello world"
    assert only["usage"]["completion_tokens"] == 0 and only["usage"]["prompt_tokens"] > 0


async def test_max_tokens_defaults_to_what_remains_of_the_context(client):
    prompt = list(range(10, 150))
    body = await (await client.post("/v1/completions", json={"prompt": prompt, **GREEDY})).json()
    assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - len(prompt)
    assert body["choices"][0]["finish_reason"] == "length"
    resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 50})
    err = (await resp.json())["error"]
    assert resp.status == 400 and err["param"] == "max_tokens" and str(MAX_MODEL_LEN) in err["message"]


async def test_prompts_as_text_ids_and_lists_give_one_choice_each(client):
    body = await (await client.post("/v1/completions", json={"prompt": ["a b", "c d e"], "max_tokens": 3,
                                                              **GREEDY})).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 6
    assert [c["text"] for c in body["choices"]] == [await greedy_text(client.engine, p, 3) for p in ("a b", "c d e")]
    body = await (await client.post("/v1/completions", json={"prompt": [[5, 6], [7, 8, 9]], "max_tokens": 2,
                                                              **GREEDY})).json()
    assert body["usage"]["prompt_tokens"] == 5 and len(body["choices"]) == 2
    events = await sse_events(await client.post("/v1/completions", json={
        "prompt": ["a b", "c d e"], "max_tokens": 3, "stream": True, **GREEDY}))
    assert {e["choices"][0]["index"] for e in events} == {0, 1}


async def test_stop_string_ends_the_text_and_is_reported(client):
    text = await greedy_text(client.engine, "Hello", 12)
    stop = text[4:6]
    body = await (await client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 12, "stop": [stop],
                                                              **GREEDY})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == text[:text.index(stop)]


async def test_truncate_prompt_tokens_keeps_the_last_ones(client):
    body = await (await client.post("/v1/completions", json={"prompt": list(range(20, 40)), "max_tokens": 1,
                                                              "truncate_prompt_tokens": 5})).json()
    assert body["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "top_p": 2}, 400, "top_p"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"prompt": 12}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": "x", "model": "other"}, 404, "model"),
        ({"prompt": "x", "stop": [1, 2]}, 400, "stop"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
        ({"prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"prompt": "x", "priority": 1}, 400, "priority"),
        ({"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
        ({"prompt": "x", "response_format": {"type": "yaml"}}, 400, "response_format"),
        ({"prompt": "x", "user": 5}, 400, "user"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "n": 100000}, 400, "n"),
        ({"prompt": "x", "logprobs": 10000}, 400, "logprobs"),
        ({"prompt": [99999]}, 400, "prompt"),
        ({"prompt": [1] * 600, "max_tokens": 1}, 400, "prompt"),
    ],
)
async def test_bad_fields_get_an_openai_error_naming_them(client, body, status, param):
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == status
    err = (await resp.json())["error"]
    assert err["code"] == status and err["message"] and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}


async def test_invalid_json_and_non_object_bodies(client):
    resp = await client.post("/v1/completions", data=b"{not json")
    assert resp.status == 400 and "JSON" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1/completions", data=b"[1, 2]")
    assert resp.status == 400 and "object" in (await resp.json())["error"]["message"]


async def test_the_served_name_and_alias_both_work(engine):
    async with serve_app(engine, served_model_names=["main", "alias"]) as c:
        for name in ("main", "alias"):
            body = await (await c.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})).json()
            assert body["model"] == name
        body = await (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).json()
        assert body["model"] == "main"
