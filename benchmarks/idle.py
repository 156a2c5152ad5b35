"""GPU idle time between steps, with and without async scheduling (issue 8: goal under 5% of step
time for decode at batch 64 on qwen3-0.6b).

A decode-heavy workload (--num-requests requests of --prompt-len random tokens, --output-len
tokens each, ignore_eos; all the same length, so the batch stays full) runs through one engine in
each mode (async scheduling on / off, switched on the same engine between runs) and driver:
  core   EngineCore.step() in a loop, as the offline LLM runs it;
  async  AsyncEngine: the serving loop, one `generate()` consumer per request (DELTA outputs).
Each (driver, mode) runs the workload twice, once per window below; every timed window runs before
the first profiled one (after torch.profiler has traced CUDA work, CUPTI stays attached in a
process with CUDA graphs and every later launch costs more host time). In each run, once every
request has its first token and --warmup-steps more have run:
  timed window (--timed-steps, no profiler): wall time per step, and the host's share of it
    (schedule, stage = batch build and upload, launch = enqueue of the forward and sampling, wait =
    blocked on the GPU, finish = tokens -> outputs); `ahead` is the fraction of launches made while the previous step was still on the GPU;
    and GPU idle from CUDA event timestamps (gpu_events): per step, the time from the end of the
    work queued before it to the end of its inputs' copy, summed over the window (the profiler's
    host overhead, ~1 ms per step on the GPU machine, is not in it: this is the figure for the goal);
  profiled window (--profile-steps, torch.profiler CUDA activity): busy = the union of kernel,
    memcpy and memset intervals on the GPU, idle = window - busy, idle % of the window, the gaps,
    and the top kernels by time. (The profiler adds host work per launch; compare the timed
    window's ms/step with the profiled one's to see how much.)
On CPU the same steps run; GPU figures are n/a.

  python benchmarks/idle.py --num-requests 8 --output-len 64 --warmup-steps 4 --timed-steps 20 --profile-steps 10
  python benchmarks/idle.py --model benchmarks/models/qwen3-0.6b --load-format dummy --dtype bfloat16 \
      --max-model-len 4096 --jsonl out.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit  # noqa: E402

from aio_engine.async_engine import AsyncEngine  # noqa: E402
from aio_engine.cli import GROUP_TITLES, add_engine_args, engine_args_from, expand_argv  # noqa: E402
from sampling.params import RequestOutputKind, SamplingParams  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


class StepProbe:
    """Host timers around the engine's step phases (no synchronization) and a per-step callback.

    Wraps the instance's schedule / stage / enqueue / runner.wait / finish_step (and sample, where the
    engine has it), which both drivers call by attribute, so the engine's code is untouched.
    """

    def __init__(self, core) -> None:
        self.core = core
        self.seconds: dict[str, float] = defaultdict(float)
        self.launches = 0
        self.launches_ahead = 0  # launched while an earlier step had not been waited for
        self.outstanding = 0
        self.on_step = None  # called with the step count after each finish_step
        self.steps = 0
        self._wrap(core, "schedule", "schedule")
        self._wrap(core, "stage", "stage")
        self._wrap(core, "enqueue", "launch")
        self._wrap(core.runner, "wait", "wait")
        self._wrap(core, "finish_step", "finish")
        if hasattr(core, "sample"):  # a sampling launched late, after the step before was finished
            self._wrap(core, "sample", "sample")
        self.marks: list[tuple[str, torch.cuda.Event]] = []  # ("start" | "end", event) in stream order
        self.cuda = core.config.device.type == "cuda"
        if self.cuda:
            self._mark_after(core, "enqueue", "end")
            if hasattr(core, "sample"):
                self._mark_after(core, "sample", "end")
            self._mark_after(core.runner, "_build_batch", "start")
            if getattr(core.runner, "decode_inputs", None) is not None:
                self._mark_after(core.runner.decode_inputs, "build", "start")
            self._mark_carry()
            self._mark_late_sampling()

    def _mark(self, kind: str) -> None:
        """A timing event on the runner's stream, behind what is queued on it now."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.core.runner.stream)
        self.marks.append((kind, event))

    def _mark_after(self, owner, attr: str, kind: str) -> None:
        """Record a timing event once `attr` returns: "start" after a step's inputs are enqueued
        (its first GPU work), "end" after its last work is."""
        original = getattr(owner, attr)

        def marked(*args, **kwargs):
            result = original(*args, **kwargs)
            self._mark(kind)
            return result

        setattr(owner, attr, marked)

    def _mark_late_sampling(self) -> None:
        """A "start" once a late sampling's metadata is uploaded (its first work on the GPU, queued
        after the next step's inputs: the GPU may sit idle while the host builds it)."""
        core, runner = self.core, self.core.runner
        late = [False]
        sample, build = core.sample, runner.sampling_metadata.build

        def in_sample(*args, **kwargs):
            late[0] = True
            try:
                return sample(*args, **kwargs)
            finally:
                late[0] = False

        def marked_build(*args, **kwargs):
            md = build(*args, **kwargs)
            if late[0]:
                self._mark("start")
            return md

        core.sample, runner.sampling_metadata.build = in_sample, marked_build

    def _mark_carry(self) -> None:
        """A "start" once a step's carried tokens are copied in (its first work at enqueue)."""
        runner = self.core.runner
        original = runner._carry_tokens

        def carry(*args):
            fill = original(*args)

            def marked_fill(*fill_args):
                fill(*fill_args)
                self._mark("start")

            return marked_fill

        runner._carry_tokens = carry

    def event_report(self) -> dict:
        """GPU idle from CUDA event timestamps (no profiler; see idle_from_marks): before each
        start of a step's work, the time since the mark before it. Zero when the host queued the
        work before the GPU ran dry; the copies' own few microseconds count as idle (a slight
        overstatement)."""
        if not self.cuda:
            return {"gpu": "n/a (CPU)"}
        torch.cuda.synchronize()
        return idle_from_marks(self.marks)

    def _wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            if name == "launch":
                self.launches += 1
                self.launches_ahead += self.outstanding > 0
                self.outstanding += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                if name == "wait":
                    self.outstanding -= 1
                elif name == "finish":
                    self.steps += 1
                    if self.on_step is not None:
                        self.on_step(self.steps)

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.launches = self.launches_ahead = 0
        self.marks.clear()

    def host_report(self, steps: int, wall: float) -> dict:
        per = {k: round(1e3 * v / steps, 3) for k, v in sorted(self.seconds.items())}
        accounted = sum(self.seconds.values())
        per["other"] = round(1e3 * (wall - accounted) / steps, 3)
        per["host_busy"] = round(1e3 * (wall - self.seconds.get("wait", 0.0)) / steps, 3)
        return {"ms_per_step": round(1e3 * wall / steps, 3), "host_ms_per_step": per,
                "ahead": round(self.launches_ahead / max(1, self.launches), 3)}


def idle_from_marks(marks) -> dict:
    """Sum, over the window, of the time from the mark before each "start" event to that start
    (events with elapsed_time in ms, as torch.cuda.Event). A step's starts are its inputs'
    upload (stage), its late sampling's metadata upload if its sampling is late, and its carried
    tokens' copy at enqueue (behind the late sampling of the step before, where there is one): so
    the GPU's wait for the host to build a late sampling and for the forward behind it both count.
    A host too slow to launch a step's kernels back to back is not in it (the decode workload here
    replays one graph per step). `gaps`: how many starts were measured (up to three a step)."""
    first_end = last_end = previous = None
    gaps = []
    for kind, event in marks:
        if kind == "end":
            first_end = first_end or event
            last_end = event
        elif first_end is not None:
            gaps.append(previous.elapsed_time(event))
        previous = event
    if first_end is None or first_end is last_end or not gaps:
        return {"gpu": "n/a (too few steps)"}
    window = first_end.elapsed_time(last_end)
    idle = sum(gaps)
    gaps.sort(reverse=True)
    return {"window_ms": round(window, 3), "idle_ms": round(idle, 3), "idle_pct": round(100 * idle / window, 2),
            "gaps": len(gaps), "over_100us": sum(g > 0.1 for g in gaps),
            "largest_us": [round(1e3 * g, 1) for g in gaps[:5]]}


def gpu_timeline(trace_path: Path, steps: int, top: int = 10) -> dict:
    """Busy/idle of the GPU from a Chrome trace of torch.profiler: union of device intervals."""
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", ""))
                   for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES)
    if not spans:
        return {"gpu": "n/a (no CUDA activity recorded)"}
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    busy, gaps = 0.0, []
    cur_start, cur_end = spans[0][0], spans[0][1]
    for start, end, name in spans:
        entry = by_kernel[name]
        entry[0] += 1
        entry[1] += end - start
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append(start - cur_end)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    window = max(end for _, end, _ in spans) - spans[0][0]
    idle = window - busy
    total_kernel = sum(v[1] for v in by_kernel.values())
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    gaps.sort(reverse=True)
    return {
        "window_ms": round(window / 1e3, 3), "busy_ms": round(busy / 1e3, 3), "idle_ms": round(idle / 1e3, 3),
        "idle_pct": round(100 * idle / window, 2) if window else None,
        "gpu_ms_per_step": round(window / 1e3 / steps, 3), "idle_ms_per_step": round(idle / 1e3 / steps, 3),
        "gaps": {"count": len(gaps), "over_10us": sum(g > 10 for g in gaps), "over_100us": sum(g > 100 for g in gaps),
                 "largest_us": [round(g, 1) for g in gaps[:5]]},
        "device_events": len(spans),
        "top_kernels": [{"name": name[:100], "calls": n, "total_ms": round(t / 1e3, 3),
                         "pct": round(100 * t / total_kernel, 1)} for name, (n, t) in ranked],
    }


def workload(ns, vocab: int, tag: str) -> list[tuple[str, dict, SamplingParams]]:
    rng = random.Random(ns.workload_seed)
    penalties = dict(presence_penalty=0.5, frequency_penalty=0.1, repetition_penalty=1.1) if ns.penalties else {}
    params = SamplingParams(temperature=1.0, max_tokens=ns.output_len, ignore_eos=True, **penalties)
    return [(f"{tag}-{i}", {"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(ns.prompt_len)]}, params)
            for i in range(ns.num_requests)]


def profiled(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    return profile(activities=activities)


def finish_profile(prof, steps: int, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        gpu = gpu_timeline(path, steps)
    if device.type != "cuda":
        gpu = {"gpu": "n/a (CPU)"}
    return gpu


def open_window(probe: StepProbe, profile: bool):
    """Start a window: the probe's counts reset, and the profiler started if it is a profiled one."""
    probe.reset()
    if not profile:
        return None
    prof = profiled(probe.core.config.device)
    prof.start()
    return prof


def close_window(probe: StepProbe, ns, prof, batch: int, start: float, end: float | None = None) -> dict:
    """End the window open_window started: its host report over end - start (perf_counter; end
    defaults to now) and, timed, GPU idle from events, or, profiled, the GPU timeline once the
    window's last kernels have landed."""
    device = probe.core.config.device
    if prof is not None and device.type == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() if end is None else end) - start
    if prof is None:
        timed = probe.host_report(ns.timed_steps, wall)
        timed["gpu_events"] = probe.event_report()
        return {"batch": batch, "timed": timed}
    prof.stop()
    return {"profiled": probe.host_report(ns.profile_steps, wall), "gpu": finish_profile(prof, ns.profile_steps, device)}


def run_core(engine: AsyncEngine, probe: StepProbe, ns, tag: str, profile: bool) -> dict:
    """EngineCore.step() in a loop (the offline LLM's path); one window, timed or profiled."""
    core = engine.core
    for request_id, prompt, params in workload(ns, core.config.model.vocab_size, tag):
        core.add_request(request_id, prompt, params)
    while core.scheduler.waiting or any(r.num_output_tokens == 0 for r in core.scheduler.requests.values()):
        core.step()
    for _ in range(ns.warmup_steps):
        core.step()
    batch = len(core.scheduler.running)
    prof = open_window(probe, profile)
    start = time.perf_counter()
    for _ in range(ns.profile_steps if profile else ns.timed_steps):
        core.step()
    result = close_window(probe, ns, prof, batch, start)
    while core.has_unfinished:
        core.step()
    return result


async def run_async(engine: AsyncEngine, probe: StepProbe, ns, tag: str, profile: bool) -> dict:
    """AsyncEngine's loop with one streaming consumer per request (the server's path); one window,
    timed or profiled."""
    core = engine.core
    loop = asyncio.get_running_loop()
    first_tokens = 0
    all_started = loop.create_future()
    targets: dict[int, asyncio.Future] = {}

    async def consume(request_id: str, prompt: dict, params: SamplingParams) -> int:
        nonlocal first_tokens
        count = 0
        async for out in engine.generate(prompt, params, request_id=request_id):
            if count == 0 and out.outputs[0].token_ids:
                first_tokens += 1
                if first_tokens == ns.num_requests and not all_started.done():
                    all_started.set_result(probe.steps)
            count += len(out.outputs[0].token_ids)
        return count

    def on_step(steps: int) -> None:
        future = targets.pop(steps, None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    def after(steps: int) -> asyncio.Future:
        targets[probe.steps + steps] = future = loop.create_future()
        return future

    probe.on_step = on_step
    requests = workload(ns, core.config.model.vocab_size, tag)
    for request in requests:
        request[2].output_kind = RequestOutputKind.DELTA
    tasks = [asyncio.create_task(consume(*request)) for request in requests]
    try:
        await all_started
        await after(ns.warmup_steps)
        batch = len(core.scheduler.running)
        prof = open_window(probe, profile)
        start = time.perf_counter()
        end = await after(ns.profile_steps if profile else ns.timed_steps)
        result = close_window(probe, ns, prof, batch, start, end)  # its sync blocks the loop one step at most
        counts = await asyncio.gather(*tasks)
    finally:
        probe.on_step = None
        for task in tasks:
            task.cancel()
    assert all(c == ns.output_len for c in counts), counts
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--timed-steps", type=int, default=200)
    parser.add_argument("--profile-steps", type=int, default=50)
    parser.add_argument("--drivers", nargs="+", default=["core", "async"], choices=["core", "async"])
    parser.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"],
                        help="async scheduling on / off (switched on the same engine)")
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--penalties", action="store_true",
                        help="every request with presence 0.5, frequency 0.1 and repetition 1.1 penalties: rows "
                             "that sample from their tokens so far, so each decode step's sampling is late")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--jsonl", type=Path, help="append one line per run here")
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    add_engine_args(parser, groups)
    ns = parser.parse_args(expand_argv(parser, sys.argv[1:]))
    needed = ns.warmup_steps + max(ns.timed_steps, ns.profile_steps) + 4
    if ns.output_len < needed:
        parser.error(f"--output-len must be at least warmup + the longer window's steps + 4 = {needed}: "
                     "a window must end before the requests do")
    args = engine_args_from(ns)
    if args.model and not (Path(args.model) / "tokenizer_config.json").exists():
        args.skip_tokenizer_init = True  # config-only folders (benchmarks/models) have no tokenizer
    args.max_num_seqs = max(args.max_num_seqs, ns.num_requests)

    start = time.perf_counter()
    engine = AsyncEngine.from_engine_args(args)
    startup = time.perf_counter() - start
    config = engine.core.config
    if ns.prompt_len + ns.output_len > config.model.max_model_len:
        parser.error(f"--prompt-len + --output-len exceeds max_model_len ({config.model.max_model_len})")
    probe = StepProbe(engine.core)
    built_with = config.scheduler.async_scheduling
    # Every timed window runs before the first profiled one: once torch.profiler has traced CUDA
    # work in a process with CUDA graphs, CUPTI stays attached (torch turns its teardown off) and
    # every later launch costs more on the host (measured: enqueue 0.35 -> 0.9 ms a step).
    runs = [(driver, mode) for driver in ns.drivers for mode in ns.modes]
    windows: dict[tuple[str, str], dict] = {}
    for profile in (False, True):
        for driver, mode in runs:
            config.scheduler.async_scheduling = mode == "on"
            tag = f"{driver}-{mode}-{'profiled' if profile else 'timed'}"
            print(f"== idle: driver {driver}, async scheduling {mode}, {'profiled' if profile else 'timed'} window",
                  flush=True)
            if driver == "core":
                r = run_core(engine, probe, ns, tag, profile)
            else:
                r = asyncio.run(run_async(engine, probe, ns, tag, profile))
            windows.setdefault((driver, mode), {}).update(r)
    results = []
    for (driver, mode), r in windows.items():
        r = {"driver": driver, "async_scheduling": mode == "on", "model": str(config.model.path),
             "dtype": str(config.model.dtype), "compilation": config.compilation.describe(),
             "engine_built_with_async_scheduling": built_with, "startup_s": round(startup, 2),
             "num_requests": ns.num_requests, "prompt_len": ns.prompt_len, "output_len": ns.output_len,
             "penalties": ns.penalties, "timed_steps": ns.timed_steps, "profile_steps": ns.profile_steps, **r}
        if mode == "on" and r["timed"]["ahead"] < 0.5:
            r["warning"] = "async scheduling on, yet few launches ran ahead: the switch did not take"
        results.append(r)
        emit("idle", r, jsonl_path=ns.jsonl)
    config.scheduler.async_scheduling = built_with

    print("\n| driver | async sched | batch | ms/step | host busy ms/step | ahead | GPU idle % between steps (events, timed) | "
          "GPU idle % (profiler) | idle ms/step (profiler) | profiled ms/step |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        gpu, events = r["gpu"], r["timed"]["gpu_events"]
        print(f"| {r['driver']} | {'on' if r['async_scheduling'] else 'off'} | {r['batch']} | {r['timed']['ms_per_step']} | "
              f"{r['timed']['host_ms_per_step']['host_busy']} | {r['timed']['ahead']} | {events.get('idle_pct', 'n/a')} | "
              f"{gpu.get('idle_pct', 'n/a')} | {gpu.get('idle_ms_per_step', 'n/a')} | {r['profiled']['ms_per_step']} |")
    for r in results:
        print(f"host ms/step ({r['driver']}, async {'on' if r['async_scheduling'] else 'off'}): {r['timed']['host_ms_per_step']}")
    top = next((r["gpu"]["top_kernels"] for r in results if "top_kernels" in r["gpu"]), None)
    if top:
        print("\ntop kernels (first run):")
        for k in top:
            print(f"  {k['total_ms']:9.3f} ms {k['pct']:5.1f}% {k['calls']:6d}x  {k['name']}")
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
