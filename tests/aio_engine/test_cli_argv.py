"""The command line before argparse: --config YAML files (command line > file > defaults), JSON
arguments in whole, dotted and `+` forms, underscores in flag names."""

from __future__ import annotations

import pytest

from aio_engine.cli import engine_args_from, parse_serve_args
from aio_engine.cli.serve import server_settings_from


@pytest.fixture(autouse=True)
def _collect():
    """Parsing only, no engine: skip the shared per-test gc.collect."""
    yield


def engine(*argv: str):
    return engine_args_from(parse_serve_args(list(argv)))


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        engine(*argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# --- JSON arguments ---
@pytest.mark.parametrize("argv", [
    ["--hf-overrides", '{"a": {"b": 1}, "c": "x"}'],
    ["--hf-overrides.a.b", "1", "--hf-overrides.c", "x"],
    ["--hf-overrides.a.b=1", "--hf-overrides.c=x"],
    ["--hf_overrides.a.b=1", "--hf-overrides", '{"c": "x"}'],
    ["--hf-overrides", '{"a": {"b": 0}, "c": "x"}', "--hf-overrides.a.b", "1"],
])
def test_json_argument_whole_and_dotted_forms_are_equal(argv):
    assert engine(*argv).hf_overrides == {"a": {"b": 1}, "c": "x"}


@pytest.mark.parametrize("text, value", [
    ("1", 1), ("1.5", 1.5), ("true", True), ("false", False), ("null", None), ("NONE", "NONE"),
    ('"quoted"', "quoted"), ("[1, 2]", [1, 2]), ('{"x": 1}', {"x": 1}), ("a b", "a b"),
])
def test_dotted_values_are_json_where_they_parse(text, value):
    assert engine("-cc.key", text).compilation_config == {"key": value}


def test_plus_appends_list_items():
    args = engine("-cc.cudagraph_capture_sizes+", "1", "-cc.cudagraph_capture_sizes+=2,4",
                  "--compilation-config.cudagraph_capture_sizes+", "[8, 16]", "--hf-overrides.names+=a,b")
    assert args.compilation_config == {"cudagraph_capture_sizes": [1, 2, 4, 8, 16]}
    assert args.hf_overrides == {"names": ["a", "b"]}
    # + appends to what an earlier whole value set; a later plain key replaces it
    assert engine("-cc", '{"cudagraph_capture_sizes": [1]}', "-cc.cudagraph_capture_sizes+", "2"
                  ).compilation_config == {"cudagraph_capture_sizes": [1, 2]}
    assert engine("-cc.cudagraph_capture_sizes+", "2", "-cc.cudagraph_capture_sizes", "[4]"
                  ).compilation_config == {"cudagraph_capture_sizes": [4]}


def test_json_fragments_keep_their_place_before_a_positional_model():
    args = engine("--served-model-name", "a", "-cc.mode", "none", "--hf-overrides.x=1", "--block-size", "32")
    assert (args.served_model_name, args.compilation_config, args.hf_overrides) == (["a"], {"mode": "none"}, {"x": 1})
    args = engine("my/model", "-so.disable_any_whitespace=true")
    assert args.model == "my/model" and args.structured_outputs_config == {"disable_any_whitespace": True}


@pytest.mark.parametrize("argv, message", [
    (["--max-model-len.x", "1"], "--max-model-len: not a JSON argument"),
    (["--hf-overrides+", "1"], "'+' appends to a list inside the JSON object"),
    (["--hf-overrides.a"], "expected one argument"),
    (["--hf-overrides", "[1, 2]"], "must be a JSON object"),
    (["--hf-overrides", "{bad"], "not valid JSON"),
    (["--hf-overrides.a..b", "1"], "empty key"),
    (["--hf-overrides.a=1", "--hf-overrides.a+=2"], "'+' appends to a list, but a is 1"),
])
def test_malformed_json_arguments_are_usage_errors(argv, message, capsys):
    assert message in refused(argv, capsys)


def test_underscores_in_flag_names_are_dashes():
    args = engine("--max_model_len", "1k", "--enable_prefix_caching", "--no-async_scheduling",
                  "--structured_outputs_config.compile_threads=2")
    assert (args.max_model_len, args.enable_prefix_caching, args.async_scheduling) == (1000, True, False)
    assert args.structured_outputs_config == {"compile_threads": 2}


def test_negative_numbers_are_values_not_flags():
    assert engine("--max-logprobs", "-1", "--seed", "-3").max_logprobs == -1


# --- --config FILE.yaml ---
CONFIG = """\
model: from/config
max-model-len: 2k
max_num_seqs: 32
enable-prefix-caching: false
async_scheduling: true
served-model-name: [one, two]
compilation-config:
  mode: none
  cudagraph_capture_sizes: [1, 2]
hf_overrides: {rope_theta: 5}
O: 1
port: 9001
disable-uvicorn-access-log: true
allowed-origins: ["http://a"]
api-key: from-config
chat-template: null
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(CONFIG)
    return path


def test_config_file_fills_flags(config_file):
    ns = parse_serve_args(["--config", str(config_file)])
    args = engine_args_from(ns)
    settings = server_settings_from(ns, {}, ["m"])
    assert args.model == "from/config" and args.max_model_len == 2000 and args.max_num_seqs == 32
    assert args.enable_prefix_caching is False and args.async_scheduling is True
    assert args.served_model_name == ["one", "two"] and args.optimization_level == 1
    assert args.compilation_config == {"mode": "none", "cudagraph_capture_sizes": [1, 2]}
    assert args.hf_overrides == {"rope_theta": 5}
    assert ns.port == 9001 and settings.access_log is False and settings.allowed_origins == ["http://a"]
    assert settings.api_key == "from-config" and settings.chat_template is None


def test_command_line_wins_over_config_file_which_wins_over_defaults(config_file):
    ns = parse_serve_args(["cli/model", "--max-model-len", "4k", f"--config={config_file}", "--enable-prefix-caching",
                           "-O3", "-cc.mode=compile", "-cc.cudagraph_capture_sizes+=4", "--served-model-name", "cli"])
    args = engine_args_from(ns)
    assert args.model == "cli/model" and args.max_model_len == 4000 and args.enable_prefix_caching is True
    assert args.optimization_level == 3 and args.served_model_name == ["cli"]
    assert args.compilation_config == {"mode": "compile", "cudagraph_capture_sizes": [1, 2, 4]}
    assert args.max_num_seqs == 32  # from the file
    assert args.block_size == 16  # default


def test_config_file_list_flag_does_not_swallow_the_positional_model(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("served-model-name: [x, y]\n")
    args = engine("my/model", "--config", str(path))
    assert args.model == "my/model" and args.served_model_name == ["x", "y"]


@pytest.mark.parametrize("text, message", [
    ("max-model-length: 4k\n", "unknown key 'max-model-length'"),
    ("no-enable-prefix-caching: true\n", "unknown key 'no-enable-prefix-caching'"),
    ("enable-prefix-caching: maybe\n", "takes true or false"),
    ("- a\n- b\n", "must be a mapping"),
    ("block-size: 7\n", "invalid choice"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_config_files_are_usage_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert message in refused(["--config", str(path)], capsys)


def test_config_file_errors_name_the_file_problem(tmp_path, capsys):
    assert "must be .yaml or .yml" in refused(["--config", str(tmp_path / "c.json")], capsys)
    assert "cannot read it" in refused(["--config", str(tmp_path / "missing.yaml")], capsys)
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    assert "more than once" in refused(["--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "a.yaml")],
                                       capsys)


def test_config_file_keys_of_missing_features_say_not_supported(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("enable-lora: true\n")
    assert "not supported yet: --enable-lora" in refused(["--config", str(path)], capsys)
    path.write_text("enable-lora: false\npipeline-parallel-size: 1\n")
    assert engine("--config", str(path)).model is None
