"""A sandbox worker: a child forked by the zygote that confines itself, then runs one caller's code cells.

Isolated, a worker is PID 1 of its own PID namespace, with a private mount namespace (a fresh tmpfs on
/tmp, where /dev/shm points too), network and IPC namespaces of its own, a user namespace of its own (so
RLIMIT_NPROC counts only its processes), no capabilities and no_new_privs. File descriptors: 0 /dev/null,
1 and 2 the stdout and stderr memfds (shared with the host), 3 the socket to the host, 4 and 5 spare
copies of 1 and 2.

A worker serves one caller (a session, or one `run()`) and is killed when its caller is done, so nothing
a cell does reaches another caller. A cell runs like a notebook cell: module-level code in the session's
`__main__` namespace, and the value of a final bare expression is printed. The cells' builtins are a
copy of the worker's own: a cell that replaces `len` or `print` changes them for its later cells, not for
the code that reports its result.
"""

from __future__ import annotations

import ast
import builtins
import fcntl
import io
import json
import linecache
import os
import resource
import signal
import socket
import sys
import tempfile
import traceback
import types
from typing import Any, NoReturn

from mathtool.sandbox import linux, protocol
from mathtool.sandbox.protocol import Limits, ZygoteConfig

CELL = "<cell>"
MIB = 1024 * 1024
STDOUT_SPARE, STDERR_SPARE, CONTROL = 4, 5, 3
# What an agent's cells do (import, assign, compute, print, a final expression), run in a namespace thrown
# away afterwards: the pages these write are copied from the zygote's before the worker says it is ready.
WARM_UP_CELL = "import math\nwarm = math.factorial(20) // 7\nprint(warm, [warm], {'warm': warm})\nwarm - 1"


def _builtins_for_cells() -> types.ModuleType:
    """A copy of the builtins module (made once, in the zygote) for the cells: a cell that replaces `len` or
    `print` changes them for its later cells, not for the worker's own code, which reports the result."""
    module = types.ModuleType("builtins", builtins.__doc__)
    vars(module).update(vars(builtins))
    return module


CELL_BUILTINS = _builtins_for_cells()


def main(fds: list[int], config: ZygoteConfig, sandbox_uid: int | None, scratch: str) -> NoReturn:
    """The forked child's whole life (fds: socket, stdout, stderr); it never returns into the zygote's code."""
    try:
        control, stdout, stderr = fds
        _arrange_fds([os.open("/dev/null", os.O_RDONLY), stdout, stderr, control])
        os.setsid()
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if config.isolation:
            _confine(config.limits, sandbox_uid)
        else:
            _unconfine(scratch)
        _set_limits(config.limits, config.isolation)
        worker = Worker(config, scratch)
    except BaseException:
        traceback.print_exc()  # into the stderr memfd, which the host reads when no worker arrives
        os._exit(1)
    try:
        worker.serve()
    except BaseException as exc:  # what a cell broke (or the host closing mid-reply): say so, then exit
        _report_failure(exc)
        os._exit(1)
    os._exit(0)


def _arrange_fds(fds: list[int]) -> None:
    """Put fds[i] at descriptor i, spare copies of stdout/stderr at 4 and 5, and close everything else."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    for target, fd in enumerate(high):
        os.dup2(fd, target, inheritable=target <= 2)
    os.dup2(1, STDOUT_SPARE, inheritable=False)
    os.dup2(2, STDERR_SPARE, inheritable=False)
    os.closerange(STDERR_SPARE + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def _confine(limits: Limits, sandbox_uid: int | None) -> None:
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWIPC)
    options = f"size={limits.scratch_mb}m,nr_inodes=4096,mode=1777"
    linux.mount("tmpfs", "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, options)
    if sandbox_uid is not None:
        os.setgroups([])
        os.setresgid(sandbox_uid, sandbox_uid, sandbox_uid)
        os.setresuid(sandbox_uid, sandbox_uid, sandbox_uid)
    linux.unshare(linux.CLONE_NEWUSER)
    linux.drop_capabilities()
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    if os.getpid() != 1:
        raise OSError("an isolated worker must be PID 1 of its own PID namespace")


def _unconfine(scratch: str) -> None:
    os.environ["TMPDIR"] = tempfile.tempdir = scratch


def _set_limits(limits: Limits, isolated: bool) -> None:
    values = {
        resource.RLIMIT_AS: limits.memory_mb * MIB,
        resource.RLIMIT_FSIZE: limits.scratch_mb * MIB,
        resource.RLIMIT_NOFILE: limits.max_open_files,
        resource.RLIMIT_CORE: 0,
    }
    if isolated:  # outside a user namespace of its own, the count would include every process of the user
        values[resource.RLIMIT_NPROC] = limits.max_processes
    for which, value in values.items():
        resource.setrlimit(which, (value, value))


def _text_stream(fd: int) -> io.TextIOWrapper:
    return open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)


def warm_up() -> None:
    """Run the code paths of a call once in the zygote, so that workers inherit them already loaded."""
    stdout, sys.stdout = sys.stdout, io.StringIO()
    for source in ("x = 1\nx", "1/0", "("):
        run_cell(source, {"__name__": "__main__"}, io.StringIO())
    sys.stdout = stdout
    json.loads(protocol.encode_frame({"code": "x", "ok": True, "error": None})[protocol.HEADER.size :])


class Worker:
    def __init__(self, config: ZygoteConfig, scratch: str) -> None:
        self.limits = config.limits
        self.isolated = config.isolation
        self.control = socket.socket(fileno=CONTROL)
        self.buffer = bytearray()
        main_module = types.ModuleType("__main__")
        main_module.__builtins__ = CELL_BUILTINS  # type: ignore[attr-defined]
        sys.modules["__main__"] = main_module
        sys.modules["builtins"] = CELL_BUILTINS  # what `import builtins` gives the cells
        self.namespace = vars(main_module)
        os.chdir(scratch)
        _reseed_numpy()
        self.arm()
        self.warm_up()

    def serve(self) -> None:
        self.send({"ready": True})
        while (request := self.receive()) is not None:
            self.send(self.handle(str(request["code"])))
            self.arm()

    def handle(self, code: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
        ok, error = run_cell(code, self.namespace if namespace is None else namespace, self.streams[1])
        _close_streams(self.streams)
        if self.isolated:
            _kill_descendants()
        return {"ok": ok, "error": error[: protocol.MAX_ERROR_CHARS] if error else None}

    def warm_up(self) -> None:
        """Go through a call once before saying it is ready: the first real call then writes few pages for
        the first time (each such write copies a page of the zygote's)."""
        scratch_namespace = {"__name__": "__main__", "__builtins__": CELL_BUILTINS}
        json.loads(protocol.encode_frame(self.handle(WARM_UP_CELL, scratch_namespace))[protocol.HEADER.size :])
        for fd in (STDOUT_SPARE, STDERR_SPARE):
            os.ftruncate(fd, 0)
        self.arm()

    def arm(self) -> None:
        """Before the next request, off the caller's clock: its CPU limit and output streams."""
        self.limit_cpu()
        self.streams = _open_streams()

    def limit_cpu(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime + self.limits.timeout_s) + 2
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
        except (ValueError, OSError):
            pass  # the code lowered the hard limit; the host's wall-clock timeout still applies

    def send(self, message: dict[str, Any]) -> None:
        self.control.sendall(protocol.encode_frame(message))

    def receive(self) -> dict[str, Any] | None:
        """The next request (usually a single recv), or None when the host closed the socket."""
        while (body := protocol.take_frame(self.buffer, protocol.MAX_REQUEST_BYTES)) is None:
            chunk = self.control.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        return json.loads(body)


def run_cell(source: str, namespace: dict[str, Any], stderr: io.TextIOBase) -> tuple[bool, str | None]:
    """Run `source` in `namespace`; return (ok, the error's last line). Tracebacks go to `stderr`."""
    linecache.cache[CELL] = (len(source), None, source.splitlines(True), CELL)
    try:
        body, last = _compile(source)
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
        return True, None
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            return True, None
        print(exc.code if isinstance(exc.code, str) else f"SystemExit: {exc.code}", file=stderr)
        return False, f"SystemExit: {exc.code}"
    except BaseException as exc:  # the cell's own error, whatever it is: report it and keep serving
        _print_traceback(exc, stderr)
        return False, traceback.format_exception_only(type(exc), exc)[-1].strip()


def _compile(source: str) -> tuple[types.CodeType, types.CodeType | None]:
    tree = ast.parse(source, CELL)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), CELL, "eval")
    return compile(tree, CELL, "exec"), last


def _print_traceback(exc: BaseException, stderr: io.TextIOBase) -> None:
    """The traceback without the sandbox's own frames (and without any frame for a SyntaxError)."""
    tb = None if isinstance(exc, SyntaxError) else exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    try:
        traceback.print_exception(type(exc), exc, tb, file=stderr)
    except Exception:
        print(f"{type(exc).__name__} (its traceback could not be printed)", file=stderr)


def _report_failure(exc: BaseException) -> None:
    """Tell the host, through the stderr memfd, why the worker stopped after running a cell."""
    try:
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    except Exception:
        line = type(exc).__name__
    try:
        os.write(STDERR_SPARE, f"\n{protocol.WORKER_FAILED}{line}\n".encode(errors="replace"))
    except Exception:
        pass  # nothing left to say it with: the host reports a process that ended


def _open_streams() -> tuple[io.TextIOWrapper, io.TextIOWrapper]:
    """Point fds 1 and 2 back at the memfds (rewound; the host truncates them) behind new Python streams."""
    for fd, spare in ((1, STDOUT_SPARE), (2, STDERR_SPARE)):
        os.dup2(spare, fd)
        os.lseek(fd, 0, os.SEEK_SET)
    sys.stdout, sys.stderr = _text_stream(1), _text_stream(2)
    return sys.stdout, sys.stderr


def _close_streams(streams: tuple[io.TextIOWrapper, io.TextIOWrapper]) -> None:
    """Flush what the call wrote, then send anything written between calls (stale buffers, threads) nowhere."""
    for stream in (*streams, sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass  # a stream the code replaced or closed: nothing more to save
    null = os.open("/dev/null", os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    sys.stdout = sys.stderr = None  # the call's streams are collected, and flushed, into /dev/null


def _kill_descendants() -> None:
    """Kill every process the call started (as PID 1: everything else in our PID namespace)."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        return
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _reseed_numpy() -> None:
    """Forked workers inherit the zygote's random state: `random` reseeds itself after a fork, numpy's
    global generator does not. Seeded from a few bytes of os.urandom, ten times cheaper than numpy's own."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
