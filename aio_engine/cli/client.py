"""`aio-engine chat` and `aio-engine complete`: terminal clients of a running server (as vLLM's).

Both stream through web/client.py's AsyncClient. `chat` keeps the conversation and reads one
message per line until EOF (or `exit`); `complete` sends each line as a prompt. `-q TEXT` sends
one message (or prompt) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def add_client_parsers(sub) -> None:
    chat = sub.add_parser("chat", help="Chat with a running server in the terminal (streaming).",
                          description="Chat with a running aio-engine (or any OpenAI-compatible) server.")
    complete = sub.add_parser("complete", help="Complete a prompt through a running server (streaming).",
                              description="Send prompts to a running server's /v1/completions and stream the text.")
    for p in (chat, complete):
        p.add_argument("--url", default="http://localhost:8000/v1", help="The server's API base URL. (default: %(default)s)")
        p.add_argument("--model-name", default=None, help="Model to ask; default: the first one /v1/models lists.")
        p.add_argument("--api-key", default=None, help="API key; default: $AIO_ENGINE_API_KEY.")
        p.add_argument("--max-tokens", type=int, default=None, help="Most tokens per answer.")
        p.add_argument("--temperature", type=float, default=None, help="Sampling temperature.")
    chat.add_argument("--system-prompt", default=None, help="A system message to start the conversation.")
    chat.add_argument("-q", "--quick", metavar="MESSAGE", default=None, help="Send one message, print the answer, exit.")
    complete.add_argument("-q", "--quick", metavar="PROMPT", default=None, help="Complete one prompt, print it, exit.")
    chat.set_defaults(handler=lambda ns, env: _run(_chat(ns, env)))
    complete.set_defaults(handler=lambda ns, env: _run(_complete(ns, env)))


def _run(coro) -> None:
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        print(file=sys.stderr)


async def _lines(quick: str | None, prompt: str):
    """The user's messages: the one -q gave, or stdin lines until EOF / exit / quit."""
    if quick is not None:
        yield quick
        return
    while True:
        try:
            line = await asyncio.to_thread(input, prompt)
        except EOFError:
            print()
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line


async def _guarded(ns: argparse.Namespace, environ: dict[str, str], talk) -> None:
    """Run `talk(client, request fields)`; server errors and unreachable servers end with a message."""
    import aiohttp

    from web.client import APIError, AsyncClient

    base = ns.url.rstrip("/").removesuffix("/v1")
    client = AsyncClient(base, api_key=ns.api_key or environ.get("AIO_ENGINE_API_KEY"))
    try:
        model = ns.model_name or (await client.models())[0]
        body = {k: v for k, v in (("max_tokens", ns.max_tokens), ("temperature", ns.temperature)) if v is not None}
        await talk(client, {"model": model, **body})
    except APIError as e:
        raise SystemExit(f"aio-engine: error: the server answered {e}") from None
    except aiohttp.ClientError as e:
        raise SystemExit(f"aio-engine: error: cannot reach {ns.url}: {e}") from None
    finally:
        await client.close()


async def _chat(ns: argparse.Namespace, environ: dict[str, str]) -> None:
    async def talk(client, body: dict) -> None:
        messages = [{"role": "system", "content": ns.system_prompt}] if ns.system_prompt else []
        async for text in _lines(ns.quick, "> "):
            messages.append({"role": "user", "content": text})
            reply = []
            async for chunk in client.chat_stream(messages=messages, **body):
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content") or ""
                    reply.append(piece)
                    print(piece, end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": "".join(reply)})

    await _guarded(ns, environ, talk)


async def _complete(ns: argparse.Namespace, environ: dict[str, str]) -> None:
    async def talk(client, body: dict) -> None:
        async for prompt in _lines(ns.quick, "> "):
            async for chunk in client.completions_stream(prompt=prompt, **body):
                for choice in chunk.get("choices", []):
                    print(choice.get("text", ""), end="", flush=True)
            print()

    await _guarded(ns, environ, talk)
