"""`aio-engine` end to end: a real `serve` process from a YAML config plus flags, completions through
it (urllib, and the `complete` / `chat` terminal clients), SIGTERM shutdown; clear start-up errors;
the Unix socket and header limits; a latency benchmark run through `aio-engine bench`."""

from __future__ import annotations

import builtins
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from aio_engine import AsyncEngine, EngineArgs
from aio_engine.cli import main
from web.app import start_server
from web.settings import ServerSettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"no /health (exit {proc.poll()}):\n{log.read_text()}") from None
            time.sleep(0.3)


def _post(url: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def _get(url: str, key: str | None = None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


CONFIG = """\
served-model-name: [tiny]
max_model_len: 256          # the command line's --max-model-len 128 wins
max-num-seqs: 8
enable-prefix-caching: false
compilation-config: {mode: none}
disable-uvicorn-access-log: true
enable-log-requests: true
api-key: secret
"""


def test_serve_from_a_config_file_and_flags_completes_then_stops_on_sigterm(tiny_models, tmp_path, capsys,
                                                                            monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text(CONFIG)
    log = tmp_path / "server.log"
    port = _free_port()
    command = [sys.executable, "-m", "aio_engine.cli", "serve", str(tiny_models["llama"]), "--config", str(config),
               "--port", str(port), "--max-model-len", "128", "-O1", "-cc.cudagraph_mode=NONE", "--max-log-len", "40",
               "--enable-log-outputs"]
    env = {**os.environ, "AIO_ENGINE_LOGGING_LEVEL": "info"}
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
        models = _get(base + "/v1/models", "secret")["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("tiny", 128)]
        with pytest.raises(urllib.error.HTTPError) as denied:
            _get(base + "/v1/models")
        assert denied.value.code == 401

        reply = _post(base + "/v1/completions", {"model": "tiny", "prompt": "Hello world", "max_tokens": 6,
                                                  "temperature": 0, "ignore_eos": True}, "secret")
        assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"
        again = _post(base + "/v1/completions", {"prompt": "Hello world", "max_tokens": 6, "temperature": 0,
                                                  "ignore_eos": True}, "secret")
        assert again["choices"][0]["text"] == reply["choices"][0]["text"]

        # The terminal clients, streaming through web/client.py (the key from the environment).
        monkeypatch.setenv("AIO_ENGINE_API_KEY", "secret")
        main(["complete", "--url", base + "/v1", "-q", "Hello world", "--max-tokens", "6", "--temperature", "0"])
        assert capsys.readouterr().out == reply["choices"][0]["text"] + "\n"
        lines = iter(["Hi there", "exit"])
        monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
        main(["chat", "--url", base, "--max-tokens", "4", "--system-prompt", "Be brief."])
        assert capsys.readouterr().out.endswith("\n")
        with pytest.raises(SystemExit, match="the server answered 401"):
            main(["complete", "--url", base, "-q", "x", "--api-key", "wrong"])
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text
    assert "compilation config: -O1: mode=none cudagraph_mode=NONE" in text
    assert "set by the user: mode, cudagraph_mode" in text
    assert text.count("compilation config:") == 1
    assert "prompt 'Hello world'" in text  # --enable-log-requests from the file
    assert f"finished (length): {reply['choices'][0]['text']!r}" in text  # --enable-log-outputs
    assert "shut down" in text


def test_impossible_setting_exits_with_a_clear_message(tiny_models):
    proc = subprocess.run([sys.executable, "-m", "aio_engine.cli", "serve", str(tiny_models["llama"]),
                           "--max-model-len", "100000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "aio-engine: error: max_model_len (100000) is larger than the model's limit (512)" in proc.stderr


def test_serve_without_a_model_serves_the_embedded_default(tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "aio_engine.cli", "serve", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, proc, log)
        reply = _post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello! Who are you?"}],
                                                      "max_tokens": 24, "temperature": 0})
        text = reply["choices"][0]["message"]["content"]
        assert reply["usage"]["completion_tokens"] >= 1
        # A readable reply: mostly letters, spaces and punctuation, not byte noise.
        assert text and sum(ch.isalpha() or ch.isspace() or ch in ".,;:!?'-\"" for ch in text) / len(text) > 0.9, text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


async def test_unix_socket_and_header_limits(tiny_models, tmp_path):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(tiny_models["llama"]), max_model_len=128,
                                                     num_gpu_blocks_override=32))
    path = str(tmp_path / "aio.sock")
    settings = ServerSettings(served_model_names=["tiny"], uds=path, h11_max_header_count=8,
                              h11_max_incomplete_event_size=200)
    runner = await start_server(engine, settings, "unused", 0)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session:
            async with session.get("http://localhost/health") as r:
                assert r.status == 200
            async with session.get("http://localhost/health", headers={f"X-{i}": "1" for i in range(12)}) as r:
                assert r.status == 400  # more than --h11-max-header-count
            async with session.get("http://localhost/health", headers={"X-Long": "a" * 500}) as r:
                assert r.status == 400  # a field longer than --h11-max-incomplete-event-size
    finally:
        await runner.cleanup()
        await engine.shutdown()


def test_bench_latency_runs_the_benchmark_script(tiny_models, tmp_path, capfd):
    out = tmp_path / "latency.json"
    with pytest.raises(SystemExit) as info:
        main(["bench", "latency", "--model", str(tiny_models["llama"]), "--input-len", "8", "--output-len", "4",
              "--num-iters", "2", "--num-iters-warmup", "1", "--max-model-len", "64", "-O0", "--json", str(out)])
    assert info.value.code == 0, capfd.readouterr().err
    assert "ms per output token" in capfd.readouterr().out
    result = json.loads(out.read_text())
    assert (result["batch_size"], result["input_len"], result["output_len"]) == (1, 8, 4)
    assert result["ms_per_output_token"] > 0 and result["compilation"].startswith("-O0: mode=none")
