"""The host's ends of the zygote and of each worker: starting the zygote, and talking to a worker.

`Zygote` launches the zygote with a clean environment, writes its uid/gid maps when asked, and receives
the workers it forks. `WorkerHandle` sends a worker requests, reads its replies (JSON, never trusted) and
its stdout/stderr memfds, and kills it through a pidfd.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mathtool.errors import SandboxUnavailable
from mathtool.sandbox import protocol
from mathtool.sandbox.protocol import ZygoteConfig

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0  # importing numpy and sympy on a loaded 2-core machine
UNAVAILABLE_HINT = (
    "The Python sandbox needs Linux user, mount, PID and network namespaces "
    "(check `unshare -Urn true`; sysctls user.max_user_namespaces, kernel.unprivileged_userns_clone). "
    "To run model-written code WITHOUT isolation, pass isolation=False."
)
# The zygote is started without running the package __init__ (no asyncio there: a smaller zygote forks faster).
BOOT = """import sys, types
for name, path in {packages!r}:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
from mathtool.sandbox.zygote import main
main()
"""


def clean_environment() -> dict[str, str]:
    """All the worker's environment: nothing of ours (API keys live there), one thread per math library."""
    threads = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    path = f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin"
    return {"PATH": path, "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", **threads}


def python_paths() -> list[str]:
    """The Python installation and virtual environment, which workers see read-only."""
    prefixes = (sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix)
    return sorted({os.path.abspath(p) for p in prefixes} | {os.path.realpath(p) for p in prefixes})


def write_id_maps(pid: int) -> int | None:
    """Map the zygote's root to us; as real root, also map SANDBOX_UID for the workers. Returns it if mapped."""
    proc, uid, gid = Path(f"/proc/{pid}"), os.geteuid(), os.getegid()
    if uid == 0:
        both = f"0 0 1\n{protocol.SANDBOX_UID} {protocol.SANDBOX_UID} 1\n"
        try:
            (proc / "uid_map").write_text(both)
            (proc / "gid_map").write_text(both)
            return protocol.SANDBOX_UID
        except OSError:
            log.debug("could not map a second id; workers keep the zygote's", exc_info=True)
    (proc / "uid_map").write_text(f"0 {uid} 1\n")
    (proc / "setgroups").write_text("deny")
    (proc / "gid_map").write_text(f"0 {gid} 1\n")
    return None


class WorkerHandle:
    """The host's end of one worker: its socket, its stdout/stderr memfds and a pidfd to kill it by.

    The worker says {"ready": true} once it is confined; `wait_ready()` reads that, and `call()` needs it.
    The socket is watched by the event loop for the worker's whole life, not registered anew for each reply.
    """

    def __init__(self, fds: list[int], generation: int) -> None:
        self.sock = socket.socket(fileno=fds[0])
        self.sock.setblocking(False)
        self.stdout, self.stderr, self.pidfd = fds[1:]
        self.generation = generation
        self.closed = False
        self.ready = False
        self.buffer = bytearray()
        self.ended = False
        self.waiter: asyncio.Future[dict[str, Any]] | None = None
        asyncio.get_running_loop().add_reader(self.sock, self._readable)

    async def call(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send a request and wait for the reply; TimeoutError, EOFError or ValueError if there is none."""
        if not self.ready:
            raise RuntimeError("a request to a worker that has not said it is ready")
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().sock_sendall(self.sock, protocol.encode_frame(message))
            return await self.next_frame()

    async def wait_ready(self, timeout_s: float) -> bool:
        """Whether the worker says it can take requests (False if it dies or says nothing)."""
        try:
            async with asyncio.timeout(timeout_s):
                frame = await self.next_frame()
        except (TimeoutError, EOFError, ValueError, OSError):
            return False
        self.ready = frame.get("ready") is True
        return self.ready

    async def next_frame(self) -> dict[str, Any]:
        frame = self._buffered_frame()
        if frame is not None:
            return frame
        if self.ended:
            raise EOFError("the worker closed its socket")
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def _readable(self) -> None:
        """Take what the worker sent, whenever it sends it: no more than a reply's worth is kept (a worker
        that sends more, even between calls, is read no further and its next call fails)."""
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.buffer += chunk
        if not chunk or len(self.buffer) > protocol.HEADER.size + protocol.MAX_REPLY_BYTES:
            self.ended = True
            asyncio.get_running_loop().remove_reader(self.sock)
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            frame = self._buffered_frame()
        except ValueError as exc:
            waiter.set_exception(exc)
            return
        if frame is not None:
            waiter.set_result(frame)
        elif self.ended:
            waiter.set_exception(EOFError("the worker closed its socket"))

    def _buffered_frame(self) -> dict[str, Any] | None:
        body = protocol.take_frame(self.buffer, protocol.MAX_REPLY_BYTES)
        return None if body is None else _decode_reply(body)

    def exited(self) -> bool:
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def read_output(self, limit: int) -> tuple[str, str]:
        return _read_stream(self.stdout, limit), _read_stream(self.stderr, limit)

    def kill(self) -> None:
        if not self.closed:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.kill()
        if not self.closed:
            self.closed = True
            if not self.ended:
                asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
            for fd in (self.stdout, self.stderr, self.pidfd):
                os.close(fd)


def _decode_reply(body: bytes) -> dict[str, Any]:
    """The worker's JSON reply; the worker runs untrusted code, so anything malformed is a ValueError."""
    try:
        reply = json.loads(body.decode())
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"a malformed reply: {exc}") from None
    if not isinstance(reply, dict):
        raise ValueError("a reply that is not an object")
    return reply


def _read_stream(fd: int, limit: int) -> str:
    """What the call wrote (up to `limit` bytes, then a marker); the memfd is emptied for the next call."""
    size = os.fstat(fd).st_size
    if size == 0:
        return ""
    text = os.pread(fd, min(size, limit), 0).decode("utf-8", "replace")
    os.ftruncate(fd, 0)
    if size > limit:
        text += f"\n[... output truncated: {size - limit} more bytes not shown ...]"
    return text


class Zygote:
    """The zygote process and its control socket; worker handles arrive through `on_worker`, and its exit
    through `on_exit`, once `listen()` was called (or in `poll()`)."""

    def __init__(
        self,
        config: ZygoteConfig,
        generation: int,
        on_worker: Callable[[WorkerHandle], None],
        on_exit: Callable[[Zygote], None],
    ) -> None:
        self.config = config
        self.generation = generation
        self.control, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control.setblocking(False)
        self.on_worker, self.on_exit = on_worker, on_exit
        sandbox_dir = Path(__file__).resolve().parent
        packages = [("mathtool", str(sandbox_dir.parent)), ("mathtool.sandbox", str(sandbox_dir))]
        boot = BOOT.format(packages=packages)
        command = [sys.executable, "-I", "-c", boot, config.to_json(), str(child_end.fileno())]
        self.process = subprocess.Popen(
            command,
            env=clean_environment(),
            pass_fds=[child_end.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            cwd="/",
        )
        child_end.close()

    async def start(self) -> None:
        """Answer the id-map request and wait until the zygote is ready; SandboxUnavailable if it cannot be."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while True:
                message = await loop.sock_recv(self.control, 65536)
                if not message:
                    raise SandboxUnavailable(f"the sandbox zygote exited during start-up. {UNAVAILABLE_HINT}")
                if message == protocol.ZYGOTE_READY:
                    return
                if message.startswith(protocol.ZYGOTE_FAILED):
                    reason = message[1:].decode(errors="replace")
                    hint = UNAVAILABLE_HINT if reason.startswith(protocol.ISOLATION_FAILED) else ""
                    raise SandboxUnavailable(f"the Python sandbox cannot start ({reason}). {hint}".strip())
                if message == protocol.NEED_ID_MAPS:
                    mapped = write_id_maps(self.process.pid)
                    suffix = str(mapped).encode() if mapped is not None else b""
                    await loop.sock_sendall(self.control, protocol.ID_MAPS_DONE + suffix)

    def spawn(self, count: int) -> None:
        try:
            self.control.send(protocol.SPAWN + str(count).encode())
        except OSError:
            log.debug("could not ask the zygote for workers", exc_info=True)  # its death arrives as EOF

    def listen(self) -> None:
        asyncio.get_running_loop().add_reader(self.control, self.poll)

    def poll(self) -> None:
        """Take what the zygote sent (new workers), and notice its exit: the end of its socket, which comes
        before its workers die, or the exit of the process we started."""
        while self.control.fileno() >= 0:
            try:
                message, fds, _, _ = socket.recv_fds(self.control, 4096, 4, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                if self.process.poll() is None:
                    return
                message, fds = b"", []
            except OSError:
                message, fds = b"", []
            if not message:
                self.close()
                self.on_exit(self)
                return
            if message == protocol.WORKER and len(fds) == 4:
                self.on_worker(WorkerHandle(fds, self.generation))
            else:
                for fd in fds:
                    os.close(fd)

    def close(self) -> None:
        if self.control.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.control)
            self.control.close()
        if self.process.poll() is None:
            self.process.kill()  # the zygote (PID 1 of its namespace) dies with it, and so do all workers
        self.process.wait()
