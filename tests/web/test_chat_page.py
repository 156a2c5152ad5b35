"""The chat page (GET /) end to end in headless Chromium against a real server on 127.0.0.1.

Debian's chromium (/usr/bin/chromium; `make` installs it where apt-get exists) driven by
playwright's Python package: type a message, press Send, watch the streamed text grow, press
Stop and see the stream end (the server aborts the request and frees its blocks); then constrain
the answer with the page's JSON-schema box and validate what comes back.

The engine steps slowly here (a sleep in each launch, in its worker thread) so that a stream
lasts long enough to be watched and stopped, as a person would, whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import jsonschema
import pytest

from .conftest import MAX_MODEL_LEN, serve_app, wait_idle

CHROMIUM = Path(os.environ.get("AIO_CHROMIUM", "/usr/bin/chromium"))
# The flags this machine's Chromium needs as root with no network (playwright adds --headless).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_DELAY_S = 0.04
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
async def browser_context(tmp_path_factory):
    """One headless Chromium with a fresh profile for this module's tests."""
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: the chat page test needs Debian's chromium "
                    "(`make` installs it where apt-get exists; else `apt-get install chromium`)", pytrace=False)
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -c constraints.txt -e '.[dev]'`", pytrace=False)
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1100, "height": 720})
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
def slow_engine(engine, monkeypatch):
    """The session engine, each step held STEP_DELAY_S in its worker thread (the event loop runs on)."""
    enqueue = engine.core.enqueue

    def slow_enqueue(staged):
        time.sleep(STEP_DELAY_S)
        return enqueue(staged)

    monkeypatch.setattr(engine.core, "enqueue", slow_enqueue)
    return engine


class ChatPage:
    """The page and every websocket message it sent and received."""

    def __init__(self, page) -> None:
        self.page = page
        self.sent: list[dict] = []
        self.received: list[dict] = []
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("websocket", self._on_websocket)

    def _on_websocket(self, ws) -> None:
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    async def open(self, url: str) -> None:
        await self.page.goto(url)
        await self.page.wait_for_function("document.getElementById('status').textContent === 'connected'")
        await self.page.wait_for_function("document.getElementById('model').textContent === 'tiny'")

    async def settings(self, temperature: float, max_tokens: int) -> None:
        await self.page.fill("#temperature", str(temperature))
        await self.page.fill("#max_tokens", str(max_tokens))

    async def send(self, text: str) -> None:
        await self.page.fill("#input", text)
        await self.page.click("#send")

    async def answer(self) -> str:
        return await self.page.locator(".msg.assistant .content").last.text_content()

    async def wait_longer_than(self, n: int) -> str:
        await self.page.wait_for_function(
            "n => { const all = document.querySelectorAll('.msg.assistant .content');"
            " return all.length && all[all.length - 1].textContent.length > n; }", arg=n)
        return await self.answer()

    async def wait_done(self) -> str:
        """The assistant bubble's meta line, written when the request's `done` (or error) arrives."""
        meta = self.page.locator(".msg.assistant .meta").last
        await meta.filter(has_text="tokens").wait_for()
        return await meta.text_content()

    async def close(self) -> None:
        """Close the page, and with it its socket, before the server stops: the server waits for
        open sockets when it shuts down."""
        if not self.page.is_closed():
            await self.page.close()
        assert not self.errors, self.errors

    def messages(self, kind: str, request_id: str) -> list[dict]:
        return [m for m in self.received if m.get("type") == kind and m.get("id") == request_id]


@contextlib.asynccontextmanager
async def serve_page(engine, chat_page: ChatPage):
    """serve_app with the chat page open on it; the page closes first, pass or fail."""
    async with serve_app(engine) as server:
        try:
            await chat_page.open(str(server.make_url("/")))
            yield server
        finally:
            await chat_page.close()


@pytest.fixture
async def chat_page(browser_context):
    page = ChatPage(await browser_context.new_page())
    try:
        yield page
    finally:
        await page.close()


async def test_send_streams_text_and_stop_aborts_the_request(slow_engine, chat_page, tmp_path):
    engine = slow_engine
    max_tokens = 120
    async with serve_page(engine, chat_page):
        page = chat_page.page
        assert await page.title() == "aio-engine chat"
        # Greedy: the tiny model runs this prompt to max_tokens (sampled, it sometimes ends early).
        await chat_page.settings(temperature=0, max_tokens=max_tokens)
        await chat_page.send("Tell me a long story")
        assert await page.locator(".msg.user").last.text_content() == "Tell me a long story"
        assert await page.is_disabled("#send") and await page.is_enabled("#stop")

        # Streamed: the answer's text grows in the DOM while the request runs.
        seen = [await chat_page.wait_longer_than(0)]
        for _ in range(3):
            seen.append(await chat_page.wait_longer_than(len(seen[-1])))
        assert all(a and b.startswith(a) and len(b) > len(a) for a, b in zip(seen, seen[1:])), seen
        assert len(engine.core.scheduler.requests) == 1  # still running on the server
        await page.screenshot(path=str(tmp_path / "chat-streaming.png"))

        await page.click("#stop")
        meta = await chat_page.wait_done()
        assert meta.startswith("stopped"), meta
        assert await page.is_enabled("#send") and await page.is_disabled("#stop")
        if os.environ.get("AIO_CHAT_SCREENSHOT"):  # to look at by hand
            await page.screenshot(path=os.environ["AIO_CHAT_SCREENSHOT"])

        # What went over the socket: one request, one cancel, its last delta says abort, then done.
        request_id = chat_page.sent[0]["id"]
        assert [m["type"] for m in chat_page.sent] == ["chat.completions", "cancel"]
        body = chat_page.sent[0]["body"]
        assert body["model"] == "tiny" and body["max_tokens"] == max_tokens and body["temperature"] == 0
        assert body["messages"] == [{"role": "user", "content": "Tell me a long story"}]
        deltas = chat_page.messages("delta", request_id)
        assert deltas[-1]["chunk"]["choices"][0]["finish_reason"] == "abort"
        (done,) = chat_page.messages("done", request_id)
        assert 0 < done["usage"]["completion_tokens"] < max_tokens
        assert not chat_page.messages("error", request_id)
        streamed = "".join(d["chunk"]["choices"][0]["delta"].get("content") or "" for d in deltas)
        final = await chat_page.answer()
        assert final == streamed and final.startswith(seen[-1])
        assert f"{done['usage']['completion_tokens']} tokens" in meta

        # On the server: the request is gone at once and every KV block is free.
        await wait_idle(engine, timeout=2)
        assert engine.core.kv.num_free_blocks == engine.core.kv.num_blocks
        assert await chat_page.answer() == final  # nothing more arrives after the stop
    assert (tmp_path / "chat-streaming.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                           "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "confidence"], "additionalProperties": False}


async def test_json_schema_box_constrains_the_answer(engine, chat_page, monkeypatch):
    # The page has no whitespace switch; the engine-wide setting (-so.disable_any_whitespace=true)
    # keeps a random model from wandering in the free whitespace between JSON tokens.
    grammars = engine.core.grammars
    monkeypatch.setattr(grammars, "config", dataclasses.replace(grammars.config, disable_any_whitespace=True))
    async with serve_page(engine, chat_page):
        page = chat_page.page
        await chat_page.settings(temperature=0, max_tokens=MAX_MODEL_LEN - 60)
        await page.click("details summary")
        await page.fill("#schema", json.dumps(SCHEMA))
        await chat_page.send("Is the sky blue?")
        meta = await chat_page.wait_done()
        assert meta.startswith("stop"), meta  # the grammar completed (not "length", not an error)
        answer = await chat_page.answer()
        jsonschema.validate(json.loads(answer), SCHEMA)

        (request,) = chat_page.sent
        assert request["body"]["response_format"] == {"type": "json_schema",
                                                      "json_schema": {"name": "answer", "schema": SCHEMA}}
        (done,) = chat_page.messages("done", request["id"])
        assert done["usage"]["completion_tokens"] < MAX_MODEL_LEN - 60

        # A schema box that is not JSON is refused on the page, before anything is sent.
        await page.fill("#schema", "{not json")
        await chat_page.send("again")
        await page.locator(".msg.assistant.error").filter(has_text="invalid JSON schema").wait_for()
        assert len(chat_page.sent) == 1 and await page.is_enabled("#send")
