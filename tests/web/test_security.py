"""API key, CORS, TLS and root_path."""

from __future__ import annotations

import socket
import ssl
import subprocess

import aiohttp
import pytest

from web.app import start_server
from web.client import AsyncClient
from web.settings import ServerSettings, build_ssl_context

from .conftest import serve_app


async def test_api_key_guards_v1_routes_and_the_websocket(engine):
    async with serve_app(engine, api_key="sekret") as c:
        resp = await c.get("/v1/models")
        assert resp.status == 401 and (await resp.json())["error"]["type"] == "AuthenticationError"
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer sekret"})).status == 200
        assert (await c.post("/v1/completions", json={"prompt": "x"})).status == 401
        assert (await c.get("/health")).status == 200 and (await c.get("/metrics")).status == 200
        assert await c.api.models() == ["tiny"]  # the client sends its key
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await c.ws_connect("/v1/ws")
        assert e.value.status == 401
        ws = await c.ws_connect("/v1/ws?api_key=sekret")
        await ws.send_json({"type": "ping"})
        assert (await ws.receive_json())["type"] == "pong"
        await ws.close()


async def test_cors_preflight_and_headers_on_plain_and_streamed_responses(engine):
    origin = {"Origin": "https://app.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with serve_app(engine, api_key="k") as c:  # defaults: every origin, method and header
        resp = await c.options("/v1/chat/completions", headers=preflight)
        assert resp.status == 200  # answered before the key check
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "authorization"
        resp = await c.get("/health", headers=origin)
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        resp = await c.post("/v1/completions", json={"prompt": "x"}, headers=origin)
        assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == "*"
    async with serve_app(engine, allowed_origins=["https://app.example"], allowed_methods=["GET", "POST"],
                         allowed_headers=["Content-Type"], allow_credentials=True) as c:
        resp = await c.options("/v1/completions", headers={**preflight, "Access-Control-Request-Headers": "content-type"})
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Methods"] == "GET, POST"
        resp = await c.options("/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert resp.status == 400
        resp = await c.options("/v1/completions", headers={**preflight, "Access-Control-Request-Method": "DELETE"})
        assert resp.status == 400
        resp = await c.options("/v1/completions", headers=preflight)  # authorization is not allowed here
        assert resp.status == 400
        resp = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}, headers=origin)
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert resp.headers["Access-Control-Allow-Credentials"] == "true" and resp.headers["Vary"] == "Origin"
        await resp.read()
        resp = await c.get("/health", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_root_path_serves_every_route_under_the_prefix_too(engine):
    async with serve_app(engine, root_path="/llm/") as c:
        assert c.settings.root_path == "/llm"
        assert (await c.get("/llm/health")).status == 200
        assert (await c.get("/health")).status == 200
        body = await (await c.post("/llm/v1/completions", json={"prompt": "x", "max_tokens": 1})).json()
        assert body["usage"]["completion_tokens"] == 1
        assert (await c.get("/llm")).status == 200  # the chat page


def _self_signed(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return key, cert


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ssl_settings_build_a_server_context(tmp_path):
    key, cert = _self_signed(tmp_path)
    assert build_ssl_context(ServerSettings(served_model_names=["x"])) is None
    context = build_ssl_context(ServerSettings(served_model_names=["x"], ssl_keyfile=str(key), ssl_certfile=str(cert),
                                               ssl_ca_certs=str(cert), ssl_cert_reqs=2))
    assert context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        ServerSettings(served_model_names=["x"], ssl_cert_reqs=3)
    with pytest.raises(ValueError, match="ssl_keyfile"):
        ServerSettings(served_model_names=["x"], ssl_certfile=str(cert))


async def test_server_speaks_https_with_the_configured_certificate(engine, tmp_path):
    key, cert = _self_signed(tmp_path)
    settings = ServerSettings(served_model_names=["tiny"], ssl_keyfile=str(key), ssl_certfile=str(cert))
    port = _free_port()
    runner = await start_server(engine, settings, "127.0.0.1", port)
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        async with AsyncClient(f"https://127.0.0.1:{port}", ssl=trust) as api:
            assert await api.health()
            body = await api.completions(prompt="x", max_tokens=2)
            assert body["usage"]["completion_tokens"] == 2
        async with AsyncClient(f"https://127.0.0.1:{port}") as api:  # not trusted by default
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await api.health()
    finally:
        await runner.cleanup()


def test_every_setting_carries_its_cli_help():
    import dataclasses

    for f in dataclasses.fields(ServerSettings):
        assert f.metadata.get("help"), f.name
    settings = ServerSettings(served_model_names="one", root_path="api/", default_chat_template_kwargs={"a": 1})
    assert settings.served_model_names == ["one"] and settings.root_path == "/api"
    assert ServerSettings(served_model_names=["x"]).default_chat_template_kwargs == {}
