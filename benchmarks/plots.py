"""PNG plots for benchmarks/RESULTS.md from the JSON lines a GPU run wrote (benchmarks/suite.sh).

Runs on the dev machine (matplotlib: `pip install -e ".[benchmarks]"`), not on the GPU one. Each
plot is made only when its benchmark is in the input; for a benchmark measured twice, the last
record wins. Reference figures and goals are issue 8's.

  python benchmarks/plots.py path/to/bench/results.jsonl [more.jsonl|.json ...] --out benchmarks/plots
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import read_records

# Issue 8's references (vLLM 0.26 / transformers 5.17 on the H100) and goals.
VLLM_THROUGHPUT, GOAL_THROUGHPUT, HF_CB_THROUGHPUT = 18_300, 19_000, 730
STARTUP_GOALS = {0: 15.0, 2: 45.0}  # warm
VLLM_STARTUP = {0: 67.0, 2: 102.0}
LATENCY = {  # model folder name: (roofline ms, goal ms, vLLM ms)
    "qwen3-0.6b": (0.40, 1.5, 2.21),
    "llama-3.1-8b": (5.35, 6.0, 6.60),
}
IDLE_GOAL_PCT = 5.0
SERVING_GOALS = {"ttft_ms": 100.0, "itl_ms": 20.0}  # p99 at 16 req/s


def latest(records: list[dict], bench: str, key) -> dict:
    """The last record of `bench` for each key(record)."""
    out: dict = {}
    for r in records:
        if r.get("bench") == bench:
            out[key(r)] = r
    return out


def bar_labels(ax, bars, fmt: str = "{:.0f}") -> None:
    for b in bars:
        height = b.get_height()
        if height == height:  # not NaN
            ax.annotate(fmt.format(height), (b.get_x() + b.get_width() / 2, height), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")


def plot_throughput(records: list[dict], plt, out: Path) -> Path | None:
    runs = latest(records, "throughput", lambda r: (r.get("optimization_level"), r.get("async_scheduling", True)))
    peer = latest(records, "peer_hf", lambda r: r.get("model"))
    if not runs and not peer:
        return None
    labels, values = [], []
    for (level, async_on), r in sorted(runs.items(), key=lambda kv: (kv[0][0] or 0, not kv[0][1])):
        labels.append(f"-O{level}" + ("" if async_on else "\nno async"))
        values.append(r["output_tokens_per_s"])
    for r in peer.values():
        if r.get("hf_cb_output_tok_s") is not None:
            labels.append(f"transformers\nCB, {r.get('hf_cb_requests_done')} req")
            values.append(r["hf_cb_output_tok_s"])
        if r.get("ours_output_tok_s_slice") is not None:
            labels.append(f"ours,\nsame {r.get('hf_num_prompts')} req")
            values.append(r["ours_output_tok_s_slice"])
    fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(labels)), 4.5))
    colors = ["tab:blue" if not lab.startswith("transformers") else "tab:orange" for lab in labels]
    bar_labels(ax, ax.bar(labels, values, color=colors))
    ax.axhline(VLLM_THROUGHPUT, color="tab:red", ls="--", lw=1, label=f"vLLM {VLLM_THROUGHPUT:,}")
    ax.axhline(GOAL_THROUGHPUT, color="tab:green", ls=":", lw=1, label=f"goal {GOAL_THROUGHPUT:,} (-O2)")
    ax.axhline(HF_CB_THROUGHPUT, color="tab:orange", ls="--", lw=1, label=f"transformers CB ref {HF_CB_THROUGHPUT}")
    ax.set_ylim(0, 1.25 * max(values + [GOAL_THROUGHPUT]))
    ax.set_ylabel("output tokens/s")
    ax.set_title("Offline throughput, qwen3-0.6b (256 req, in/out 100-1024)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    return save(fig, out / "throughput.png")


def plot_serving(records: list[dict], plt, out: Path) -> Path | None:
    runs = latest(records, "serving", lambda r: (str(r.get("request_rate")), r.get("stream_interval")))
    if not runs:
        return None
    keys = sorted(runs, key=lambda k: (k[0] == "inf", float(k[0]) if k[0] != "inf" else 0, k[1]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    quantiles = ("p50", "p90", "p99")
    width = 0.8 / len(quantiles)
    for ax, metric, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "itl_ms", "ITL between chunks (ms)")):
        for i, q in enumerate(quantiles):
            xs = [j + (i - 1) * width for j in range(len(keys))]
            vals = [runs[k][metric][q] if runs[k][metric][q] is not None else float("nan") for k in keys]
            bar_labels(ax, ax.bar(xs, vals, width, label=q), "{:.0f}")
        ax.axhline(SERVING_GOALS[metric], color="tab:green", ls=":", lw=1, label="goal p99 at 16 req/s")
        ax.set_xticks(range(len(keys)), [f"{rate} req/s\ninterval {si}" for rate, si in keys])
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    vals = [runs[k]["output_tokens_per_s"] for k in keys]
    bar_labels(axes[2], axes[2].bar(range(len(keys)), vals, color="tab:purple"))
    axes[2].axhline(13_000, color="tab:green", ls=":", lw=1, label="goal 13,000 at saturation")
    axes[2].axhline(12_900, color="tab:red", ls="--", lw=1, label="vLLM 12,900")
    axes[2].set_xticks(range(len(keys)), [f"{rate} req/s\ninterval {si}" for rate, si in keys])
    axes[2].set_title("output tokens/s")
    axes[2].legend(fontsize=8)
    fig.suptitle("Serving over SSE, qwen3-0.6b (400 req, in/out 100-1024)")
    return save(fig, out / "serving.png")


def plot_startup(records: list[dict], plt, out: Path) -> Path | None:
    runs = latest(records, "startup", lambda r: (r.get("level"), r.get("cache")))
    if not runs:
        return None
    levels = sorted({level for level, _ in runs})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, state in enumerate(("cold", "warm")):
        vals = [runs.get((level, state), {}).get("seconds", float("nan")) for level in levels]
        xs = [j + (i - 0.5) * width for j in range(len(levels))]
        bar_labels(ax, ax.bar(xs, vals, width, label=state), "{:.1f}")
        for x, v, level in zip(xs, vals, levels):
            if v != v and (level, state) in runs:  # NaN: that start failed or timed out
                ax.annotate("failed", (x, 0), ha="center", va="bottom", fontsize=8, rotation=90)
    for j, level in enumerate(levels):
        if level in STARTUP_GOALS:
            ax.plot([j - 0.45, j + 0.45], [STARTUP_GOALS[level]] * 2, color="tab:green", ls=":",
                    label="goal (warm)" if j == 0 else None)
        if level in VLLM_STARTUP:
            ax.plot([j - 0.45, j + 0.45], [VLLM_STARTUP[level]] * 2, color="tab:red", ls="--",
                    label="vLLM (warm)" if j == 0 else None)
    ax.set_xticks(range(len(levels)), [f"-O{level}" for level in levels])
    ax.set_ylabel("seconds to /health 200")
    ax.set_title("Startup, qwen3-0.6b (dummy weights)")
    ax.legend(fontsize=8)
    return save(fig, out / "startup.png")


def plot_idle(records: list[dict], plt, out: Path) -> Path | None:
    runs = latest(records, "idle", lambda r: (r.get("driver"), r.get("async_scheduling")))
    runs = {k: r for k, r in runs.items() if isinstance(r.get("gpu", {}).get("idle_pct"), (int, float))}
    if not runs:
        return None
    keys = sorted(runs, key=lambda k: (k[0], not k[1]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{driver}\nasync {'on' if on else 'off'}" for driver, on in keys]
    colors = ["tab:blue" if on else "tab:gray" for _, on in keys]
    bar_labels(axes[0], axes[0].bar(labels, [runs[k]["gpu"]["idle_pct"] for k in keys], color=colors), "{:.1f}")
    axes[0].axhline(IDLE_GOAL_PCT, color="tab:green", ls=":", lw=1, label=f"goal {IDLE_GOAL_PCT:.0f}%")
    axes[0].set_ylabel("GPU idle, % of the window")
    axes[0].legend(fontsize=8)
    gpu = [runs[k]["gpu"]["gpu_ms_per_step"] - runs[k]["gpu"]["idle_ms_per_step"] for k in keys]
    idle = [runs[k]["gpu"]["idle_ms_per_step"] for k in keys]
    host = [runs[k]["timed"]["host_ms_per_step"]["host_busy"] for k in keys]
    xs = range(len(keys))
    axes[1].bar([x - 0.2 for x in xs], gpu, 0.4, label="GPU busy")
    axes[1].bar([x - 0.2 for x in xs], idle, 0.4, bottom=gpu, label="GPU idle")
    axes[1].bar([x + 0.2 for x in xs], host, 0.4, label="host busy (no profiler)", color="tab:olive")
    axes[1].set_xticks(list(xs), labels)
    axes[1].set_ylabel("ms per step")
    axes[1].legend(fontsize=8)
    first = runs[keys[0]]
    fig.suptitle(f"GPU idle between decode steps, batch {first.get('batch')}, {Path(first.get('model', '')).name}")
    return save(fig, out / "idle.png")


def plot_latency(records: list[dict], plt, out: Path) -> Path | None:
    runs = latest(records, "latency", lambda r: Path(r.get("model", "")).name)
    peer = latest(records, "peer_hf", lambda r: Path(r.get("model", "")).name)
    names = [n for n in LATENCY if n in runs or n in peer]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        roof, goal, vllm = LATENCY[name]
        labels, vals = [], []
        if name in runs:
            labels.append("aio-engine")
            vals.append(runs[name]["ms_per_output_token"])
        p = peer.get(name, {})
        if p.get("hf_latency_ms_per_token") is not None:
            labels.append("transformers\nstatic+compile")
            vals.append(p["hf_latency_ms_per_token"])
        labels.append("vLLM (ref)")
        vals.append(vllm)
        bar_labels(ax, ax.bar(labels, vals, color=["tab:blue", "tab:orange", "tab:red"][: len(vals)]), "{:.2f}")
        ax.axhline(roof, color="black", ls="--", lw=1, label=f"roofline {roof}")
        ax.axhline(goal, color="tab:green", ls=":", lw=1, label=f"goal {goal}")
        ax.set_title(f"{name}: ms per output token (batch 1, 512 + 128)")
        ax.legend(fontsize=8)
    return save(fig, out / "latency.png")


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clear()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, nargs="+", help=".jsonl (one record a line) or .json files")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "plots")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('plots need matplotlib: pip install -e ".[benchmarks]"') from None
    records = read_records(args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    made = [p for p in (plot(records, plt, args.out) for plot in (plot_throughput, plot_latency, plot_serving,
                                                                   plot_startup, plot_idle)) if p is not None]
    for path in made:
        print(path)
    if not made:
        print("no plottable records in", ", ".join(map(str, args.inputs)))


if __name__ == "__main__":
    main()
