"""The zygote: a warm, already-isolated Python that forks sandbox workers on request.

Started by the host with a clean environment. It unshares user, mount, network, IPC and PID namespaces,
asks the host to write its uid/gid maps, forks once so that it becomes PID 1 of its own PID namespace
(when it dies, every worker dies), pivots into the read-only root, imports numpy and sympy, and then
forks workers ahead of need. Each worker is PID 1 of a PID namespace of its own, so its descendants die
with it. The zygote hands each worker's socket, stdout/stderr memfds and pidfd to the host and keeps
nothing but the duty to reap it: the host talks to workers directly, and kills each when its caller is done.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
from typing import NamedTuple, NoReturn

from mathtool.sandbox import linux, protocol, rootfs, worker
from mathtool.sandbox.protocol import ZygoteConfig

NAMESPACES = linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWIPC | linux.CLONE_NEWPID
PRELOAD = (
    *("numpy", "numpy.random", "numpy.linalg", "numpy.fft", "numpy.polynomial", "sympy", "mpmath"),
    *("math", "cmath", "fractions", "decimal", "random", "statistics", "itertools", "functools", "collections"),
    *("operator", "heapq", "bisect", "re", "string", "numbers", "typing"),
)
# First uses that import more modules or fill caches (sympy's integrate and simplify: 0.1-0.4 s each): done
# once here instead of in every worker.
WARM_UP = """
import numpy, sympy
x = sympy.Symbol("x")
sympy.integrate(x**2 * sympy.exp(x), x), sympy.simplify(sympy.sin(x)**2 + sympy.cos(x)**2)
sympy.solve(x**2 - 4, x), sympy.limit(sympy.sin(x) / x, x, 0), sympy.diff(sympy.exp(x) * sympy.sin(x), x)
sympy.nsimplify(0.5), sympy.sympify("x**2 + 1"), sympy.factorint(2**32 + 1), sympy.Matrix([[1, 2], [3, 4]]).inv()
numpy.linalg.solve(numpy.eye(3), numpy.ones(3))
"""


def main() -> NoReturn:
    config = ZygoteConfig.from_json(sys.argv[1])
    control = socket.socket(fileno=int(sys.argv[2]))
    sys.argv = [""]
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != config.host_pid:
        os._exit(1)
    try:
        isolated = _isolate(config, control) if config.isolation else None
    except Exception as exc:  # whatever stops isolation: tell the host why
        _fail(control, f"{protocol.ISOLATION_FAILED}{type(exc).__name__}: {exc}")
    try:
        zygote = Zygote(config, control, isolated)
    except Exception as exc:
        _fail(control, f"start-up failed: {type(exc).__name__}: {exc}")
    zygote.serve()


def _fail(control: socket.socket, reason: str) -> NoReturn:
    control.send(protocol.ZYGOTE_FAILED + reason.encode())
    os._exit(1)


class Isolation(NamedTuple):
    sandbox_uid: int | None  # what workers run as, if the host could map it
    pid_namespace: int  # an fd of the zygote's PID namespace, to return to after forking each worker
    maps: int  # an fd of the zygote's /proc/self/maps, which the new root lacks


def _isolate(config: ZygoteConfig, control: socket.socket) -> Isolation:
    """Enter the namespaces and the new root."""
    linux.unshare(NAMESPACES)
    control.send(protocol.NEED_ID_MAPS)
    control.settimeout(30)
    reply = control.recv(64)
    control.settimeout(None)
    if not reply.startswith(protocol.ID_MAPS_DONE):
        raise OSError("the host did not write the uid/gid maps")
    sandbox_uid = int(reply[1:]) if reply[1:] else None
    child = os.fork()
    if child:
        _wait_and_exit(child, control)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY)
    maps = os.open("/proc/self/maps", os.O_RDONLY)
    rootfs.build_root(config.read_only_paths)
    return Isolation(sandbox_uid, pid_namespace, maps)


def _wait_and_exit(child: int, control: socket.socket) -> NoReturn:
    """The process left outside the new PID namespace: it only waits for the zygote (its PID 1)."""
    control.close()
    _, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


class Zygote:
    def __init__(self, config: ZygoteConfig, control: socket.socket, isolated: Isolation | None):
        self.config = config
        self.control = control
        self.sandbox_uid = isolated.sandbox_uid if isolated else None
        self.pid_namespace = isolated.pid_namespace if isolated else -1
        self.scratch_dirs: dict[int, str] = {}  # without isolation: each worker's own, removed when it ends
        maps = isolated.maps if isolated else os.open("/proc/self/maps", os.O_RDONLY)
        for name in PRELOAD:
            importlib.import_module(name)
        exec(WARM_UP, {})
        worker.warm_up()
        faulthandler.enable(file=sys.stderr)  # fd 2: in each worker, its stderr memfd
        gc.collect()
        gc.freeze()  # the heap stays shared with workers instead of being copied by the collector
        with open(maps, closefd=True) as listing:
            linux.collapse_into_huge_pages(listing.read())

    def serve(self) -> NoReturn:
        self.control.send(protocol.ZYGOTE_READY)
        while True:
            self._reap()
            readable, _, _ = select.select([self.control], [], [], 1.0)
            if not readable:
                continue
            try:
                message = self.control.recv(64)
            except ConnectionResetError:
                message = b""
            if not message:
                os._exit(0)  # the host is gone or closed us: as PID 1 we take every worker with us
            if message.startswith(protocol.SPAWN):
                try:
                    for _ in range(int(message[1:])):
                        self._spawn()
                except (BrokenPipeError, ConnectionResetError):
                    os._exit(0)  # the host closed us while we were handing over a worker

    def _spawn(self) -> None:
        host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stdout, stderr = os.memfd_create("stdout"), os.memfd_create("stderr")
        # Isolated workers mount a private tmpfs there; others get a directory of their own, made here so
        # that none appears after the host has removed `scratch_root`.
        scratch = "/tmp" if self.config.isolation else tempfile.mkdtemp(prefix="worker-", dir=self.config.scratch_root)
        if self.pid_namespace >= 0:
            linux.unshare(linux.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            os.close(self.control.detach())  # at once: the host hears of the zygote's death when its copy closes
            host_end.detach()
            worker.main([worker_end.detach(), stdout, stderr], self.config, self.sandbox_uid, scratch)
        if not self.config.isolation:
            self.scratch_dirs[pid] = scratch
        if self.pid_namespace >= 0:
            linux.setns(self.pid_namespace, linux.CLONE_NEWPID)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(self.control, [protocol.WORKER], [host_end.fileno(), stdout, stderr, pidfd])
        for fd in (stdout, stderr, pidfd):
            os.close(fd)
        host_end.close()
        worker_end.close()

    def _reap(self) -> None:
        while True:
            try:
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if ended is None:
                return
            self._clean_up_after(ended.si_pid)
            os.waitpid(ended.si_pid, 0)

    def _clean_up_after(self, pid: int) -> None:
        """Without isolation: kill what the worker started (best effort: its process group) and remove its
        scratch directory; before the reap, so that its PID, the group's id, cannot be reused meanwhile."""
        scratch = self.scratch_dirs.pop(pid, None)
        if scratch is None:
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(scratch, ignore_errors=True)
