"""n > 1, logprobs (completions and chat shapes), echo with prompt logprobs, seeds."""

from __future__ import annotations

from .conftest import sse_events

HI = [{"role": "user", "content": "Hi"}]


async def test_n_samples_per_prompt_are_numbered_prompt_major(client):
    body = await (await client.post("/v1/completions", json={"prompt": ["a b", "c"], "n": 2, "max_tokens": 4,
                                                              "ignore_eos": True})).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 16
    prompt_tokens = sum(len(client.engine.tokenizer(p).input_ids) for p in ("a b", "c"))
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    events = await sse_events(await client.post("/v1/chat/completions", json={
        "messages": HI, "n": 3, "max_tokens": 4, "ignore_eos": True, "stream": True}))
    roles = [e["choices"][0]["index"] for e in events if "role" in e["choices"][0]["delta"]]
    assert roles == [0, 1, 2]
    finished = {e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"] == "length"}
    assert finished == {0, 1, 2}


async def test_same_seed_same_text(client):
    req = {"prompt": "seeded", "max_tokens": 8, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    a = await (await client.post("/v1/completions", json=req)).json()
    b = await (await client.post("/v1/completions", json=req)).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def _check_completion_logprobs(lp: dict, count: int, top: int) -> None:
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == count
    assert all(v is None or v <= 0 for v in lp["token_logprobs"])
    assert all(t is None or 1 <= len(t) <= top for t in lp["top_logprobs"])
    offsets = [lp["text_offset"][0]]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets


async def test_completion_logprobs_whole_streamed_and_echoed(client):
    req = {"prompt": "Hello world", "max_tokens": 5, "logprobs": 2, "temperature": 0, "ignore_eos": True}
    body = await (await client.post("/v1/completions", json=req)).json()
    lp = body["choices"][0]["logprobs"]
    _check_completion_logprobs(lp, 5, 2)
    assert lp["text_offset"][0] == 0
    events = await sse_events(await client.post("/v1/completions", json={**req, "stream": True}))
    streamed = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]
    echoed = await (await client.post("/v1/completions", json={**req, "echo": True})).json()
    elp = echoed["choices"][0]["logprobs"]
    prompt_len = echoed["usage"]["prompt_tokens"]
    _check_completion_logprobs(elp, prompt_len + 5, 2)
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    assert elp["tokens"][prompt_len:] == lp["tokens"]


async def test_chat_logprobs_whole_and_streamed(client):
    req = {"messages": HI, "max_tokens": 5, "logprobs": True, "top_logprobs": 2, "temperature": 0, "ignore_eos": True}
    body = await (await client.post("/v1/chat/completions", json=req)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(values) == 2 and values == sorted(values, reverse=True) and entry["logprob"] <= values[0] + 1e-6
    events = await sse_events(await client.post("/v1/chat/completions", json={**req, "stream": True}))
    streamed = [t for e in events if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]
    plain = await (await client.post("/v1/chat/completions", json={**req, "top_logprobs": None})).json()
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])
    ids = await (await client.post("/v1/chat/completions", json={**req, "return_tokens_as_token_ids": True})).json()
    tokens = ids["choices"][0]["logprobs"]["content"]
    assert all(t["token"].startswith("token_id:") for t in tokens)
    decoded = client.engine.tokenizer.decode([int(t["token"].split(":")[1]) for t in tokens])
    assert decoded == body["choices"][0]["message"]["content"]
