"""`aio-engine serve` flags: every EngineArgs and ServerSettings field parses to its value, keeps its
default when not given, and refuses bad values; vLLM flags of missing features say so."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from aio_engine.cli import engine_args_from, main, make_parser, parse_serve_args
from aio_engine.cli.flags import NOT_SUPPORTED
from aio_engine.cli.serve import log_level, server_settings_from
from aio_engine.config import EngineArgs
from web.settings import ServerSettings


@pytest.fixture(autouse=True)
def _collect():
    """Parsing only, no engine: skip the shared per-test gc.collect (0.1 s a test with torch loaded)."""
    yield


def engine(*argv: str) -> EngineArgs:
    return engine_args_from(parse_serve_args(list(argv)))


def server(*argv: str, environ: dict | None = None) -> ServerSettings:
    return server_settings_from(parse_serve_args(list(argv)), environ or {}, ["m"])


# field: (argv, expected value, a bad value's argv or None)
ENGINE_FLAGS = {
    "model": (["--model", "some/folder"], "some/folder", None),
    "tokenizer": (["--tokenizer", "tok"], "tok", None),
    "tokenizer_mode": (["--tokenizer-mode", "slow"], "slow", ["--tokenizer-mode", "fast"]),
    "skip_tokenizer_init": (["--skip-tokenizer-init"], True, ["--skip-tokenizer-init=yes"]),
    "trust_remote_code": (["--trust-remote-code"], True, None),
    "revision": (["--revision", "main"], "main", None),
    "dtype": (["--dtype", "bfloat16"], "bfloat16", ["--dtype", "int8"]),
    "seed": (["--seed", "7"], 7, ["--seed", "x"]),
    "max_model_len": (["--max-model-len", "32k"], 32000, ["--max-model-len", "12x"]),
    "served_model_name": (["--served-model-name", "a", "b"], ["a", "b"], ["--served-model-name"]),
    "generation_config": (["--generation-config", "vllm"], "vllm", None),
    "override_generation_config": (["--override-generation-config", '{"temperature": 0.5}'], {"temperature": 0.5},
                                   ["--override-generation-config", "{bad"]),
    "hf_overrides": (["--hf-overrides.rope_theta", "1e6"], {"rope_theta": 1e6}, ["--hf-overrides", "[1]"]),
    "hf_config_path": (["--hf-config-path", "cfg"], "cfg", None),
    "max_logprobs": (["--max-logprobs", "-1"], -1, ["--max-logprobs", "many"]),
    "logprobs_mode": (["--logprobs-mode", "processed_logprobs"], "processed_logprobs", ["--logprobs-mode", "x"]),
    "disable_sliding_window": (["--disable-sliding-window"], True, None),
    "device": (["--device", "cpu"], "cpu", ["--device", "tpu"]),
    "load_format": (["--load-format", "dummy"], "dummy", ["--load-format", "zip"]),
    "download_dir": (["--download-dir", "/tmp/x"], "/tmp/x", None),
    "use_tqdm_on_load": (["--no-use-tqdm-on-load"], False, None),
    "ignore_patterns": (["--ignore-patterns", "original/**", "*.pt"], ["original/**", "*.pt"], None),
    "safetensors_load_strategy": (["--safetensors-load-strategy", "eager"], "eager",
                                  ["--safetensors-load-strategy", "torchao"]),
    "block_size": (["--block-size", "32"], 32, ["--block-size", "7"]),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5, ["--gpu-memory-utilization", "high"]),
    "kv_cache_memory_bytes": (["--kv-cache-memory-bytes", "2G"], 2 * 2**30, ["--kv-cache-memory-bytes", "lots"]),
    "num_gpu_blocks_override": (["--num-gpu-blocks-override", "100"], 100, ["--num-gpu-blocks-override", "1.5"]),
    "enable_prefix_caching": (["--no-enable-prefix-caching"], False, None),
    "prefix_caching_hash_algo": (["--prefix-caching-hash-algo", "xxhash"], "xxhash", ["--prefix-caching-hash-algo", "md5"]),
    "kv_cache_dtype": (["--kv-cache-dtype", "float16"], "float16", ["--kv-cache-dtype", "int4"]),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "8k"], 8000, ["--max-num-batched-tokens", "8q"]),
    "max_num_seqs": (["--max-num-seqs", "64"], 64, ["--max-num-seqs", "sixty"]),
    "scheduling_policy": (["--scheduling-policy", "priority"], "priority", ["--scheduling-policy", "lifo"]),
    "enable_chunked_prefill": (["--no-enable-chunked-prefill"], False, None),
    "async_scheduling": (["--no-async-scheduling"], False, None),
    "stream_interval": (["--stream-interval", "4"], 4, ["--stream-interval", "often"]),
    "optimization_level": (["-O3"], 3, ["-O", "4"]),
    "enforce_eager": (["--enforce-eager"], True, None),
    "cudagraph_capture_sizes": (["--cudagraph-capture-sizes", "1", "2", "4"], [1, 2, 4],
                                ["--cudagraph-capture-sizes", "one"]),
    "max_cudagraph_capture_size": (["--max-cudagraph-capture-size", "64"], 64, ["--max-cudagraph-capture-size", "x"]),
    "compilation_config": (["-cc.cudagraph_mode=NONE"], {"cudagraph_mode": "NONE"}, ["-cc", "NONE"]),
    "structured_outputs_config": (["-so.disable_any_whitespace=true"], {"disable_any_whitespace": True},
                                  ["--structured-outputs-config", "{"]),
    "tensor_parallel_size": (["-tp", "1"], 1, ["-tp", "two"]),
    "data_parallel_size": (["-dp", "1"], 1, ["-dp", "one"]),
    "distributed_executor_backend": (["--distributed-executor-backend", "uni"], "uni",
                                     ["--distributed-executor-backend", "nccl"]),
    "disable_log_stats": (["--disable-log-stats"], True, None),
}

SERVER_FLAGS = {
    "api_key": (["--api-key", "k"], "k", None),
    "response_role": (["--response-role", "bot"], "bot", None),
    "max_body_bytes": (["--max-body-bytes", "1M"], 2**20, ["--max-body-bytes", "0"]),
    "chat_template": (["--chat-template", "{{ messages }}"], "{{ messages }}", ["--chat-template", "no-such-file"]),
    "chat_template_content_format": (["--chat-template-content-format", "openai"], "openai",
                                     ["--chat-template-content-format", "xml"]),
    "trust_request_chat_template": (["--trust-request-chat-template"], True, None),
    "default_chat_template_kwargs": (["--default-chat-template-kwargs.enable_thinking", "false"],
                                     {"enable_thinking": False}, ["--default-chat-template-kwargs", "1"]),
    "enable_auto_tool_choice": (["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], True,
                                ["--enable-auto-tool-choice"]),
    "tool_call_parser": (["--tool-call-parser", "hermes"], "hermes", ["--tool-call-parser", "nope"]),
    "exclude_tools_when_tool_choice_none": (["--exclude-tools-when-tool-choice-none"], True, None),
    "reasoning_parser": (["--reasoning-parser", "qwen3"], "qwen3", ["--reasoning-parser", "nope"]),
    "return_tokens_as_token_ids": (["--return-tokens-as-token-ids"], True, None),
    "enable_prompt_tokens_details": (["--enable-prompt-tokens-details"], True, None),
    "enable_force_include_usage": (["--enable-force-include-usage"], True, None),
    "max_waiting_requests": (["--max-waiting-requests", "10"], 10, ["--max-waiting-requests", "-1"]),
    "enable_server_load_tracking": (["--enable-server-load-tracking"], True, None),
    "allowed_origins": (["--allowed-origins", "http://a", "http://b"], ["http://a", "http://b"], None),
    "allowed_methods": (["--allowed-methods", '["GET", "POST"]'], ["GET", "POST"], None),
    "allowed_headers": (["--allowed-headers", "X-A"], ["X-A"], None),
    "allow_credentials": (["--allow-credentials"], True, None),
    "root_path": (["--root-path", "api/"], "/api", None),
    "enable_request_id_headers": (["--enable-request-id-headers"], True, None),
    "access_log": (["--disable-uvicorn-access-log"], False, None),
    "ssl_keyfile": (["--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem"], "k.pem", ["--ssl-keyfile", "k.pem"]),
    "ssl_certfile": (["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"], "c.pem", ["--ssl-certfile", "c.pem"]),
    "ssl_ca_certs": (["--ssl-ca-certs", "ca.pem"], "ca.pem", None),
    "ssl_cert_reqs": (["--ssl-cert-reqs", "2"], 2, ["--ssl-cert-reqs", "5"]),
    "uds": (["--uds", "/tmp/aio.sock"], "/tmp/aio.sock", None),
    "h11_max_incomplete_event_size": (["--h11-max-incomplete-event-size", "32k"], 32000,
                                      ["--h11-max-incomplete-event-size", "0"]),
    "h11_max_header_count": (["--h11-max-header-count", "100"], 100, ["--h11-max-header-count", "many"]),
    "enable_log_requests": (["--enable-log-requests"], True, None),
    "enable_log_outputs": (["--enable-log-outputs"], True, None),
    "max_log_len": (["--max-log-len", "100"], 100, ["--max-log-len", "-5"]),
    "log_error_stack": (["--log-error-stack"], True, None),
    "ws_max_message_bytes": (["--ws-max-message-bytes", "1M"], 2**20, ["--ws-max-message-bytes", "big"]),
    "enable_chat_page": (["--no-enable-chat-page"], False, None),
    "engine_process": (["--no-engine-process"], False, None),
}


def test_every_engine_and_server_field_has_a_row_here():
    assert set(ENGINE_FLAGS) == {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(SERVER_FLAGS) == {f.name for f in dataclasses.fields(ServerSettings) if f.metadata.get("cli", True)}


@pytest.mark.parametrize("name", list(ENGINE_FLAGS))
def test_engine_flag_sets_its_field(name):
    argv, expected, _ = ENGINE_FLAGS[name]
    value = getattr(engine(*argv), name)
    assert value == expected and type(value) is type(expected), (value, expected)


@pytest.mark.parametrize("name", list(SERVER_FLAGS))
def test_server_flag_sets_its_field(name):
    argv, expected, _ = SERVER_FLAGS[name]
    value = getattr(server(*argv), name)
    assert value == expected and type(value) is type(expected), (value, expected)


def test_fields_not_given_keep_their_defaults():
    assert engine() == EngineArgs()
    assert server() == ServerSettings(served_model_names=["m"])
    ns = parse_serve_args([])
    assert (ns.host, ns.port, ns.log_level) == ("127.0.0.1", 8000, None)


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises((SystemExit, ValueError)) as info:
        ns = parse_serve_args(argv)
        engine_args_from(ns)
        server_settings_from(ns, {}, ["m"])
    if info.type is SystemExit:
        assert info.value.code == 2
        return capsys.readouterr().err
    return str(info.value)


@pytest.mark.parametrize("name", [n for n, row in ENGINE_FLAGS.items() if row[2]])
def test_engine_flag_refuses_a_bad_value(name, capsys):
    bad = ENGINE_FLAGS[name][2]
    message = _refused(bad, capsys)
    assert bad[0].split(".")[0].split("=")[0] in message or "argument" in message, message


@pytest.mark.parametrize("name", [n for n, row in SERVER_FLAGS.items() if row[2]])
def test_server_flag_refuses_a_bad_value(name, capsys):
    message = _refused(SERVER_FLAGS[name][2], capsys)
    assert name in message or SERVER_FLAGS[name][2][0] in message, message


@pytest.mark.parametrize("argv", [["-O0"], ["-O", "0"], ["-O=0"], ["--optimization-level", "0"],
                                  ["--optimization-level=0"], ["--optimization_level", "0"]])
def test_optimization_level_forms(argv):
    assert engine(*argv).optimization_level == 0
    assert engine(*argv, "-O3").optimization_level == 3  # the last one wins


@pytest.mark.parametrize("value, expected", [("2048", 2048), ("32k", 32000), ("32K", 32768), ("1M", 2**20),
                                             ("0.5k", 500), ("auto", None), ("-1", None)])
def test_max_model_len_forms(value, expected):
    assert engine("--max-model-len", value).max_model_len == expected


def test_positional_model_and_model_flag():
    assert engine("some/model").model == "some/model"
    assert engine("--model", "x", "x").model == "x"
    with pytest.raises(ValueError, match="given twice"):
        engine("a", "--model", "b")


@pytest.mark.parametrize("argv, shown", [
    (["--enable-lora"], "--enable-lora"),
    (["--max-loras", "4"], "--max-loras 4"),
    (["--lora-modules", "a=/x", "b=/y"], "--lora-modules a=/x b=/y"),
    (["--limit-mm-per-prompt", '{"image": 2}'], '--limit-mm-per-prompt {"image": 2}'),
    (["--speculative-config", '{"model": "x"}'], '--speculative-config {"model": "x"}'),
    (["--speculative-config.num_speculative_tokens", "3"], "--speculative-config"),
    (["--enable-expert-parallel"], "--enable-expert-parallel"),
    (["-pp", "2"], "-pp (--pipeline-parallel-size) 2"),
    (["--pipeline-parallel-size", "4"], "--pipeline-parallel-size 4"),
    (["-q", "fp8"], "-q (--quantization) fp8"),
    (["--quantization", "awq"], "--quantization awq"),
    (["-tp", "2"], "--tensor-parallel-size 2"),
    (["--data-parallel-size", "4"], "--data-parallel-size 4"),
    (["--distributed-executor-backend", "ray"], "--distributed-executor-backend ray"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8"),
    (["--load-format", "gguf"], "--load-format gguf"),
    (["--swap-space", "4"], "--swap-space 4"),
])
def test_flags_of_missing_features_exit_not_supported_yet(argv, shown, capsys):
    with pytest.raises(SystemExit) as info:
        engine(*argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"aio-engine: error: not supported yet: {shown}"


@pytest.mark.parametrize("argv", [["--no-enable-lora"], ["-pp", "1"], ["--quantization", "none"], ["-dcp", "1"],
                                  ["--distributed-executor-backend", "mp"], ["--runner", "generate"], ["-tp", "1"]])
def test_off_values_of_missing_features_are_accepted(argv):
    assert engine(*argv) == EngineArgs(**({"distributed_executor_backend": "mp"} if "mp" in argv else {}))


def test_an_accepted_off_value_leaves_the_positional_model_alone():
    assert engine("-pp", "1", "my/model").model == "my/model"
    assert engine("--no-enable-lora", "my/model").model == "my/model"


def test_not_supported_through_main_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--enable-lora"])
    assert info.value.code == 2
    assert "aio-engine: error: not supported yet: --enable-lora" in capsys.readouterr().err


def test_every_not_supported_flag_is_registered():
    serve = make_parser()._subparsers._group_actions[0].choices["serve"]
    for flags, _, _ in NOT_SUPPORTED:
        for flag in flags:
            assert flag in serve._option_string_actions, flag


def test_environment_sets_log_level_and_api_key_flags_win():
    assert log_level(None, {}) == logging.INFO
    assert log_level(None, {"AIO_ENGINE_LOGGING_LEVEL": "DEBUG"}) == logging.DEBUG
    assert log_level("warning", {"AIO_ENGINE_LOGGING_LEVEL": "debug"}) == logging.WARNING
    assert log_level("trace", {}) == logging.DEBUG
    assert parse_serve_args(["--uvicorn-log-level", "error"]).log_level == "error"
    with pytest.raises(ValueError, match="AIO_ENGINE_LOGGING_LEVEL"):
        log_level(None, {"AIO_ENGINE_LOGGING_LEVEL": "loud"})
    assert server(environ={"AIO_ENGINE_API_KEY": "env-key"}).api_key == "env-key"
    assert server("--api-key", "flag-key", environ={"AIO_ENGINE_API_KEY": "env-key"}).api_key == "flag-key"
    assert server().api_key is None
