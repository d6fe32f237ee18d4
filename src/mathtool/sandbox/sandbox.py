"""PythonSandbox: run model-written Python in isolated, pre-forked workers; one-off calls and sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from mathtool.errors import ConfigError, SandboxUnavailable
from mathtool.sandbox.host import WorkerHandle, python_paths
from mathtool.sandbox.pool import WorkerPool
from mathtool.sandbox.protocol import Limits, ZygoteConfig

log = logging.getLogger(__name__)

ACQUIRE_TIMEOUT_S = 300.0  # waiting for a free worker when max_workers are busy
READY_TIMEOUT_S = 30.0  # a worker getting ready for its next call (normally well under a millisecond)
MIN_MEMORY_MB = 256  # numpy and sympy are already loaded in every worker
SESSION_LOST = "the session restarted, its variables are gone"
CRASHED = "the process exited before the code finished (os._exit or a fatal signal)"
FATAL_ERROR = "Fatal Python error: "
SANDBOX_DIR = str(Path(__file__).resolve().parent)


@dataclass(frozen=True)
class RunResult:
    stdout: str
    stderr: str  # tracebacks included, already trimmed of the sandbox's own frames
    ok: bool  # the code ran to the end without an uncaught exception
    timed_out: bool = False
    duration_s: float = 0.0
    error: str | None = None  # one line: "ZeroDivisionError: division by zero", "timed out after 5 s", ...


class PythonSandbox:
    """Isolated Python for model-written code. Use as `async with PythonSandbox(...) as sb:`.

    `await sb.run(code)` runs each call in a fresh namespace on a warm worker; a worker whose call left a
    trace in the process (threads, files in /tmp, changed limits or signal handlers, imported modules or
    module attributes, import hooks, numeric settings of decimal/numpy/mpmath) is replaced, and every
    worker after `calls_per_worker` calls. State deeper inside objects (a class attribute, a list held by
    a module) is not compared: `calls_per_worker=1` gives every call a new process (~10x slower).
    `async with sb.session() as s` keeps state across `s.run()` calls in a process no one else uses.
    `workers` fresh workers are kept forked ahead of need; `max_workers` caps live worker processes
    (each session holds one). `timeout_s` is enforced by the host, whatever the code does.
    `isolation=False` runs code without namespaces: unsafe, and loudly logged.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        *,
        max_output_bytes: int = 65536,
        workers: int = 4,
        max_workers: int = 256,
        calls_per_worker: int = 100,
        max_processes: int = 64,
        max_open_files: int = 256,
        scratch_mb: int = 64,
        isolation: bool = True,
    ) -> None:
        self.limits = Limits(
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            max_output_bytes=max_output_bytes,
            max_processes=max_processes,
            max_open_files=max_open_files,
            scratch_mb=scratch_mb,
            calls_per_worker=calls_per_worker,
        )
        _validate(self.limits, workers, max_workers)
        self.isolation = isolation
        config = ZygoteConfig(self.limits, isolation, os.getpid(), python_paths())
        self._pool = WorkerPool(config, workers, max_workers)
        self._started = False

    async def __aenter__(self) -> PythonSandbox:
        if not sys.platform.startswith("linux"):
            raise SandboxUnavailable(f"the Python sandbox needs Linux, not {sys.platform}")
        if not self.isolation:
            log.warning(
                "PythonSandbox(isolation=False): model-written code will run WITHOUT isolation. "
                "It can read and write your files, use the network and kill your processes."
            )
        try:
            await self._pool.start()
        except BaseException:
            await self._pool.close()
            raise
        self._started = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._started = False
        await self._pool.close()

    async def run(self, code: str) -> RunResult:
        """Run `code` in a fresh namespace, as a notebook cell (a final bare expression is printed)."""
        worker = await self._acquire(fresh=False)
        reusable = False
        try:
            result, reusable = await self._execute(worker, code, in_session=False)
        finally:
            self._pool.release(worker, reusable)
        return result

    def session(self) -> PythonSession:
        """A context manager whose `run()` calls share one namespace, in a worker used by no one else."""
        return PythonSession(self)

    async def _acquire(self, fresh: bool) -> WorkerHandle:
        if not self._started:
            raise RuntimeError("use the sandbox inside `async with PythonSandbox(...)`")
        return await self._pool.acquire(fresh, ACQUIRE_TIMEOUT_S)

    async def _execute(self, worker: WorkerHandle, code: str, in_session: bool) -> tuple[RunResult, bool]:
        """Run one call on `worker`; return the result and whether the worker may serve another call."""
        start = time.perf_counter()
        timed_out, error = False, CRASHED
        try:
            reply = await worker.call({"code": code, "session": in_session}, self.limits.timeout_s)
        except TimeoutError:
            reply, timed_out, error = {}, True, f"timed out after {self.limits.timeout_s:g} s"
        except (EOFError, ValueError, OSError):
            reply = {}
        except BaseException:
            worker.kill()
            raise
        if not reply:
            worker.kill()
        stdout, stderr = worker.read_output(self.limits.max_output_bytes)
        if not reply and not timed_out:
            stderr, error = _crash_report(stderr)
        result = RunResult(
            stdout=stdout,
            stderr=stderr,
            ok=bool(reply.get("ok")),
            timed_out=timed_out,
            duration_s=time.perf_counter() - start,
            error=_error_line(reply, error),
        )
        return result, bool(reply)


class PythonSession:
    """State that persists across `run()` calls; isolated from every other session and call."""

    def __init__(self, sandbox: PythonSandbox) -> None:
        self._sandbox = sandbox
        self._worker: WorkerHandle | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> PythonSession:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def run(self, code: str) -> RunResult:
        """Run `code` in the session's namespace; after a timeout or a crash the next call starts afresh."""
        async with self._lock:
            worker, lost = await self._ready_worker()
            self._worker, alive = None, False
            try:
                result, alive = await self._sandbox._execute(worker, code, in_session=True)
            finally:
                if alive:
                    self._worker = worker
                else:
                    self._sandbox._pool.retire(worker)
            if not alive and result.error:
                result = dataclasses.replace(result, error=f"{result.error}; {SESSION_LOST}")
            if lost:
                result = dataclasses.replace(result, stderr=f"[{SESSION_LOST}: its process ended]\n{result.stderr}")
            return result

    async def _ready_worker(self) -> tuple[WorkerHandle, bool]:
        """The session's worker, once it says it is ready; else a fresh one, and True: the state is lost."""
        worker, lost = self._worker, False
        if worker is not None and (worker.exited() or not await worker.wait_ready(READY_TIMEOUT_S)):
            self._sandbox._pool.retire(worker)
            worker, lost = None, True
        if worker is None:
            worker = await self._sandbox._acquire(fresh=True)
        return worker, lost

    async def close(self) -> None:
        async with self._lock:
            if self._worker is not None:
                self._sandbox._pool.retire(self._worker)
                self._worker = None


def _crash_report(stderr: str) -> tuple[str, str]:
    """Cut faulthandler's dump down to its first line and the code's own frames; name the crash."""
    start = stderr.find(FATAL_ERROR)
    if start < 0:
        return stderr, CRASHED
    dump = stderr[start:].splitlines()
    frames = list(itertools.takewhile(lambda line: line.startswith("  File "), dump[3:]))  # the first thread's
    frames = [line for line in frames if SANDBOX_DIR not in line and '"<string>"' not in line]
    report = "\n".join([dump[0], "Most recent call first:", *frames])
    return f"{stderr[:start]}{report}\n", f"the process crashed: {dump[0].removeprefix(FATAL_ERROR)}"


def _error_line(reply: dict[str, Any], fallback: str) -> str | None:
    if not reply:
        return fallback
    error = reply.get("error")
    return str(error)[:1000] if error else None


def _validate(limits: Limits, workers: int, max_workers: int) -> None:
    problems = []
    if limits.timeout_s <= 0:
        problems.append("timeout_s must be positive")
    if limits.memory_mb < MIN_MEMORY_MB:
        problems.append(f"memory_mb must be at least {MIN_MEMORY_MB} (numpy and sympy are preloaded)")
    if limits.max_output_bytes < 1 or limits.calls_per_worker < 1 or limits.scratch_mb < 1:
        problems.append("max_output_bytes, calls_per_worker and scratch_mb must be at least 1")
    if limits.max_processes < 1 or limits.max_open_files < 16:
        problems.append("max_processes must be at least 1 and max_open_files at least 16")
    if workers < 1 or max_workers < workers:
        problems.append("workers must be at least 1 and max_workers at least workers")
    if problems:
        raise ConfigError("PythonSandbox: " + "; ".join(problems))
