"""The official openai SDK (async and sync, streaming and not) against a real server."""

from __future__ import annotations

import asyncio

import openai
import pytest

from .conftest import serve_app


@pytest.fixture
async def sdk_server(engine):
    async with serve_app(engine, api_key="sdk-key") as c:
        yield c, str(c.make_url("/v1"))


async def test_async_sdk_chat_and_completions_streaming_and_not(sdk_server):
    c, base = sdk_server
    api = openai.AsyncOpenAI(base_url=base, api_key="sdk-key", max_retries=0)
    try:
        models = await api.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        chat = await api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
        stream = await api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=5, temperature=0, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text == chat.choices[0].message.content and usage.completion_tokens == 5
        comp = await api.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0,
                                            extra_body={"ignore_eos": True})
        assert comp.usage.completion_tokens == 4
        pieces = [ch.choices[0].text async for ch in await api.completions.create(
            model="tiny", prompt="Hello", max_tokens=4, temperature=0, stream=True, extra_body={"ignore_eos": True})]
        assert "".join(pieces) == comp.choices[0].text
        with pytest.raises(openai.BadRequestError):
            await api.completions.create(model="tiny", prompt="x", temperature=-1)
        with pytest.raises(openai.NotFoundError):
            await api.completions.create(model="other", prompt="x")
    finally:
        await api.close()
    bad = openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    await bad.close()


async def test_sync_sdk_in_a_thread(sdk_server):
    _, base = sdk_server

    def run() -> tuple[str, str]:
        with openai.OpenAI(base_url=base, api_key="sdk-key", max_retries=0) as api:
            whole = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Yo"}], max_tokens=4,
                                                temperature=0, extra_body={"ignore_eos": True})
            streamed = "".join(ch.choices[0].delta.content or "" for ch in api.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Yo"}], max_tokens=4, temperature=0, stream=True,
                extra_body={"ignore_eos": True}))
            return whole.choices[0].message.content, streamed

    whole, streamed = await asyncio.to_thread(run)
    assert whole == streamed
