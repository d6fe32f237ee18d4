"""Hand out fresh workers, one to each caller, and keep enough of them forked ahead of demand.

A worker serves one caller (a session, or one `run()`) and is killed when that caller is done. The pool
keeps ready spares, as many as there are workers in use (at least `min_spares`), and asks the zygote for
replacements as spares are taken: forking and confining a worker stays off the callers' clock.
Callers wait (with a timeout) when `max_workers` are alive. A dead zygote is replaced, and the workers of
a dead zygote are never handed out.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import shutil
import tempfile

from mathtool.errors import SandboxUnavailable
from mathtool.sandbox.host import UNAVAILABLE_HINT, WorkerHandle, Zygote
from mathtool.sandbox.protocol import ZygoteConfig

log = logging.getLogger(__name__)

WORKER_READY_TIMEOUT_S = 30.0
MAX_PENDING_SPAWNS = 8  # workers being forked and confined at once: more only slows the ones in use


class WorkerPool:
    def __init__(self, config: ZygoteConfig, min_spares: int, max_workers: int) -> None:
        self.config = config
        self.min_spares = min_spares
        self.max_workers = max_workers
        self.spares: collections.deque[WorkerHandle] = collections.deque()
        self.waiters: collections.deque[asyncio.Future[WorkerHandle]] = collections.deque()
        self.in_use = 0  # handed to callers (or to a waiter's future), not yet released
        self.pending = 0  # asked of the zygote, not yet ready
        self.generation = 0
        self.zygote: Zygote | None = None
        self.starting: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.ever_ready = False
        self.closed = False

    async def start(self) -> None:
        """Start the zygote and check that a worker can be set up (SandboxUnavailable otherwise)."""
        if not self.config.isolation:
            scratch_root = tempfile.mkdtemp(prefix="mathtool-sandbox-")
            self.config = dataclasses.replace(self.config, scratch_root=scratch_root)
        await self._start_zygote()
        worker = await self.acquire(WORKER_READY_TIMEOUT_S)
        self.in_use -= 1
        self._offer(worker)

    async def acquire(self, timeout_s: float) -> WorkerHandle:
        """A fresh, ready worker for one caller, who gives it back with `release()` and calls `replenish()`
        once its first call is answered (a fork on the other core would slow that call down)."""
        while True:
            if self.spares:
                worker = self.spares.popleft()
                self.in_use += 1
            else:
                worker = await self._wait(timeout_s)
            if worker.generation == self.generation and not worker.exited():
                return worker
            self.release(worker)

    def release(self, worker: WorkerHandle) -> None:
        """Kill a worker whose caller is done with it, and ask for a replacement if one is needed."""
        worker.close()
        self.in_use -= 1
        self.replenish()

    def zygote_died(self, worker: WorkerHandle) -> bool:
        """Whether `worker`'s zygote has exited: the host hears of that before the zygote's workers die."""
        if self.zygote is not None:
            self.zygote.poll()
        return worker.generation != self.generation

    async def close(self) -> None:
        self.closed = True
        for task in [*self.tasks, *([self.starting] if self.starting else [])]:
            task.cancel()
        for worker in self.spares:
            worker.close()
        self.spares.clear()
        self._fail_waiters(RuntimeError("the sandbox was closed"))
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        if self.config.scratch_root:
            shutil.rmtree(self.config.scratch_root, ignore_errors=True)

    async def _wait(self, timeout_s: float) -> WorkerHandle:
        future: asyncio.Future[WorkerHandle] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        self.replenish()
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            self._give_back(future)
            raise TimeoutError(f"no sandbox worker became free within {timeout_s:g} s") from None
        except BaseException:
            self._give_back(future)
            raise

    def _give_back(self, future: asyncio.Future[WorkerHandle]) -> None:
        """A waiter gave up (timeout, cancellation): a worker handed to it meanwhile goes back."""
        if future in self.waiters:
            self.waiters.remove(future)
        elif not future.cancelled() and future.exception() is None:
            self.in_use -= 1
            self._offer(future.result())

    def _offer(self, worker: WorkerHandle) -> None:
        """A ready worker: to the first caller waiting, else among the spares."""
        if self.closed or worker.generation != self.generation:
            worker.close()
            return
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():  # else cancelled, its caller not yet told
                self.in_use += 1
                future.set_result(worker)
                return
        self.spares.append(worker)

    def replenish(self) -> None:
        """Ask the zygote for the spares missing: one for each worker in use (at least `min_spares`), and one
        for each caller waiting."""
        if self.closed:
            return
        if self.zygote is None:
            if self.starting is None and (self.waiters or self.ever_ready):
                self.starting = asyncio.get_running_loop().create_task(self._restart_zygote())
            return
        wanted = max(self.min_spares, self.in_use) + len(self.waiters) - len(self.spares) - self.pending
        alive = self.in_use + len(self.spares) + self.pending
        wanted = min(wanted, MAX_PENDING_SPAWNS - self.pending, self.max_workers - alive)
        if wanted > 0:
            self.zygote.spawn(wanted)
            self.pending += wanted

    async def _start_zygote(self) -> None:
        self.generation += 1
        zygote = Zygote(self.config, self.generation, self._on_worker, self._on_zygote_exit)
        try:
            await zygote.start()
        except BaseException:
            zygote.close()
            raise
        self.zygote = zygote
        zygote.listen()
        self.replenish()

    async def _restart_zygote(self) -> None:
        try:
            await self._start_zygote()
        except Exception as exc:
            log.error("could not restart the sandbox zygote: %s", exc)
            self._fail_waiters(exc)
        finally:
            self.starting = None

    def _on_worker(self, worker: WorkerHandle) -> None:
        task = asyncio.get_running_loop().create_task(self._await_ready(worker))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _await_ready(self, worker: WorkerHandle) -> None:
        try:
            ready = await worker.wait_ready(WORKER_READY_TIMEOUT_S)
        except BaseException:  # cancelled: the sandbox is closing
            worker.close()
            raise
        if worker.generation != self.generation:
            worker.close()  # its zygote died meanwhile, and took the pending count with it
            return
        self.pending -= 1
        if ready:
            self.ever_ready = True
            self._offer(worker)
        else:
            self._failed_to_start(worker)
        self.replenish()

    def _failed_to_start(self, worker: WorkerHandle) -> None:
        stderr = worker.read_output(4096)[1].strip()
        worker.close()
        log.warning("a sandbox worker failed to start: %s", stderr)
        if not self.ever_ready:
            self._fail_waiters(SandboxUnavailable(f"sandbox workers cannot start: {stderr}. {UNAVAILABLE_HINT}"))

    def _on_zygote_exit(self, zygote: Zygote) -> None:
        if zygote is not self.zygote:
            return
        log.warning("the sandbox zygote exited (code %s); starting a new one", zygote.process.returncode)
        self.zygote = None
        self.generation += 1
        self.pending = 0
        for worker in self.spares:
            worker.close()
        self.spares.clear()
        self.replenish()

    def _fail_waiters(self, exc: BaseException) -> None:
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_exception(exc)
