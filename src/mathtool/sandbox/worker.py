"""A sandbox worker: a child forked by the zygote that confines itself, then runs code cells for the host.

Isolated, a worker is PID 1 of its own PID namespace, with a private mount namespace (a fresh tmpfs on
/tmp), network and IPC namespaces of its own, a user namespace of its own (so RLIMIT_NPROC counts only
its processes), no capabilities and no_new_privs. File descriptors: 0 /dev/null, 1 and 2 the stdout and
stderr memfds (shared with the host), 3 the socket to the host, 4 and 5 spare copies of 1 and 2.

A cell runs like a notebook cell: module-level code in a `__main__` namespace, and the value of a final
bare expression is printed. For `run()` each call gets a fresh namespace; a worker that served a call is
reused only if the call left no trace in the process (threads, files in /tmp, changed limits, signal
handlers, builtins, imported modules and their attributes, import hooks, common numeric settings) and
it has served fewer than `calls_per_worker` calls. State deeper inside objects (a class attribute, a
module-level list) is not compared; a session, which the agent loop uses, always starts in a new process.
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
from collections.abc import Callable
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
DICT_VERSION_OFFSET = 3 * ctypes.sizeof(ctypes.c_ssize_t)  # CPython 3.11 PyDictObject: refcnt, type, ma_used


class ModuleWatch:
    """Whether a call imported a module, replaced one in sys.modules or set an attribute of one
    (`math.pi = 3`), in a few microseconds, from the version tags (PEP 509) that CPython 3.11 renews on
    any change to a dict: the tag of sys.modules itself, read before and after the call, and the tags of
    every module's globals dict, gathered by numpy from their addresses in one operation."""

    def __init__(self) -> None:
        import numpy  # preloaded by the zygote, after it entered the sandbox's root

        self.sys_modules = _version_tag(sys.modules)
        # Every module's namespace but those each call rebinds (sys.stdout, sys.modules["__main__"]);
        # held so that each dict, and so the address its tag is read at, lives as long as the watch.
        self.namespaces = [vars(m) for n, m in sys.modules.items() if n not in ("__main__", "sys") and _has_dict(m)]
        addresses = numpy.array([id(d) + DICT_VERSION_OFFSET for d in self.namespaces], dtype=numpy.uint64)
        low = int(addresses.min())
        span = (ctypes.c_uint64 * (int(addresses.max() - low) // 8 + 1)).from_address(low)
        self.memory = numpy.frombuffer(span, dtype=numpy.uint64)  # a view: only the gathered words are read
        self.index = (addresses - low) // 8
        self.versions = self.memory[self.index]
        self.array_equal = numpy.array_equal
        self.before_call = 0
        self.sys_modules_untouched = True

    def call_starts(self) -> None:
        """After the worker set sys.modules["__main__"] for the call, before the call's code runs."""
        self.before_call = self.sys_modules[0]

    def call_ended(self) -> None:
        """After the call, before sys.modules["__main__"] is restored (which renews the tag)."""
        self.sys_modules_untouched = self.sys_modules[0] == self.before_call

    def unchanged(self) -> bool:
        return self.sys_modules_untouched and bool(self.array_equal(self.memory[self.index], self.versions))


def _version_tag(d: dict[Any, Any]) -> Any:
    return ctypes.cast(id(d) + DICT_VERSION_OFFSET, ctypes.POINTER(ctypes.c_uint64))


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
        self.buffer = bytearray()
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
        self.arm()

    def serve(self) -> None:
        self.send({"ready": True})
        try:
            while (request := self.receive()) is not None:
                in_session = bool(request.get("session"))
                self.send(self.handle(str(request["code"]), in_session))
                ready = self.prepare_next_call(in_session)
                if ready:
                    self.arm()
                self.send({"ready": ready})
                if not ready:
                    break
        finally:
            if not self.isolated:
                shutil.rmtree(self.scratch, ignore_errors=True)

    def handle(self, code: str, in_session: bool) -> dict[str, Any]:
        module = self.main_module(in_session)
        self.modules.call_starts()
        ok, error = run_cell(code, vars(module), self.streams[1])
        _close_streams(self.streams)
        self.modules.call_ended()
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
        if self.calls >= self.limits.calls_per_worker:
            return False
        if not _safely(lambda: self.modules.unchanged() and self.fingerprint() == self.pristine):
            return False
        self.reset_process_state()
        return True

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

    def arm(self) -> None:
        """Before saying it is ready, off the caller's clock: the next call's CPU limit and output streams."""
        self.limit_cpu()
        self.streams = _open_streams()

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
            (id(sys.modules), tuple(sys.meta_path), tuple(sys.path_hooks)),
            (sys.displayhook, sys.excepthook, gc.isenabled(), faulthandler.is_enabled()),
            tuple(signal.getsignal(s) for s in SIGNALS),
            tuple(signal.getitimer(timer) for timer in TIMERS),
            tuple(warnings.filters),
            str(decimal.DefaultContext),
            (numpy.get_printoptions(), numpy.geterr()) if numpy else None,
            (mpmath.mp.prec, mpmath.mp.pretty) if mpmath else None,
        )

    def send(self, message: dict[str, Any]) -> None:
        self.control.sendall(protocol.encode_frame(message))

    def receive(self) -> dict[str, Any] | None:
        """The next request (usually a single recv), or None when the host closed the socket."""
        while (body := protocol.take_frame(self.buffer, protocol.MAX_REQUEST_BYTES)) is None:
            chunk = self.control.recv(1 << 20)
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


def _safely(check: Callable[[], bool]) -> bool:
    """A check of state the call may have broken in any way: False if it raises."""
    try:
        return check()
    except Exception:
        return False


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
