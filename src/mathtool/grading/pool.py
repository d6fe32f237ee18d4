"""A small pool of worker processes in which any one stuck call can be killed and its worker replaced.

`concurrent.futures.ProcessPoolExecutor` and `multiprocessing.Pool` can only be torn down whole, which
would fail every other call in flight. Here each worker is one subprocess with a socket; a caller checks
a worker out of a queue, sends one job, waits on the socket with a timeout, and on timeout kills that
worker alone. Its slot goes back empty and the next caller starts a fresh process in it.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mathtool.grading.worker import READY

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # starting Python and importing sympy on a busy 2-core box
_WORKER_MAIN = "from mathtool.grading.worker import main; main()"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds `mathtool`


class WorkerTimeout(Exception):
    """The job did not finish in time (its worker was killed), or no worker came free in time."""


class WorkerError(Exception):
    """The job raised in the worker, or the worker died or could not start."""


class WorkerDied(WorkerError):
    """The worker's socket closed: it exited or was killed (before or during the job)."""


class _Worker:
    """One worker subprocess and the parent's end of its socket; used by one thread at a time.

    `-P`: the current directory is not put on the worker's path, so no local file shadows a module.
    """

    def __init__(self, preload: Sequence[str]) -> None:
        parent_sock, child_sock = socket.socketpair()
        with child_sock:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-c", _WORKER_MAIN, str(child_sock.fileno()), *preload],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_child_env(),
            )
        self.conn = Connection(parent_sock.detach())
        try:
            ready = self.conn.poll(STARTUP_TIMEOUT_S) and self._recv() == READY
        except WorkerError:  # it died while importing: its traceback is on stderr
            ready = False
        if not ready:
            self.kill()
            raise WorkerError(f"grader worker did not start within {STARTUP_TIMEOUT_S:.0f} s")
        logger.debug("grader worker %s started", self.process.pid)

    def _recv(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"worker {self.process.pid} died") from exc

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> Any:
        try:
            self.conn.send((fn, args))
        except OSError as exc:
            raise WorkerDied(f"worker {self.process.pid} is gone") from exc
        if not self.conn.poll(timeout_s):
            raise WorkerTimeout(f"no answer within {timeout_s:.2f} s")
        ok, value = self._recv()
        if not ok:
            raise WorkerError(value)
        return value

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("grader worker %s did not exit after SIGKILL", self.process.pid)
        self.conn.close()
        logger.debug("stopped grader worker %s", self.process.pid)


def _child_env() -> dict[str, str]:
    """The parent's environment, with this `mathtool` first on the path (also when not installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


class KillablePool:
    """`size` lazily started worker processes; `call()` is safe from any number of threads at once."""

    def __init__(self, size: int, preload: Sequence[str] = ()) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.size = size
        self._preload = tuple(preload)
        self._slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(size):
            self._slots.put(None)  # an empty slot: its process starts on first use
        self._started: set[_Worker] = set()
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        atexit.register(self.shutdown)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float, wait_s: float) -> Any:
        """Run `fn(*args)` in a worker; raise WorkerTimeout after `timeout_s` (the worker is then killed).

        `wait_s` bounds the wait for a free worker; a worker's start-up is not counted in `timeout_s`.
        `fn` must be a module-level function importable in the worker (it is pickled by name).
        """
        try:
            worker = self._slots.get(timeout=wait_s)
        except queue.Empty:
            raise WorkerTimeout(f"no free grader worker within {wait_s:.0f} s") from None
        try:
            if worker is not None and not worker.alive():  # it died between calls
                self._stop(worker)
                worker = None
            if worker is None:
                worker = self._start()
            return worker.call(fn, args, timeout_s)
        except WorkerError as exc:  # the job raised (the worker is fine), or the worker died or did not start
            if worker is not None and isinstance(exc, WorkerDied):
                self._stop(worker)
                worker = None
            raise
        except BaseException:  # a timeout, or this caller interrupted mid-call: the socket can't be trusted
            if worker is not None:
                logger.info("killing grader worker %s (timed out or interrupted)", worker.process.pid)
                self._stop(worker)
                worker = None  # the next caller starts a fresh process in this slot
            raise
        finally:
            self._slots.put(worker)

    def _start(self) -> _Worker:
        worker = _Worker(self._preload)
        with self._lock:
            self._started.add(worker)
        return worker

    def _stop(self, worker: _Worker) -> None:
        with self._lock:
            self._started.discard(worker)
        worker.kill()

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        with self._lock:
            return sorted(w.process.pid for w in self._started if w.alive())

    def shutdown(self) -> None:
        """Kill every worker; later calls start new ones. A forked child leaves its parent's workers be."""
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            workers, self._started = list(self._started), set()
        for worker in workers:
            worker.kill()
