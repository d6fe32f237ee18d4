"""PythonSandbox: run model-written Python in isolated, pre-forked workers: a fresh process per session."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from mathtool.errors import ConfigError, SandboxUnavailable
from mathtool.sandbox.base import RunResult
from mathtool.sandbox.host import WorkerHandle, python_paths
from mathtool.sandbox.pool import WorkerPool
from mathtool.sandbox.protocol import MAX_ERROR_CHARS, WORKER_FAILED, Limits, ZygoteConfig

log = logging.getLogger(__name__)

ACQUIRE_TIMEOUT_S = 300.0  # waiting for a worker when max_workers are alive
MIN_MEMORY_MB = 256  # numpy and sympy are already loaded in every worker
SESSION_LOST = "the session restarted, its variables are gone"
CRASHED = "the process exited before the code finished (os._exit or a fatal signal)"
MALFORMED = "the process sent the sandbox a malformed reply (did the code write to the sandbox's socket?)"
BROKEN = "the code broke the sandbox's own machinery (it replaced something the worker needs to report back)"
FATAL_ERROR = "Fatal Python error: "
SANDBOX_DIR = str(Path(__file__).resolve().parent)


class PythonSandbox:
    """Isolated Python for model-written code. Use as `async with PythonSandbox(...) as sb:`.

    Every caller gets a fresh process of its own, forked from a warm, already-isolated zygote and killed
    when the caller is done: `async with sb.session() as s` keeps state across `s.run()` calls (a
    notebook), and `await sb.run(code)` is a session of one cell. Nothing one caller does (files,
    variables, changed modules, open descriptors, processes) reaches another. Ready workers are kept
    forked ahead of demand, as many as are in use and at least `workers`; `max_workers` caps live worker
    processes, spares included (sessions beyond it wait). `timeout_s` is enforced by the host, whatever the
    code does. `isolation=False` runs code without namespaces: unsafe, and loudly logged.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        *,
        max_output_bytes: int = 65536,
        workers: int = 4,
        max_workers: int = 256,
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
        """Run `code` as a notebook cell (a final bare expression is printed) in a process of its own."""
        async with self.session() as session:
            result, _, _ = await session._run(code)
        return result

    def session(self) -> PythonSession:
        """A context manager whose `run()` calls share one namespace, in a process no one else uses."""
        return PythonSession(self)

    async def _acquire(self) -> WorkerHandle:
        if not self._started:
            raise RuntimeError("use the sandbox inside `async with PythonSandbox(...)`")
        return await self._pool.acquire(ACQUIRE_TIMEOUT_S)


class PythonSession:
    """State that persists across `run()` calls, in a worker process of its own (taken at the first call)."""

    def __init__(self, sandbox: PythonSandbox) -> None:
        self._sandbox = sandbox
        self._pool = sandbox._pool
        self._worker: WorkerHandle | None = None
        self._cells = 0  # cells the current worker has run: its state
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> PythonSession:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def run(self, code: str) -> RunResult:
        """Run `code` in the session's namespace; after a timeout or a crash the next call starts afresh."""
        async with self._lock:
            result, alive, lost = await self._run(code)
        if not alive and result.error:
            result = dataclasses.replace(result, error=f"{result.error}; {SESSION_LOST}")
        if lost:
            result = dataclasses.replace(result, stderr=f"[{SESSION_LOST}: its process ended]\n{result.stderr}")
        return result

    async def close(self) -> None:
        async with self._lock:
            self._drop_worker()

    async def _run(self, code: str) -> tuple[RunResult, bool, bool]:
        """(the result, whether the worker lives on, whether the session's earlier state was lost).

        A worker killed by the death of its zygote did not fail because of the code: the code runs again,
        once, in a fresh worker.
        """
        lost = self._worker is not None and self._worker.exited()  # since the last call (the OOM killer, ...)
        if lost:
            self._drop_worker()
        result, alive, worker = await self._call(code)
        if not alive and self._pool.zygote_died(worker):
            lost = lost or self._cells > 0
            self._drop_worker()
            result, alive, worker = await self._call(code)
        if alive:
            self._cells += 1
        else:
            self._drop_worker()
        return result, alive, lost

    async def _call(self, code: str) -> tuple[RunResult, bool, WorkerHandle]:
        """Run `code` on the session's worker, first taking a fresh one if it has none."""
        worker = self._worker
        fresh = worker is None
        if worker is None:
            worker = self._worker = await self._sandbox._acquire()
            self._cells = 0
        result, alive = await _execute(worker, code, self._sandbox.limits)
        if fresh:
            self._pool.replenish()  # only now: forking a spare would have slowed this first call down
        return result, alive, worker

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._pool.release(self._worker)
            self._worker = None


async def _execute(worker: WorkerHandle, code: str, limits: Limits) -> tuple[RunResult, bool]:
    """Run one cell on `worker`; return the result and whether the worker may run another."""
    start = time.perf_counter()
    timed_out, error = False, ""
    try:
        reply = await worker.call({"code": code}, limits.timeout_s)
    except TimeoutError:
        reply, timed_out, error = {}, True, f"timed out after {limits.timeout_s:g} s"
    except ValueError as exc:
        reply, error = {}, f"{MALFORMED} ({exc})"
    except (EOFError, OSError):
        reply = {}
    except BaseException:
        worker.kill()
        raise
    if not reply:
        worker.kill()
    stdout, stderr = worker.read_output(limits.max_output_bytes)
    if not reply and not error:
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


def _crash_report(stderr: str) -> tuple[str, str]:
    """Cut faulthandler's dump down to its first line and the code's own frames; name the crash."""
    failure = stderr.rfind(WORKER_FAILED)
    if failure >= 0:
        reason = stderr[failure + len(WORKER_FAILED) :].strip()
        return stderr.lstrip("\n"), f"{BROKEN}: {reason}"
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
    return str(error)[:MAX_ERROR_CHARS] if error else None


def _validate(limits: Limits, workers: int, max_workers: int) -> None:
    problems = []
    if limits.timeout_s <= 0:
        problems.append("timeout_s must be positive")
    if limits.memory_mb < MIN_MEMORY_MB:
        problems.append(f"memory_mb must be at least {MIN_MEMORY_MB} (numpy and sympy are preloaded)")
    if limits.max_output_bytes < 1 or limits.scratch_mb < 1:
        problems.append("max_output_bytes and scratch_mb must be at least 1")
    if limits.max_processes < 1 or limits.max_open_files < 16:
        problems.append("max_processes must be at least 1 and max_open_files at least 16")
    if workers < 1 or max_workers < workers:
        problems.append("workers must be at least 1 and max_workers at least workers")
    if problems:
        raise ConfigError("PythonSandbox: " + "; ".join(problems))
