"""`aio-engine serve`: flags built from EngineArgs, clear errors, and a real server process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from aio_engine.cli import engine_args_from, make_parser
from aio_engine.config import EngineArgs, parse_size


def parse(*argv: str) -> EngineArgs:
    return engine_args_from(make_parser().parse_args(["serve", *argv]))


def test_every_engine_arg_is_a_flag_with_help():
    help_text = make_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in EngineArgs.field_names():
        assert "--" + name.replace("_", "-") in help_text, name


def test_flags_map_onto_engine_args_and_defaults_stay():
    args = parse("some/model", "--block-size", "32", "--no-enable-prefix-caching", "--max-model-len", "1k",
                 "--override-generation-config", '{"temperature": 0.5}', "--served-model-name", "a", "b")
    assert args.model == "some/model"
    assert args.block_size == 32
    assert args.enable_prefix_caching is False
    assert parse_size(args.max_model_len) == 1000
    assert args.override_generation_config == {"temperature": 0.5}
    assert args.served_model_name == ["a", "b"]
    assert parse().max_num_seqs == EngineArgs().max_num_seqs
    assert parse("--enable-prefix-caching").enable_prefix_caching is True


@pytest.mark.parametrize("value, expected", [("2048", 2048), ("32k", 32000), ("32K", 32768), ("1M", 2**20), ("auto", None)])
def test_max_model_len_forms(value, expected):
    assert parse_size(value) == expected


def test_invalid_choice_and_bad_json_exit_with_usage_error():
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--block-size", "7"])
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--hf-overrides", "{bad"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_impossible_setting_exits_with_a_clear_message(tiny_models):
    proc = subprocess.run([sys.executable, "-m", "aio_engine.cli", "serve", str(tiny_models["llama"]),
                           "--max-model-len", "100000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "max_model_len (100000) is larger than the model's limit (512)" in proc.stderr


def test_serve_without_a_model_serves_the_embedded_default():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aio_engine.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(proc.stdout.read() if proc.poll() is not None else "no /health in 120 s") from None
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "Hello! Who are you?"}], "max_tokens": 24,
                           "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        text = reply["choices"][0]["message"]["content"]
        assert reply["usage"]["completion_tokens"] >= 1
        # A readable reply: mostly letters, spaces and punctuation, not byte noise.
        assert text and sum(ch.isalpha() or ch.isspace() or ch in ".,;:!?'-\"" for ch in text) / len(text) > 0.9, text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
