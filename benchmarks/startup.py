"""Startup: process start to `/health` 200 for each -O level, with a cold and a warm compile cache.

For each level the server (`python -m aio_engine.cli serve`, as benchmarks/serving.py starts it)
is started twice with the same cache folder: first empty (cold), then as the first start left it
(warm). The caches are isolated per level under --cache-dir: the child's XDG_CACHE_HOME,
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR point there, and so does aio-engine's own compile
cache when `serve` has a flag or environment variable for it (found by looking, reported as
`cache_via`). The server's log lines are kept with their time since process start, so the JSON
says where the seconds went (weights, KV sizing, compile, graph capture).

  python benchmarks/startup.py --levels 0 2                          # the embedded model (CPU or GPU)
  python benchmarks/startup.py --levels 0 1 2 3 --jsonl out.jsonl -- --model benchmarks/models/qwen3-0.6b \
      --load-format dummy --dtype bfloat16 --max-model-len 4096
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, has_tokenizer, model_folder

ROOT = Path(__file__).resolve().parents[1]
# The CLI is the one reader of the environment: an aio-engine cache variable would be named there.
_ENV_PATTERN = re.compile(r"AIO_ENGINE_[A-Z_]*CACHE[A-Z_]*")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_hooks() -> tuple[str | None, list[str]]:
    """How `serve` takes aio-engine's compile-cache folder: a flag (or `-cc.cache_dir=`, when the
    compilation config has that key; None: neither) and the environment variables naming it."""
    flag = None
    try:
        sys.path.insert(0, str(ROOT))
        from aio_engine import config
        from aio_engine.cli import make_parser, serve_parser

        options = [o for a in serve_parser(make_parser())._actions for o in a.option_strings]
        found = [o for o in options if o.startswith("--") and "cache-dir" in o and "download" not in o]
        flag = next((o for o in found if "compil" in o), found[0] if found else None)
        if flag is None and "cache_dir" in getattr(config, "_CC_KEYS", ()):
            flag = "-cc.cache_dir="
    except Exception as e:  # noqa: BLE001 - the benchmark still isolates through the environment
        print(f"startup: could not read serve's flags ({e!r}); isolating through the environment only", file=sys.stderr)
    names: set[str] = set()
    for source in [*(ROOT / "aio_engine" / "cli").glob("*.py"), ROOT / "aio_engine" / "config.py"]:
        names.update(_ENV_PATTERN.findall(source.read_text()))
    return flag, sorted(names)


def cache_args(flag: str | None, folder: Path) -> list[str]:
    if flag is None:
        return []
    return [flag + str(folder)] if flag.endswith("=") else [flag, str(folder)]


def child_env(cache: Path, env_names: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XDG_CACHE_HOME=str(cache / "xdg"), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
               TRITON_CACHE_DIR=str(cache / "triton"), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for name in env_names:
        env[name] = str(cache / "aio-engine")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        return status == 200
    except OSError:
        return False


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


def timeline(log_text: str, started_at: float) -> list[list]:
    """[seconds since process start, logger, message] for the server's INFO+ log lines."""
    lines = []
    for raw in log_text.splitlines():
        m = _LOG_TIME.match(raw.strip())
        if not m:
            continue
        stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        lines.append([round(stamp - started_at, 2), m.group(3), m.group(4)[:160]])
    return lines[:40]


def start_once(serve_args: list[str], level: int, cache: Path, flag: str | None, env_names: list[str],
               timeout: float, log_dir: Path, label: str) -> dict:
    """One server start: seconds to /health 200 (or why not), then a clean stop."""
    port = free_port()
    command = [sys.executable, "-m", "aio_engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               f"-O{level}", *serve_args]
    command += cache_args(flag, cache / "aio-engine")
    log_path = log_dir / f"{label}.log"
    result: dict = {"level": level, "command": " ".join(command[2:])}
    with open(log_path, "w") as log:
        wall_start = time.time()
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=child_env(cache, env_names), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                elapsed = time.perf_counter() - start
                if healthy(port):
                    result["seconds"] = round(elapsed, 3)
                    break
                if process.poll() is not None:
                    result["error"] = f"the server exited with status {process.returncode} after {elapsed:.1f}s"
                    break
                if elapsed > timeout:
                    result["error"] = f"not healthy after {timeout:.0f}s (timeout)"
                    break
                time.sleep(0.05)
        finally:
            stop(process)
    text = log_path.read_text(errors="replace")
    result["timeline"] = timeline(text, wall_start)
    if "error" in result:
        result["log_tail"] = text.splitlines()[-15:]
    return result


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL of the server's own process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # start_new_session: the group is the server's alone
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--cache-dir", type=Path, help="compile caches go under here, one folder per level "
                        "(emptied before the cold start); default: a temporary folder, removed afterwards")
    parser.add_argument("--warm-starts", type=int, default=1, help="warm starts after the cold one")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one start may take")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--jsonl", type=Path, help="append one line per start here")
    ns, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    # `timeout` (benchmarks/suite.sh) sends SIGTERM: unwind, so that `finally` stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if any(re.fullmatch(r"-O\d?|--optimization-level(=.*)?", a) for a in serve_args):
        parser.error("give levels with --levels, not -O in the serve flags")

    folder = model_folder(serve_args)
    tokenizer = "the model's"
    if (folder is not None and not has_tokenizer(folder) and "--tokenizer" not in serve_args
            and "--skip-tokenizer-init" not in serve_args):
        serve_args.append("--skip-tokenizer-init")  # config-only folders (benchmarks/models) have none
        tokenizer = "none (--skip-tokenizer-init: the model folder has no tokenizer)"
    flag, env_names = cache_hooks()
    cache_via = ["XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", *env_names] + ([flag] if flag else [])
    temporary = ns.cache_dir is None
    root = Path(tempfile.mkdtemp(prefix="aio-startup-")) if temporary else ns.cache_dir
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for level in ns.levels:
            cache = root / f"O{level}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            for i in range(1 + ns.warm_starts):
                state = "cold" if i == 0 else "warm"
                label = f"O{level}-{state}{i if i > 1 else ''}"
                print(f"== startup -O{level} {state}", flush=True)
                r = start_once(serve_args, level, cache, flag, env_names, ns.timeout, log_dir, label)
                r["cache"] = state
                r["cache_files"], r["cache_bytes"] = folder_size(cache)
                r["cache_via"] = cache_via
                r["tokenizer"] = tokenizer
                results.append(r)
                print(f"   {r.get('seconds', r.get('error'))} s; cache {r['cache_files']} files, "
                      f"{r['cache_bytes'] / 2**20:.1f} MiB", flush=True)
                emit("startup", r, jsonl_path=ns.jsonl)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| level | cold (s) | warm (s) |\n|---|---|---|")
    for level in ns.levels:
        rows = [r for r in results if r["level"] == level]
        cells = [str(r.get("seconds", "failed")) for r in rows]
        print(f"| -O{level} | {cells[0] if cells else '-'} | {', '.join(cells[1:]) or '-'} |")
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
