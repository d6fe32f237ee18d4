"""A small pool of worker processes in which any one stuck call can be killed and its worker replaced.

`concurrent.futures.ProcessPoolExecutor` and `multiprocessing.Pool` can only be torn down whole, which
would fail every other call in flight. Here each worker is one subprocess with a socket; a caller checks
a worker out, sends one job, waits on the socket with a timeout, and on timeout kills that worker alone;
the next caller starts a fresh process in its place.

`size` calls run at once, plus one for each call that has run longer than `slow_after_s`, up to
`max_size`: cheap jobs do not queue behind a few slow ones. Idle workers are kept (at most `max_size`).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mathtool.grading.worker import READY

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # starting Python and importing sympy on a busy 2-core box
SLOW_AFTER_S = 0.5  # a job running longer than this (most take milliseconds) frees its slot's place
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

    def send(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self.conn.send((fn, args))
        except OSError as exc:
            raise WorkerDied(f"worker {self.process.pid} is gone") from exc

    def wait(self, timeout_s: float) -> bool:
        """True once the reply (or the worker's death) is there to read, False after `timeout_s`."""
        return self.conn.poll(max(0.0, timeout_s))

    def result(self) -> Any:
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
    """Worker processes started on demand; `call()` is safe from any number of threads at once."""

    def __init__(
        self,
        size: int,
        preload: Sequence[str] = (),
        max_size: int | None = None,
        slow_after_s: float = SLOW_AFTER_S,
    ) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.size = size
        self.max_size = max(size, max_size or size)
        self.slow_after_s = slow_after_s
        self._preload = tuple(preload)
        self._places = threading.Condition()  # guards everything below
        self._idle: list[_Worker] = []
        self._running = 0  # calls holding a place
        self._slow = 0  # of which running longer than slow_after_s
        self._live = 0  # workers alive or being started: never more than max_size
        self._started: set[_Worker] = set()
        self._spares_started = False
        self._filling = False
        self._owner_pid = os.getpid()
        atexit.register(self.shutdown)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float, wait_s: float) -> Any:
        """Run `fn(*args)` in a worker; raise WorkerTimeout after `timeout_s` (the worker is then killed).

        `wait_s` bounds the wait for a place; a worker's start-up is not counted in `timeout_s`.
        `fn` must be a module-level function importable in the worker (it is pickled by name).
        """
        self._start_spares_once()
        worker = self._check_out(wait_s)
        slow = False
        try:
            if worker is not None and not worker.alive():  # it died between calls: a new one takes its place
                self._kill(worker, keep_place=True)
                worker = None
            if worker is None:
                worker = self._start()
            worker.send(fn, args)
            first_wait = min(timeout_s, self.slow_after_s)
            if not worker.wait(first_wait):
                if timeout_s > first_wait:  # a slow job: its place goes to the next caller while it runs on
                    self._mark_slow()
                    slow = True
                if not worker.wait(timeout_s - first_wait):
                    raise WorkerTimeout(f"no answer within {timeout_s:.2f} s")
            return worker.result()
        except WorkerError as exc:  # the job raised (the worker is fine), or the worker died or did not start
            if worker is not None and isinstance(exc, WorkerDied):
                self._kill(worker)
                worker = None
            raise
        except BaseException:  # a timeout, or this caller interrupted mid-call: the socket can't be trusted
            if worker is not None:
                logger.info("killing grader worker %s (timed out or interrupted)", worker.process.pid)
                self._kill(worker)
                worker = None
            raise
        finally:
            self._check_in(worker, slow)

    def _capacity(self) -> int:
        return min(self.max_size, self.size + self._slow)

    def _check_out(self, wait_s: float) -> _Worker | None:
        """A place to run in, with an idle worker or None (then start one); WorkerTimeout after `wait_s`."""
        deadline = time.monotonic() + wait_s
        with self._places:
            while self._running >= self._capacity() or not (self._idle or self._live < self.max_size):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerTimeout(f"no free grader worker within {wait_s:.0f} s")
                self._places.wait(remaining)
            self._running += 1
            if self._idle:
                return self._idle.pop()
            self._live += 1  # the caller starts this one
            return None

    def _mark_slow(self) -> None:
        with self._places:
            self._slow += 1
            self._places.notify_all()

    def _check_in(self, worker: _Worker | None, slow: bool) -> None:
        with self._places:
            self._running -= 1
            if slow:
                self._slow -= 1
            if worker is not None:
                self._idle.append(worker)
            self._places.notify_all()

    def start_all(self, timeout_s: float) -> None:
        """Start workers up to max_size now, not on demand, and wait up to `timeout_s` for them."""
        self._fill_in_background()
        deadline = time.monotonic() + timeout_s
        while len(self.pids()) < self.max_size and time.monotonic() < deadline:
            time.sleep(0.05)

    def _start_spares_once(self) -> None:
        """On first use of a pool that can grow, start its other workers in the background: warm when needed."""
        with self._places:
            if self._spares_started or self.max_size == self.size:
                return
            self._spares_started = True
        self._fill_in_background()

    def _fill_in_background(self) -> None:
        with self._places:
            if self._filling:
                return
            self._filling = True
        threading.Thread(target=self._fill, name="grader-spares", daemon=True).start()

    def _fill(self) -> None:
        """Start workers one at a time (each is idle until needed) until max_size are alive or starting."""
        try:
            while True:
                with self._places:
                    if self._live >= self.max_size:
                        return
                    self._live += 1
                worker = self._start()
                with self._places:
                    self._idle.append(worker)
                    self._places.notify_all()
        except WorkerError as exc:
            logger.warning("no spare grader worker: %s", exc)
        finally:
            with self._places:
                self._filling = False

    def _start(self) -> _Worker:
        """Start a worker whose place in _live is already counted; uncount it if it does not start."""
        try:
            worker = _Worker(self._preload)
        except BaseException:
            with self._places:
                self._live -= 1
                self._places.notify_all()
            raise
        with self._places:
            self._started.add(worker)
        return worker

    def _kill(self, worker: _Worker, keep_place: bool = False) -> None:
        with self._places:
            self._started.discard(worker)
            if not keep_place:
                self._live -= 1
                self._places.notify_all()
        worker.kill()

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        with self._places:
            return sorted(w.process.pid for w in self._started if w.alive())

    def shutdown(self) -> None:
        """Kill every worker; later calls start new ones. A forked child leaves its parent's workers be."""
        if os.getpid() != self._owner_pid:
            return
        with self._places:
            workers, self._started = list(self._started), set()
        for worker in workers:
            worker.kill()
