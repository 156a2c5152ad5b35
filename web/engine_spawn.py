"""Starting the engine process (web/engine_process.py), early.

A spawned process imports torch and the engine afresh: 2-7 s depending on the machine, which
would add to every start of `aio-engine serve`. So the CLI starts the engine process first thing
(`start_early()`, before it imports torch itself) and the two imports overlap; the process then
waits on its socket for the engine config that the command line yields, and EngineClient.start()
takes it (`take()`). This module imports nothing heavy for that reason.

The engine process connects to a Unix socket this process listens on (on Linux an abstract
address, so a killed process leaves no file behind; elsewhere in a folder of its own); once
connected, the listener goes away. On Linux the engine process also asks the kernel for a SIGTERM
when its parent dies (PR_SET_PDEATHSIG, which follows the thread that spawned it: the CLI's main
thread).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>

_early: EngineSpawn | None = None


class EngineSpawn:
    """A spawned engine process and the listening socket it connects to."""

    def __init__(self) -> None:
        if sys.platform.startswith("linux"):  # an abstract address: nothing on disk to leave behind
            self.folder = None
            self.path = f"\0aio-engine-{os.getpid()}-{uuid.uuid4().hex}"
        else:
            self.folder = tempfile.mkdtemp(prefix="aio-engine-")
            self.path = os.path.join(self.folder, "engine.sock")
        self.listener: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        # Not a daemon: torch.compile's workers are the engine process's own children.
        self.process = multiprocessing.get_context("spawn").Process(target=engine_main, args=(self.path,),
                                                                    name="aio-engine-core")
        self.process.start()

    def close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)

    def stop(self, grace: float) -> None:
        """Wait up to `grace` seconds for the process to end, then terminate it, then kill it."""
        self.close_listener()
        process = self.process
        process.join(grace)
        if process.is_alive():
            process.terminate()
            process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()


def engine_main(path: str) -> None:
    """The engine process's entry: the heavy imports, then the engine (web/engine_process.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the API process, which ends this one
    _end_with_parent()
    from .engine_process import run_engine_process

    run_engine_process(path)


def _end_with_parent() -> None:
    """On Linux, a SIGTERM when the API process dies, even during startup (minutes of compile and
    graph capture holding the GPU otherwise, until the closed socket is noticed)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call
        os._exit(0)


def wanted(argv: list[str]) -> bool:
    """Whether a command line will run `serve` with an engine process (unless a config file says
    otherwise, which `discard_early()` handles): not for --help, not with --no-engine-process."""
    if argv[:1] != ["serve"]:
        return False
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    return not any(a in ("-h", "--help", "--no-engine-process") or a.startswith("--help=") for a in args)


def start_early() -> None:
    global _early
    if _early is None:
        _early = EngineSpawn()


def take() -> EngineSpawn:
    """The process start_early() began, or a new one."""
    global _early
    spawn, _early = _early, None
    return spawn if spawn is not None else EngineSpawn()


def discard_early() -> None:
    """End the early process if nothing took it (it holds no engine yet: nothing to wait for)."""
    global _early
    spawn, _early = _early, None
    if spawn is not None:
        spawn.stop(0.0)
