"""Routes beside the OpenAI ones: tokenize/detokenize, health, ping, version, load, metrics, the chat page."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from aio_engine import __version__
from aio_engine.async_engine import EngineDeadError

from . import protocol
from .errors import RequestError
from .protocol import expect, read_json
from .responses import json_response
from .routes_openai import SERVING
from .tools import check_tools

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""
    ctx = request.app[SERVING]
    body = await read_json(request)
    ctx.check_model(body)
    if ctx.tokenizer is None:
        raise RequestError("this server runs without a tokenizer (--skip-tokenizer-init)")
    if "messages" in body:
        messages = protocol.chat_messages(body)
        tools, _ = check_tools({"tools": body.get("tools")})
        _, ids = await ctx.chat.render(
            messages, add_special_tokens=expect(body, "add_special_tokens", bool, False), tools=tools,
            add_generation_prompt=expect(body, "add_generation_prompt", bool, True),
            continue_final_message=expect(body, "continue_final_message", bool, False),
            chat_template=expect(body, "chat_template", str), kwargs=expect(body, "chat_template_kwargs", dict))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string (or give 'messages')", param="prompt")
        ids = await ctx.tokenize(prompt, expect(body, "add_special_tokens", bool, True))
    strs = ctx.tokenizer.convert_ids_to_tokens(ids) if expect(body, "return_token_strs", bool, False) else None
    return json_response({"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids, "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    ctx = request.app[SERVING]
    body = await read_json(request)
    ctx.check_model(body)
    ids = protocol.expect_int_list(body, "tokens")
    if ids is None:
        raise RequestError("'tokens' must be a list of token ids", param="tokens")
    vocab = ctx.engine.config.model.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token ids outside [0, {vocab}): {bad[:5]}", param="tokens")
    if ctx.tokenizer is None:
        raise RequestError("this server runs without a tokenizer (--skip-tokenizer-init)")
    return json_response({"prompt": ctx.tokenizer.decode(ids)})


async def health(request: web.Request) -> web.Response:
    """200 while the engine loop lives, 503 once it has died."""
    try:
        await request.app[SERVING].engine.check_health()
    except EngineDeadError as e:
        return json_response({"error": {"message": str(e), "type": "ServiceUnavailableError", "param": None,
                                        "code": 503}}, 503)
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return json_response({"version": __version__})


async def load(request: web.Request) -> web.Response:
    """Generation requests in flight (with enable_server_load_tracking)."""
    return json_response({"server_load": request.app[SERVING].load})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVING].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def chat_page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PAGE], content_type="text/html", charset="utf-8")


PAGE = web.AppKey("chat_page", bytes)


def add_routes(add, app: web.Application) -> None:
    settings = app[SERVING].settings
    add("POST", "/tokenize", tokenize)
    add("POST", "/detokenize", detokenize)
    add("GET", "/health", health)
    add("GET", "/ping", health)
    add("POST", "/ping", health)
    add("GET", "/version", version)
    add("GET", "/metrics", metrics)
    if settings.enable_server_load_tracking:
        add("GET", "/load", load)
    if settings.enable_chat_page:
        app[PAGE] = CHAT_PAGE.read_bytes()
        add("GET", "/", chat_page)
