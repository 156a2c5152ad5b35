"""The benchmark scripts' own arithmetic (GPU timelines, percentiles, log timelines, plots) and a
CPU run of idle.py: the GPU session runs them once, so they must work the first time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


def kernel(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def test_gpu_timeline_counts_overlaps_once_and_reports_the_gaps(tmp_path):
    from idle import gpu_timeline

    events = [kernel("gemm", 0, 100), kernel("attn", 50, 100),  # overlap: busy 0..150
              kernel("copy", 160, 10, "gpu_memcpy"),             # gap 10 us
              kernel("gemm", 400, 100),                           # gap 230 us
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000}]  # host: ignored
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    r = gpu_timeline(trace, steps=2)
    assert r["window_ms"] == 0.5 and r["busy_ms"] == 0.26 and r["idle_ms"] == 0.24
    assert r["idle_pct"] == 48.0 and r["idle_ms_per_step"] == 0.12 and r["gpu_ms_per_step"] == 0.25
    assert r["gaps"] == {"count": 2, "over_10us": 1, "over_100us": 1, "largest_us": [230.0, 10.0]}
    assert [(k["name"], k["calls"], k["total_ms"]) for k in r["top_kernels"]] == [
        ("gemm", 2, 0.2), ("attn", 1, 0.1), ("copy", 1, 0.01)]


class FakeEvent:
    def __init__(self, t_ms: float) -> None:
        self.t = t_ms

    def elapsed_time(self, other: FakeEvent) -> float:
        return other.t - self.t


def test_idle_from_events_sums_the_gap_before_each_steps_start():
    from idle import idle_from_marks

    # Step 1 ends at 2.0; step 2's inputs land at 2.0 (queued ahead: no gap), it ends at 4.0 (a
    # late sampling, then the true end at 4.5); step 3's inputs land at 4.8 (0.3 ms idle), ends at 7.0.
    marks = [("start", FakeEvent(0.1)), ("end", FakeEvent(2.0)), ("start", FakeEvent(2.0)), ("end", FakeEvent(4.0)),
             ("end", FakeEvent(4.5)), ("start", FakeEvent(4.8)), ("end", FakeEvent(7.0))]
    r = idle_from_marks(marks)
    assert r["window_ms"] == 5.0 and r["gaps"] == 2 and r["over_100us"] == 1
    assert abs(r["idle_ms"] - 0.3) < 1e-9 and abs(r["idle_pct"] - 6.0) < 1e-9 and r["largest_us"] == [300.0, 0.0]
    # Late sampling: step 2's inputs land at 2.1 (0.1 idle after step 1's forward), its late
    # sampling of step 1 ends at 2.6, its carried tokens are copied in at 2.9 (0.3 idle).
    marks = [("start", FakeEvent(0.1)), ("end", FakeEvent(2.0)), ("start", FakeEvent(2.1)), ("end", FakeEvent(2.6)),
             ("start", FakeEvent(2.9)), ("end", FakeEvent(5.0))]
    r = idle_from_marks(marks)
    assert abs(r["idle_ms"] - 0.4) < 1e-9 and r["window_ms"] == 3.0 and r["gaps"] == 2
    assert "gpu" in idle_from_marks([("start", FakeEvent(0)), ("end", FakeEvent(1))])
    assert "gpu" in idle_from_marks([("end", FakeEvent(1)), ("end", FakeEvent(2))])  # no step started: n/a, not 0%


def test_gpu_timeline_without_device_activity_is_not_applicable(tmp_path):
    from idle import gpu_timeline

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 5}]}))
    assert gpu_timeline(trace, steps=1)["gpu"].startswith("n/a")


def test_percentiles_are_nearest_rank():
    p = common.percentiles([i / 1000 for i in range(1, 101)], scale=1000)
    assert p == {"mean": 50.5, "p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert common.percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_emit_appends_tagged_lines_that_read_back(tmp_path, capsys):
    path = tmp_path / "out" / "results.jsonl"
    common.emit("a", {"x": 1}, jsonl_path=path)
    common.emit("b", {"x": 2}, jsonl_path=path)
    records = common.read_records([path])
    assert [(r["bench"], r["x"]) for r in records] == [("a", 1), ("b", 2)] and "date" in records[0]


def test_model_folder_and_word_level_tokenizer(tmp_path):
    assert common.model_folder(["--model", "m", "-O2"]) == Path("m")
    assert common.model_folder(["--model=m2"]) == Path("m2")
    assert common.model_folder(["m3", "--dtype", "bfloat16"]) == Path("m3")
    assert common.model_folder(["--dtype", "bfloat16"]) is None
    folder = common.word_level_tokenizer(1000, tmp_path / "tok")
    assert common.has_tokenizer(folder)
    from aio_engine.tokenizer import IncrementalDetokenizer, load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    assert len(tokenizer) == 1000
    detok = IncrementalDetokenizer(tokenizer, [1, 2], skip_special_tokens=True)
    assert [detok.step(t) for t in (999, 0, 5)] == [" w999", " w0", " w5"]


def test_startup_reads_log_times_and_passes_the_cache_folder():
    import startup

    started = 1_700_000_000.0
    import datetime

    stamp = datetime.datetime.fromtimestamp(started + 2.5).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    lines = startup.timeline(f"noise\n{stamp} INFO aio_engine.model_runner: loaded x in 0.3s\n", started)
    assert lines == [[2.5, "aio_engine.model_runner", "loaded x in 0.3s"]]
    assert startup.cache_args("-cc.cache_dir=", Path("/c")) == ["-cc.cache_dir=/c"]
    assert startup.cache_args("--compile-cache-dir", Path("/c")) == ["--compile-cache-dir", "/c"]
    assert startup.cache_args(None, Path("/c")) == []


def test_serving_reads_the_stream_interval_from_the_server_flags():
    import serving

    assert serving.stream_interval(["--model", "m", "--stream-interval", "8"]) == 8
    assert serving.stream_interval(["--stream-interval=4"]) == 4
    assert serving.stream_interval([]) == 1


def fake_records() -> list[dict]:
    q = "benchmarks/models/qwen3-0.6b"
    pct = {"mean": 10.0, "p50": 8.0, "p90": 15.0, "p99": 30.0}
    gpu = {"idle_pct": 3.0, "gpu_ms_per_step": 5.0, "idle_ms_per_step": 0.15}
    return [
        {"bench": "throughput", "model": q, "optimization_level": 0, "async_scheduling": True, "output_tokens_per_s": 4000},
        {"bench": "throughput", "model": q, "optimization_level": 2, "async_scheduling": True, "output_tokens_per_s": 15000},
        {"bench": "throughput", "model": q, "optimization_level": 2, "async_scheduling": False, "output_tokens_per_s": 12000},
        {"bench": "peer_hf", "model": q, "hf_cb_output_tok_s": 700.0, "hf_cb_requests_done": 64, "hf_num_prompts": 64,
         "ours_output_tok_s_slice": 9000.0, "hf_latency_ms_per_token": 3.9},
        {"bench": "latency", "model": "/x/qwen3-0.6b", "ms_per_output_token": 1.6},
        {"bench": "serving", "request_rate": 16.0, "stream_interval": 1, "ttft_ms": pct, "itl_ms": pct,
         "output_tokens_per_s": 8000},
        {"bench": "serving", "request_rate": "inf", "stream_interval": 8, "ttft_ms": pct,
         "itl_ms": {**pct, "p99": None}, "output_tokens_per_s": 14000},
        {"bench": "startup", "level": 0, "cache": "cold", "seconds": 12.0},
        {"bench": "startup", "level": 0, "cache": "warm", "seconds": 10.0},
        {"bench": "startup", "level": 2, "cache": "cold", "error": "timeout"},
        {"bench": "startup", "level": 2, "cache": "warm", "seconds": 40.0},
        {"bench": "idle", "driver": "core", "async_scheduling": True, "batch": 64, "model": q, "gpu": gpu,
         "timed": {"host_ms_per_step": {"host_busy": 3.0}}},
        {"bench": "idle", "driver": "core", "async_scheduling": False, "batch": 64, "model": q,
         "gpu": {**gpu, "idle_pct": 40.0, "idle_ms_per_step": 3.0}, "timed": {"host_ms_per_step": {"host_busy": 7.0}}},
        {"bench": "idle", "driver": "async", "async_scheduling": True, "gpu": {"gpu": "n/a (CPU)"}},
        {"bench": "suite", "part": "idle", "status": "ok"},
    ]


def test_plots_makes_a_png_per_benchmark(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in fake_records()))
    out = tmp_path / "plots"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plots.py"), str(results), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    made = sorted(p.name for p in out.glob("*.png"))
    assert made == ["idle.png", "latency.png", "serving.png", "startup.png", "throughput.png"]
    assert all((out / name).stat().st_size > 10_000 for name in made)


def test_idle_runs_on_cpu_and_reports_gpu_figures_as_not_applicable(tmp_path):
    out = tmp_path / "idle.jsonl"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "idle.py"), "--num-requests", "4", "--prompt-len", "8",
         "--output-len", "24", "--warmup-steps", "2", "--timed-steps", "8", "--profile-steps", "4",
         "--drivers", "async", "--max-model-len", "128", "--device", "cpu", "--jsonl", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    records = common.read_records([out])
    assert [(r["driver"], r["async_scheduling"]) for r in records] == [("async", True), ("async", False)]
    on, off = records
    assert on["timed"]["ahead"] > 0.5 and off["timed"]["ahead"] == 0.0
    assert on["batch"] == 4 and on["gpu"]["gpu"].startswith("n/a")
    assert on["timed"]["ms_per_step"] > 0 and "launch" in on["timed"]["host_ms_per_step"]
    assert on["profiled"]["ms_per_step"] > 0 and off["profiled"]["ms_per_step"] > 0
    # No timed window after a profiled one (CUPTI stays attached after torch.profiler on CUDA).
    windows = [line.rsplit(", ", 1)[1] for line in done.stdout.splitlines() if line.startswith("== idle:")]
    assert windows == ["timed window"] * 2 + ["profiled window"] * 2


def test_serving_host_streams_every_token_through_the_real_server(tmp_path):
    out = tmp_path / "host.jsonl"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving_host.py"), "--streams", "6", "--output-len", "20",
         "--max-model-len", "128", "--port", "0", "--jsonl", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    [record] = common.read_records([out])
    assert record["bench"] == "serving_host" and record["streams"] == 6
    # Every token arrives as its own SSE chunk (stream interval 1): 6 x 20 tokens, 6 x 19 gaps.
    assert record["output_tokens_per_s"] > 0 and record["chunks_per_s"] == pytest.approx(record["output_tokens_per_s"], rel=0.05)
    assert record["iteration_ms_p50"] > 0


def test_serving_reads_the_servers_quantiles_from_the_histograms_difference():
    import serving
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    itl = Histogram("aio_engine:inter_token_latency_seconds", "x", ["model_name"], registry=registry,
                    buckets=(0.01, 0.02, 0.05, 0.1))
    for value in (0.5, 0.5, 0.5):  # before the run: must not count
        itl.labels("m").observe(value)
    name = "aio_engine:inter_token_latency_seconds"
    before = serving.histogram_counts(generate_latest(registry).decode(), name)
    for value in [0.005] * 60 + [0.015] * 35 + [0.04] * 4 + [0.07]:
        itl.labels("m").observe(value)
    after = serving.histogram_counts(generate_latest(registry).decode(), name)
    got = serving.server_quantiles(before, after)
    assert got == {"p50": 10.0, "p90": 20.0, "p99": 50.0, "count": 100.0}
    assert serving.server_quantiles({}, {})["p99"] is None


def test_profile_windows_profiles_each_window_of_steps_on_cpu(tmp_path):
    out = tmp_path / "windows.jsonl"
    script = str(ROOT / "benchmarks" / "profile_windows.py")
    done = subprocess.run(
        [sys.executable, script, "--num-prompts", "5", "--input-len", "8", "32", "--output-len", "20", "20",
         "--windows", "1-3", "6-9", "--max-model-len", "128", "--device", "cpu", "--jsonl", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = common.read_records([out])
    assert [(w["steps"], w["count"]) for w in record["windows"]] == [("1-3", 2), ("6-9", 3)]
    assert all(w["running"] == 5 and w["wall_ms_per_step"] > 0 and w["gpu"].startswith("n/a")
               for w in record["windows"])
    assert record["steps"] >= 20  # every request ran to its length, at least 20 tokens for one
    bad = subprocess.run([sys.executable, script, "--windows", "9-3"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert bad.returncode == 2 and "FIRST < END" in bad.stderr


def test_structured_runs_on_cpu_and_reports_its_pairs(tmp_path):
    """benchmarks/structured.py --mode engine on the embedded model: constrained runs paired with
    their twins, the fills, the fill's waits and the accept's hand-back timed, no sampler graphs."""
    out = tmp_path / "structured.json"
    subprocess.run([sys.executable, "benchmarks/structured.py", "--mode", "engine", "--batch", "4", "--max-tokens", "24",
                    "--max-model-len", "256", "--model", "aio_engine/default_model", "--tokenizer",
                    "aio_engine/default_model", "--load-format", "auto", "--fill-threads", "2", "--repeats", "2",
                    "--json", str(out)], cwd=ROOT, check=True, timeout=300, capture_output=True)
    engine = json.loads(out.read_text())["engine"]
    constrained = [run for name, run in engine["runs"].items() if not name.startswith("unconstrained")]
    assert len(constrained) == 2 and len(engine["decode_ratio_pairs"]["constrained"]) == 2
    assert all(run["fill_calls"] > 0 and run["accept_handback_per_step_ms"] > 0 for run in constrained)
    assert engine["runs"]["unconstrained"]["fill_calls"] == 0 and engine["decode_ratio"] > 0
    assert all("sampler_captures" not in run for run in engine["runs"].values())  # CPU: sampled eagerly
