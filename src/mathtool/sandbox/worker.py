"""A sandbox worker: a child forked by the zygote that confines itself, then runs code cells for the host.

Isolated, a worker is PID 1 of its own PID namespace, with a private mount namespace (a fresh tmpfs on
/tmp), network and IPC namespaces of its own, a user namespace of its own (so RLIMIT_NPROC counts only
its processes), no capabilities and no_new_privs. File descriptors: 0 /dev/null, 1 and 2 the stdout and
stderr memfds (shared with the host), 3 the socket to the host, 4 and 5 spare copies of 1 and 2.

A cell runs like a notebook cell: module-level code in a `__main__` namespace, and the value of a final
bare expression is printed. For `run()` each call gets a fresh namespace; a worker that served a call is
reused only if the call left no trace in the process (threads, files in /tmp, changed limits, signal
handlers, builtins, imported modules and their attributes, common numeric settings) and it has served
fewer than `calls_per_worker` calls. State deeper inside objects (a class attribute, a module-level
list) is not compared; a session, which the agent loop uses, always starts in a new process.
Session workers keep one namespace and are never handed to anyone else.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import decimal
import faulthandler
import fcntl
import gc
import io
import json
import linecache
import os
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import traceback
import types
import warnings
from typing import Any, NoReturn

from mathtool.sandbox import linux, protocol
from mathtool.sandbox.protocol import Limits, ZygoteConfig

CELL = "<cell>"
MIB = 1024 * 1024
STDOUT_SPARE, STDERR_SPARE, CONTROL = 4, 5, 3
FIXED_LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE, resource.RLIMIT_CORE)
SIGNALS = tuple(
    getattr(signal, name)
    for name in "SIGALRM SIGINT SIGTERM SIGHUP SIGCHLD SIGPIPE SIGUSR1 SIGUSR2 SIGXCPU SIGXFSZ SIGSEGV SIGFPE".split()
)
TIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)
OWN_MODULES = ("__main__", "sys")  # rebound by every call; what matters in sys is checked apart
DICT_VERSION_OFFSET = 3 * ctypes.sizeof(ctypes.c_ssize_t)  # CPython 3.11 PyDictObject: refcnt, type, ma_used
_VERSION = ctypes.POINTER(ctypes.c_uint64)


class ModuleWatch:
    """Whether a call imported a module, replaced one in sys.modules or set an attribute of one
    (`math.pi = 3`), in ~0.1 ms: module identities, and the version tag (PEP 509) of each module's
    globals dict, which CPython 3.11 renews on any change to the dict."""

    def __init__(self) -> None:
        # held so that each dict, and so the address its tag is read at, lives as long as the watch
        self.namespaces = [vars(m) for n, m in sys.modules.items() if n not in OWN_MODULES and _has_dict(m)]
        self.tags = [ctypes.cast(id(d) + DICT_VERSION_OFFSET, _VERSION) for d in self.namespaces]
        self.modules, self.versions = self.state()

    def state(self) -> tuple[tuple[int, ...], list[int]]:
        """Call with sys.modules["__main__"] restored to the worker's own (see `Worker.handle`)."""
        return tuple(map(id, sys.modules.values())), [tag[0] for tag in self.tags]

    def unchanged(self) -> bool:
        return self.state() == (self.modules, self.versions)


def _has_dict(module: object) -> bool:
    return type(getattr(module, "__dict__", None)) is dict


def main(fds: list[int], config: ZygoteConfig, sandbox_uid: int | None, scratch: str) -> NoReturn:
    """The forked child's whole life (fds: socket, stdout, stderr); it never returns into the zygote's code."""
    status = 1
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
        Worker(config, scratch).serve()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        if not config.isolation:
            _kill_process_group()
        os._exit(status)


def _arrange_fds(fds: list[int]) -> None:
    """Put fds[i] at descriptor i, spare copies of stdout/stderr at 4 and 5, and close everything else."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    for target, fd in enumerate(high):
        os.dup2(fd, target, inheritable=target <= 2)
    os.dup2(1, STDOUT_SPARE, inheritable=False)
    os.dup2(2, STDERR_SPARE, inheritable=False)
    os.closerange(STDERR_SPARE + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    sys.stdout, sys.stderr = _text_stream(1), _text_stream(2)
    faulthandler.enable(file=sys.stderr)


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
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)  # orphaned grandchildren stay ours, so they can be noticed
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
    run_cell("x = 1\nx", {"__name__": "__main__"}, io.StringIO())
    run_cell("1/0", {"__name__": "__main__"}, io.StringIO())
    run_cell("(", {"__name__": "__main__"}, io.StringIO())
    json.loads(json.dumps({"ok": True}))


class Worker:
    def __init__(self, config: ZygoteConfig, scratch: str) -> None:
        self.limits = config.limits
        self.isolated = config.isolation
        self.scratch = scratch
        self.control = socket.socket(fileno=CONTROL)
        self.calls = 0
        self.had_children = False
        self.session: types.ModuleType | None = None
        self.environ = dict(os.environb)
        self.path = list(sys.path)
        self.decimal_context = decimal.getcontext().copy()
        os.chdir(scratch)
        _reseed()
        self.pristine = self.fingerprint()
        self.main = sys.modules.get("__main__")
        self.modules = ModuleWatch()

    def serve(self) -> None:
        self.send({"ready": True})
        try:
            while (request := self.receive()) is not None:
                in_session = bool(request.get("session"))
                self.send(self.handle(str(request["code"]), in_session))
                ready = self.prepare_next_call(in_session)
                self.send({"ready": ready})
                if not ready:
                    break
        finally:
            if not self.isolated:
                shutil.rmtree(self.scratch, ignore_errors=True)

    def handle(self, code: str, in_session: bool) -> dict[str, Any]:
        module = self.main_module(in_session)
        self.limit_cpu()
        streams = _open_streams()
        ok, error = run_cell(code, vars(module), streams[1])
        _close_streams(streams)
        sys.modules["__main__"] = self.main  # the call's namespace is not left behind as a module
        self.had_children = self.kill_descendants()
        self.calls += 1
        return {"ok": ok, "error": error}

    def prepare_next_call(self, in_session: bool) -> bool:
        """After the reply, off the caller's clock: whether to serve another call, and a clean slate for it."""
        if self.had_children:
            return False
        if in_session:
            return True
        if self.calls >= self.limits.calls_per_worker or not self.unchanged():
            return False
        self.reset_process_state()
        return True

    def unchanged(self) -> bool:
        try:
            return self.fingerprint() == self.pristine and self.modules.unchanged()
        except Exception:
            return False

    def main_module(self, in_session: bool) -> types.ModuleType:
        if not in_session or self.session is None:
            module = types.ModuleType("__main__")
            module.__builtins__ = builtins  # type: ignore[attr-defined]
            self.session = module if in_session else None
        else:
            module = self.session
        sys.modules["__main__"] = module
        return module

    def reset_process_state(self) -> None:
        """What a fresh interpreter would have; anything harder to reset retires the worker instead."""
        os.chdir(self.scratch)
        os.umask(0o022)
        if dict(os.environb) != self.environ:
            os.environb.clear()
            os.environb.update(self.environ)
        sys.path[:] = self.path
        sys.argv[:] = [""]
        decimal.setcontext(self.decimal_context.copy())
        _reseed()

    def limit_cpu(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime + self.limits.timeout_s) + 2
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
        except (ValueError, OSError):
            pass  # the code lowered the hard limit; the host's wall-clock timeout still applies

    def kill_descendants(self) -> bool:
        """Kill every process the call started; True if there were any."""
        if not self.isolated:
            return _has_children()  # the worker retires and its process group is killed (best effort)
        try:
            os.kill(-1, signal.SIGKILL)  # as PID 1: everything else in our PID namespace
        except ProcessLookupError:
            return False
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return False

    def fingerprint(self) -> tuple[Any, ...]:
        """Process-wide state a call could change and a later call could notice."""
        numpy, mpmath = sys.modules.get("numpy"), sys.modules.get("mpmath")
        return (
            len(sys._current_frames()),  # threads, including any started with _thread
            os.listdir(self.scratch),
            tuple(resource.getrlimit(which) for which in FIXED_LIMITS),
            resource.getrlimit(resource.RLIMIT_CPU)[1],
            (sys.getrecursionlimit(), sys.get_int_max_str_digits(), sys.gettrace(), sys.getprofile()),
            (sys.displayhook, sys.excepthook, gc.isenabled(), faulthandler.is_enabled()),
            tuple(signal.getsignal(s) for s in SIGNALS),
            tuple(signal.getitimer(timer) for timer in TIMERS),
            tuple(vars(builtins)),
            tuple(map(id, vars(builtins).values())),
            tuple(warnings.filters),
            str(decimal.DefaultContext),
            (numpy.get_printoptions(), numpy.geterr()) if numpy else None,
            (mpmath.mp.prec, mpmath.mp.pretty) if mpmath else None,
        )

    def send(self, message: dict[str, Any]) -> None:
        self.control.sendall(protocol.encode_frame(message))

    def receive(self) -> dict[str, Any] | None:
        header = self._read_exact(protocol.HEADER.size)
        if header is None:
            return None
        (size,) = protocol.HEADER.unpack(header)
        if size > protocol.MAX_REQUEST_BYTES:
            raise ValueError(f"request of {size} bytes")
        body = self._read_exact(size)
        return None if body is None else json.loads(body)

    def _read_exact(self, size: int) -> bytes | None:
        buffer = bytearray()
        while len(buffer) < size:
            chunk = self.control.recv(size - len(buffer))
            if not chunk:
                return None
            buffer += chunk
        return bytes(buffer)


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


def _reseed() -> None:
    """Forked workers inherit the zygote's random state; each call starts from fresh entropy.

    Seeds from a few bytes of os.urandom: ten times cheaper than the libraries' own seeding from entropy.
    """
    entropy = os.urandom(20)
    random.seed(int.from_bytes(entropy[:16], "little"))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(entropy[16:], "little"))


def _kill_process_group() -> None:
    """Without a PID namespace: kill what the calls started that kept our process group (best effort)."""
    if _has_children():
        os.killpg(0, signal.SIGKILL)


def _has_children() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return False
    return True
