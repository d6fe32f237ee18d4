"""Hand out workers: `spares` fresh ones forked ahead of need, warm ones kept after `run()` calls.

Callers wait (with a timeout) when `max_workers` are busy; a dead zygote is replaced, and workers of a
dead zygote are never handed out again.
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
MAX_PENDING_SPAWNS = 4
MIN_IDLE_USED = 16  # warm workers kept for reuse after run() calls, at least


class WorkerPool:
    def __init__(self, config: ZygoteConfig, spares: int, max_workers: int) -> None:
        self.config = config
        self.spare_target = spares
        self.max_workers = max_workers
        self.spares: collections.deque[WorkerHandle] = collections.deque()
        self.used: collections.deque[WorkerHandle] = collections.deque()
        self.waiters: collections.deque[tuple[bool, asyncio.Future[WorkerHandle]]] = collections.deque()
        self.live = 0  # workers we hold or asked for
        self.pending = 0  # asked for, not yet arrived
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
        self.release(await self.acquire(fresh=True, timeout_s=WORKER_READY_TIMEOUT_S), reusable=True, fresh=True)

    async def acquire(self, fresh: bool, timeout_s: float) -> WorkerHandle:
        """A ready worker: a never-used one if `fresh`, else preferably one already warm from `run()` calls."""
        while True:
            worker = self._take(fresh)
            if worker is None:
                worker = await self._wait(fresh, timeout_s)
            try:
                usable = worker.generation == self.generation and not worker.exited()
                usable = usable and await worker.wait_ready(WORKER_READY_TIMEOUT_S)
            except BaseException:
                self.retire(worker)
                raise
            if usable:
                self._replenish()
                return worker
            self.retire(worker)

    async def _wait(self, fresh: bool, timeout_s: float) -> WorkerHandle:
        future: asyncio.Future[WorkerHandle] = asyncio.get_running_loop().create_future()
        self.waiters.append((fresh, future))
        self._replenish()
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            self._give_back(future, fresh)
            raise TimeoutError(f"no sandbox worker became free within {timeout_s:g} s") from None
        except BaseException:
            self._give_back(future, fresh)
            raise

    def _give_back(self, future: asyncio.Future[WorkerHandle], fresh: bool) -> None:
        """A waiter gave up (timeout, cancellation): a worker handed to it meanwhile goes back."""
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result(), reusable=True, fresh=fresh)

    def release(self, worker: WorkerHandle, reusable: bool, fresh: bool = False) -> None:
        if reusable and not self.closed and not worker.closed and worker.generation == self.generation:
            self._offer(worker, fresh)
        else:
            self.retire(worker)

    def retire(self, worker: WorkerHandle) -> None:
        if not worker.closed:
            worker.close()
            self.live -= 1
        self._replenish()

    async def close(self) -> None:
        self.closed = True
        for task in [*self.tasks, *([self.starting] if self.starting else [])]:
            task.cancel()
        for worker in [*self.spares, *self.used]:
            worker.close()
        self.spares.clear()
        self.used.clear()
        for _, future in self.waiters:
            if not future.done():
                future.set_exception(RuntimeError("the sandbox was closed"))
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        if self.config.scratch_root:
            shutil.rmtree(self.config.scratch_root, ignore_errors=True)

    def _take(self, fresh: bool) -> WorkerHandle | None:
        """A warm worker that finished preparing since its last call, else a spare, else any warm one.

        The most recently used first: sequential calls alternate between two workers whose memory is
        still in the CPU caches (one serves while the other prepares).
        """
        if not fresh:
            for worker in reversed(self.used):
                if worker.maybe_ready():
                    self.used.remove(worker)
                    return worker
        if self.spares:
            return self.spares.popleft()
        return self.used.pop() if self.used and not fresh else None

    def _offer(self, worker: WorkerHandle, fresh: bool) -> None:
        for entry in self.waiters:
            needs_fresh, future = entry
            if not future.done() and (fresh or not needs_fresh):
                self.waiters.remove(entry)
                future.set_result(worker)
                return
        if fresh:
            self.spares.append(worker)
        elif len(self.used) < max(self.spare_target, MIN_IDLE_USED):
            self.used.append(worker)
        else:
            self.retire(worker)

    def _replenish(self) -> None:
        if self.closed:
            return
        while self.waiters and self.waiters[0][1].done():
            self.waiters.popleft()
        if self.zygote is None:
            if self.starting is None and (self.waiters or self.ever_ready):
                self.starting = asyncio.get_running_loop().create_task(self._restart_zygote())
            return
        waiting = sum(not future.done() for _, future in self.waiters)
        wanted = self.spare_target + waiting - len(self.spares) - self.pending
        wanted = min(wanted, MAX_PENDING_SPAWNS - self.pending, self.max_workers - self.live)
        if wanted > 0:
            self.zygote.spawn(wanted)
            self.pending += wanted
            self.live += wanted

    async def _start_zygote(self) -> None:
        self.generation += 1
        zygote = Zygote(self.config, self.generation)
        try:
            await zygote.start()
        except BaseException:
            zygote.close()
            raise
        self.zygote = zygote
        zygote.listen(self._on_worker, self._on_zygote_exit)
        self._replenish()

    async def _restart_zygote(self) -> None:
        try:
            await self._start_zygote()
        except Exception as exc:
            log.error("could not restart the sandbox zygote: %s", exc)
            self._fail_waiters(exc)
        finally:
            self.starting = None

    def _on_worker(self, worker: WorkerHandle) -> None:
        self.pending -= 1
        task = asyncio.get_running_loop().create_task(self._await_ready(worker))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _await_ready(self, worker: WorkerHandle) -> None:
        try:
            ready = await worker.wait_ready(WORKER_READY_TIMEOUT_S)
        except BaseException:  # cancelled: the sandbox is closing
            worker.close()
            raise
        if not ready:
            stderr = worker.read_output(4096)[1].strip()
            worker.close()
            self.live -= 1
            if worker.generation != self.generation:
                return  # its zygote died meanwhile
            log.warning("a sandbox worker failed to start: %s", stderr)
            if not self.ever_ready:
                self._fail_waiters(SandboxUnavailable(f"sandbox workers cannot start: {stderr}. {UNAVAILABLE_HINT}"))
            self._replenish()
            return
        self.ever_ready = True
        self.release(worker, reusable=True, fresh=True)

    def _on_zygote_exit(self, zygote: Zygote) -> None:
        if zygote is not self.zygote:
            return
        log.warning("the sandbox zygote exited (code %s); starting a new one", zygote.process.returncode)
        self.zygote = None
        self.generation += 1
        self.live -= self.pending
        self.pending = 0
        for worker in [*self.spares, *self.used]:
            worker.close()
            self.live -= 1
        self.spares.clear()
        self.used.clear()
        self._replenish()

    def _fail_waiters(self, exc: BaseException) -> None:
        while self.waiters:
            _, future = self.waiters.popleft()
            if not future.done():
                future.set_exception(exc)
