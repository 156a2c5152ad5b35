"""`aio-engine serve --help` forms, `--version`, and `aio-engine bench` dispatch."""

from __future__ import annotations

import pydoc

import pytest

from aio_engine import EngineArgs, __version__
from aio_engine.cli import GROUP_TITLES, main, make_parser, serve_parser
from aio_engine.cli import bench as bench_module


@pytest.fixture(autouse=True)
def _collect():
    """No engine here: skip the shared per-test gc.collect."""
    yield


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def test_help_lists_the_groups_and_how_to_see_more(capsys):
    code, out, _ = run(capsys, "serve", "--help")
    assert code == 0
    for title in [*GROUP_TITLES.values(), "Unsupported"]:
        assert title in out
    assert "--help=listgroup" in out and "--help=all" in out
    assert "--max-num-seqs" not in out  # the flags come with --help=<group> or --help=all
    assert run(capsys, "serve", "-h")[1] == out


def test_help_all_shows_every_flag(capsys):
    code, out, _ = run(capsys, "serve", "--help=all")
    assert code == 0
    for name in EngineArgs.field_names():
        assert "--" + name.replace("_", "-") in out, name
    for flag in ("--host", "--port", "--config", "--api-key", "--uds", "--disable-uvicorn-access-log",
                 "--uvicorn-log-level", "-O", "-tp", "-dp", "-cc", "-so", "--enable-lora"):
        assert flag in out, flag
    assert "--json-arg.key1 value1" in out  # the JSON tip


def test_help_listgroup(capsys):
    code, out, _ = run(capsys, "serve", "--help=listgroup")
    assert code == 0 and out.startswith("Config groups:")
    assert all(title in out for title in GROUP_TITLES.values())


@pytest.mark.parametrize("name", ["ModelConfig", "modelconfig", "model"])
def test_help_of_one_group(capsys, name):
    code, out, _ = run(capsys, "serve", f"--help={name}")
    assert code == 0 and out.startswith("ModelConfig:")
    assert "--max-model-len" in out and "--tokenizer-mode" in out
    assert "--block-size" not in out and "--port" not in out


@pytest.mark.parametrize("name", ["max-num-seqs", "--max-num-seqs", "max_num_seqs"])
def test_help_of_one_flag(capsys, name):
    code, out, _ = run(capsys, "serve", f"--help={name}")
    assert code == 0 and "--max-num-seqs" in out and "Most requests in one step" in out
    assert "--max-num-batched-tokens" not in out


def test_help_of_a_short_flag(capsys):
    out = run(capsys, "serve", "--help=-O")[1]
    assert "--optimization-level" in out and "-O0 eager" in out


def test_help_keyword_searches_names_then_help_texts(capsys):
    out = run(capsys, "serve", "--help=lora")[1]
    assert "Arguments matching 'lora'" in out and "--enable-lora" in out and "--max-loras" in out
    out = run(capsys, "serve", "--help=grammar")[1]  # only in help texts
    assert "--structured-outputs-config" in out


def test_help_without_a_match_says_so_and_fails(capsys):
    code, out, _ = run(capsys, "serve", "--help=zzzz")
    assert code == 1 and "No group or argument matching 'zzzz'" in out


def test_help_page_goes_through_the_pager(capsys, monkeypatch):
    paged = []
    monkeypatch.setattr(pydoc, "pager", paged.append)
    code, out, _ = run(capsys, "serve", "--help=page")
    assert code == 0 and out == "" and len(paged) == 1 and "--max-num-seqs" in paged[0]


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"aio-engine {__version__}"


def test_top_level_help_lists_the_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in ("serve", "chat", "complete", "bench"))
    assert run(capsys)[0] == 2  # a command is required


def test_serve_parser_is_reachable_for_other_tools():
    assert "--max-num-seqs" in serve_parser(make_parser())._option_string_actions


# --- bench ---
def test_bench_lists_its_benchmarks_and_refuses_others(capsys):
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and all(k in out for k in ("throughput", "serve", "latency"))
    code, _, err = run(capsys, "bench", "offline")
    assert code == 2 and "unknown benchmark 'offline'" in err
    assert run(capsys, "bench")[0] == 2


def test_bench_without_the_benchmarks_folder_says_where_they_live(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench_module, "benchmarks_dir", lambda: tmp_path / "benchmarks")
    code, _, err = run(capsys, "bench", "throughput", "--num-prompts", "2")
    assert code == 2 and "latency" not in err and "throughput.py not found" in err and "source checkout" in err


def test_bench_runs_the_script_with_the_flags(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench_module.subprocess, "call", lambda cmd, cwd: calls.append((cmd, cwd)) or 3)
    assert run(capsys, "bench", "latency", "--input-len", "8", "-O0")[0] == 3  # the script's status
    (cmd, cwd), = calls
    assert cmd[1].endswith("benchmarks/latency.py") and cmd[2:] == ["--input-len", "8", "-O0"]
    assert (cwd / "benchmarks" / "latency.py").is_file()
