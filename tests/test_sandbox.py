"""PythonSandbox: one test per isolation class, sessions, concurrency, and the tool text the model reads.

The sandbox here is real (namespaces, rlimits, pre-forked workers); each test runs code that would break
the property if the isolation were missing, and checks only what a caller (or `ps`) can see.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from mathtool.errors import ConfigError
from mathtool.sandbox import PythonSandbox, PythonSession, RunResult
from mathtool.sandbox.tool import format_tool_result

SECRET = "MATHTOOL_SANDBOX_TEST_SECRET"
TIMEOUT_S = 2.0
OUTPUT_CAP = 4096
shared_loop = pytest.mark.asyncio(loop_scope="module")
NAME_ITSELF = "import ctypes\n_ = ctypes.CDLL(None).prctl(15, b'{name}', 0, 0, 0)\n"  # PR_SET_NAME
RESTARTED, FIRST = f"mt{os.getpid()}r", f"mt{os.getpid()}f"  # process names, unique to this test run
ESCAPING_CHILD = """import os, time
if os.fork() == 0:
    os.setsid()
    while True:
        open('/tmp/beat', 'a').write('.')
        time.sleep(0.01)
time.sleep(0.2)
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox() -> AsyncIterator[PythonSandbox]:
    os.environ[SECRET] = "hunter2"  # set before the sandbox starts: it must not leak in
    try:
        async with PythonSandbox(timeout_s=TIMEOUT_S, memory_mb=1024, max_output_bytes=OUTPUT_CAP) as sb:
            yield sb
    finally:
        del os.environ[SECRET]


async def run_ok(sandbox: PythonSandbox, code: str) -> str:
    result = await sandbox.run(code)
    assert result.ok, result
    return result.stdout


async def run_session_ok(session: PythonSession, code: str) -> str:
    result = await session.run(code)
    assert result.ok, result
    return result.stdout


def pid_named(name: str) -> int:
    """The host's PID of the process that gave itself `name` (as `ps` or the OOM killer would see it)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                return int(entry.name)
        except OSError:
            continue
    raise LookupError(f"no process named {name}")


def child_pids(parent: int) -> list[int]:
    tasks = Path(f"/proc/{parent}/task").iterdir()
    return [int(pid) for task in tasks for pid in (task / "children").read_text().split()]


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def kill_and_wait(pid: int) -> None:
    """SIGKILL `pid` and wait until it has exited (without reaping it: it may be someone else's child)."""
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        assert select.select([pidfd], [], [], 30)[0], f"process {pid} outlived SIGKILL"
    finally:
        os.close(pidfd)


@shared_loop
async def test_runs_code_with_fresh_state_for_each_call(sandbox: PythonSandbox) -> None:
    result = await sandbox.run("print(6 * 7)")
    assert (result.stdout, result.stderr, result.ok, result.timed_out) == ("42\n", "", True, False)
    assert 0 < result.duration_s < 1
    assert await run_ok(sandbox, "import sympy as sp\nx = sp.symbols('x')\nsp.solve(x**2 - 4, x)") == "[-2, 2]\n"
    finder = "import sys\nclass F:\n    find_spec = staticmethod(lambda *a: None)\nsys.meta_path.insert(0, F())"
    changes = [
        "y = 1\nimport sys\nsys.setrecursionlimit(60)\n",
        "import decimal, numpy\ndecimal.getcontext().prec = 3\nnumpy.set_printoptions(precision=1)",
        "import math, sympy\nmath.pi = 3\nsympy.sqrt = len\nsympy.Rational.leak = 1",
        "import math, sys\nsys.modules['json'] = math",
        "import colorsys\ncolorsys.ONE_THIRD = 0",
        "import sys\nsys.modules = dict(sys.modules, leak=sys)",
        "import os\nos.dup2(os.open('/tmp/held', os.O_CREAT | os.O_RDWR), 40)\nos.write(40, b'left behind')",
        finder,
    ]
    check = (
        "import sys, decimal, numpy, math, json, sympy, colorsys, os\n"
        "print('y' in globals(), sys.getrecursionlimit(), decimal.getcontext().prec, numpy.array([1/3]))\n"
        "print(math.pi, json.__name__, sympy.sqrt(4), colorsys.ONE_THIRD, hasattr(sympy.Rational, 'leak'))\n"
        "print('leak' in sys.modules, [type(f).__name__ for f in sys.meta_path].count('F'))\n"
        "try:\n    print(os.read(40, 100))\nexcept OSError as exc:\n    print(exc.strerror)"
    )
    clean = (
        "False 1000 28 [0.33333333]\n3.141592653589793 json 2 0.3333333333333333 False\nFalse 0\nBad file descriptor\n"
    )
    for change in changes:
        await run_ok(sandbox, change)
        outputs = await asyncio.gather(*(sandbox.run(check) for _ in range(4)))
        assert [r.stdout for r in outputs] == [clean] * 4, change


@shared_loop
async def test_network_is_unreachable_even_on_loopback(sandbox: PythonSandbox) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        code = (
            "import socket\n"
            f"for address in [('127.0.0.1', {server.getsockname()[1]}), ('1.1.1.1', 53)]:\n"
            "    try:\n"
            "        socket.create_connection(address, timeout=1)\n"
            "        print('connected')\n"
            "    except OSError as exc:\n"
            "        print('refused', exc.errno)\n"
        )
        stdout = await run_ok(sandbox, code)
        assert "connected" not in stdout and stdout.count("refused") == 2
        with pytest.raises(BlockingIOError):
            server.accept()


@shared_loop
async def test_host_files_are_absent_and_nothing_is_writable_but_tmp(sandbox: PythonSandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    readable = [str(secret), "/etc/shadow", str(Path.home() / ".bashrc"), __file__, "/proc/self/environ"]
    code = (
        "import os, sys\n"
        f"for path in {readable!r}:\n"
        "    print(os.path.exists(path))\n"
        "for path in ['/usr/pwned', os.path.join(sys.prefix, 'pwned'), '/pwned']:\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "        print('wrote', path)\n"
        "    except OSError as exc:\n"
        "        print(exc.strerror)\n"
        "open('/tmp/scratch.txt', 'w').write('ok')\n"
        "print(open('/tmp/scratch.txt').read())\n"
    )
    stdout = await run_ok(sandbox, code)
    assert stdout.splitlines()[:5] == ["False"] * 5
    assert "wrote" not in stdout and stdout.rstrip().endswith("ok")
    assert not Path(sys.prefix, "pwned").exists() and not Path("/usr/pwned").exists()


@shared_loop
async def test_environment_is_clean(sandbox: PythonSandbox) -> None:
    stdout = await run_ok(sandbox, "import os\nprint(sorted(os.environ))\nprint(os.environ.get('HOME'))")
    names, home = stdout.splitlines()
    assert SECRET not in names and "hunter2" not in stdout
    allowed = {"PATH", "HOME", "TMPDIR", "LANG", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    assert set(eval(names)) <= allowed
    assert home == "/tmp"


@shared_loop
async def test_infinite_loop_times_out_promptly_and_keeps_partial_output(sandbox: PythonSandbox) -> None:
    start = time.perf_counter()
    result = await sandbox.run("print('started')\nwhile True:\n    pass")
    assert result.timed_out and not result.ok
    assert result.stdout == "started\n"
    assert TIMEOUT_S <= time.perf_counter() - start < TIMEOUT_S + 1.0
    assert await run_ok(sandbox, "print('next')") == "next\n"


@shared_loop
async def test_memory_is_limited(sandbox: PythonSandbox) -> None:
    result = await sandbox.run("block = bytearray(2 * 1024**3)\nprint('allocated')")
    assert not result.ok and result.error == "MemoryError" and "allocated" not in result.stdout
    result = await sandbox.run("import numpy as np\nnp.ones((20000, 20000))")
    assert not result.ok and "Unable to allocate" in (result.error or "")


@shared_loop
async def test_fork_bomb_is_capped_and_children_die_with_the_call(sandbox: PythonSandbox) -> None:
    bomb = (
        "import os, time\n"
        "count = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        count += 1\n"
        "except OSError:\n"
        "    print(count)\n"
    )
    assert 0 < int(await run_ok(sandbox, bomb)) < 64
    async with sandbox.session() as session:  # a child that escapes its process group still dies
        assert (await session.run(ESCAPING_CHILD)).ok
        check = "before = os.path.getsize('/tmp/beat')\ntime.sleep(0.3)\nprint(os.path.getsize('/tmp/beat') - before)"
        assert (await session.run(check)).stdout == "0\n"


@shared_loop
async def test_killing_its_parent_and_everything_it_sees_does_not_hurt(sandbox: PythonSandbox) -> None:
    code = (
        "import os, signal\n"
        "for pid in (os.getppid(), 1, -1, 0):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n"
        "        pass\n"
        "print('still here')\n"
    )
    async with sandbox.session() as bystander:
        await bystander.run("x = 'kept'")
        assert (await sandbox.run(code)).stdout == "still here\n"  # PID 1 of its own namespace: signals bounce
        results = await asyncio.gather(*(sandbox.run("print('alive')") for _ in range(5)))
        assert all(r.stdout == "alive\n" for r in results)
        kept = await bystander.run("x")  # the zygote, and with it every other worker, survived
        assert (kept.stdout, kept.stderr) == ("'kept'\n", "")


@shared_loop
async def test_os_exit_and_segfault_are_reported_and_the_worker_replaced(sandbox: PythonSandbox) -> None:
    exited = await sandbox.run("import os\nprint('bye', flush=True)\nos._exit(3)")
    assert not exited.ok and not exited.timed_out and exited.stdout == "bye\n" and "exited" in (exited.error or "")
    crashed = await sandbox.run("import ctypes\nctypes.string_at(0)")
    assert not crashed.ok and crashed.error == "the process crashed: Segmentation fault"
    assert '"<cell>", line 2' in crashed.stderr and "worker.py" not in crashed.stderr
    assert await run_ok(sandbox, "print('next')") == "next\n"


@shared_loop
async def test_sandbox_survives_the_death_of_its_zygote(sandbox: PythonSandbox) -> None:
    async with sandbox.session() as session:
        await session.run("x = 1")
        (launcher,) = [pid for pid in child_pids(os.getpid()) if "mathtool.sandbox.zygote" in command_line(pid)]
        (zygote,) = child_pids(launcher)  # PID 1 of the sandbox's namespace: its end is every worker's
        kill_and_wait(zygote)  # as the OOM killer would
        after = await session.run("print('after')")
        assert after.stdout == "after\n" and after.stderr.startswith("[the session restarted")
        results = await asyncio.gather(*(sandbox.run("print(1)") for _ in range(3)))
        assert [r.stdout for r in results] == ["1\n"] * 3
        assert (await session.run("print('and on')")).stdout == "and on\n"


@shared_loop
async def test_output_flood_is_truncated_with_a_marker(sandbox: PythonSandbox) -> None:
    result = await sandbox.run("import sys\nprint('x' * 10_000_000)\nsys.stderr.write('e' * 10_000_000)\nprint('done')")
    assert result.ok
    for stream in (result.stdout, result.stderr):
        assert OUTPUT_CAP < len(stream) < OUTPUT_CAP + 200 and "output truncated" in stream
    endless = await sandbox.run("while True:\n    print('y' * 1000)")
    assert len(endless.stdout) < OUTPUT_CAP + 200 and not endless.ok
    long_message = await sandbox.run("raise ValueError('x' * 2_000_000)")
    assert (long_message.error or "").startswith("ValueError: xxx") and len(long_message.error or "") <= 1000
    assert "output truncated" in long_message.stderr


@shared_loop
async def test_garbage_on_the_workers_socket_stops_only_that_call(sandbox: PythonSandbox) -> None:
    forged = await sandbox.run("import os, time\nos.write(3, (2**31).to_bytes(4, 'big'))\ntime.sleep(1)")
    assert not forged.ok and not forged.timed_out and "malformed reply" in (forged.error or "")
    assert await run_ok(sandbox, "print('next')") == "next\n"


@shared_loop
async def test_a_fresh_session_shows_nothing_of_the_workers_warm_up(sandbox: PythonSandbox) -> None:
    async with sandbox.session() as session:
        first = await session.run("print(sorted(name for name in globals() if not name.startswith('__')))")
    assert (first.stdout, first.stderr) == ("[]\n", "")


@shared_loop
async def test_session_state_persists_and_sessions_are_isolated(sandbox: PythonSandbox) -> None:
    async with sandbox.session() as first, sandbox.session() as second:
        await first.run("x = 41\nopen('/tmp/mine', 'w').write('first')")
        assert (await first.run("print(x + 1)")).stdout == "42\n"
        other = await second.run("import os\nprint(os.path.exists('/tmp/mine'))\nx")
        assert other.stdout == "False\n" and other.error == "NameError: name 'x' is not defined"
        assert (await sandbox.run("x")).error == "NameError: name 'x' is not defined"
        assert (await first.run("x")).stdout == "41\n"


@shared_loop
async def test_session_restarts_after_a_timeout(sandbox: PythonSandbox) -> None:
    async with sandbox.session() as session:
        await session.run("x = 1")
        stopped = await session.run("while True: pass")
        assert stopped.timed_out and "session restarted" in (stopped.error or "")
        assert (await session.run("x")).error == "NameError: name 'x' is not defined"
        await session.run(f"y = 2\n{NAME_ITSELF.format(name=RESTARTED)}")
        kill_and_wait(pid_named(RESTARTED))  # it dies between calls, as if the OOM killer took it
        after = await session.run("print('fresh')")
        assert after.stdout == "fresh\n" and after.stderr.startswith("[the session restarted")
        assert (await session.run("y")).error == "NameError: name 'y' is not defined"


@shared_loop
async def test_two_sessions_cannot_reach_each_other(sandbox: PythonSandbox) -> None:
    """Files, POSIX and System V shared memory, abstract unix sockets, signals: each session alone."""
    setup = (
        "import ctypes, mmap, os, signal, socket\n"
        "open('/tmp/note', 'w').write('mine')\n"
        "shm = os.open('/dev/shm/mathtool-test', os.O_CREAT | os.O_RDWR)\n"
        "os.ftruncate(shm, 4096)\n"
        "mapped = mmap.mmap(shm, 4096)\n"
        "mapped[:4] = b'mine'\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.shmget(0x4D54, 4096, 0o1600) >= 0)\n"  # IPC_CREAT | 0600
        "listener = socket.socket(socket.AF_UNIX)\n"
        "listener.bind('\\0mathtool-test')\n"
        "listener.listen()\n"
        "listener.setblocking(False)\n"
        "signals = []\n"
        "signal.signal(signal.SIGUSR1, lambda *_: signals.append('USR1'))\n" + NAME_ITSELF.format(name=FIRST)
    )
    async with sandbox.session() as first, sandbox.session() as second:
        assert (await first.run(setup)).stdout == "True\n"
        host_pid = pid_named(FIRST)
        probe = (
            "import ctypes, os, signal, socket\n"
            "print(os.path.exists('/tmp/note'), os.path.exists('/dev/shm/mathtool-test'))\n"
            "print(ctypes.CDLL(None).shmget(0x4D54, 0, 0))\n"
            "try:\n"
            "    socket.socket(socket.AF_UNIX).connect('\\0mathtool-test')\n"
            "    print('connected')\n"
            "except OSError as exc:\n"
            "    print(exc.strerror)\n"
            "reached = 0\n"
            f"for pid in [-1, {host_pid}, *range(2, 4096)]:\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGUSR1)\n"
            "        reached += 1\n"
            "    except ProcessLookupError:\n"
            "        pass\n"
            "print(reached)\n"
        )
        assert await run_session_ok(second, probe) == "False False\n-1\nConnection refused\n0\n"
        check = (
            "try:\n    listener.accept()\nexcept BlockingIOError:\n    print('no one called')\n"
            "print(signals, open('/tmp/note').read(), bytes(mapped[:4]))"
        )
        assert await run_session_ok(first, check) == "no one called\n[] mine b'mine'\n"


@shared_loop
async def test_a_cell_that_replaces_builtins_breaks_only_its_own_cells(sandbox: PythonSandbox) -> None:
    replace = (
        "import builtins\n"
        "x = 6\n"
        "for name in ['len', 'print', 'repr', 'isinstance', 'str', 'dict', 'compile', 'exec', '__import__']:\n"
        "    setattr(builtins, name, None)\n"
    )
    async with sandbox.session() as session:
        assert (await session.run(replace)).ok
        failing = await session.run("len([1])")  # the session's own builtins stay replaced
        assert failing.error == "TypeError: 'NoneType' object is not callable"
        assert failing.stderr.startswith("Traceback") and '"<cell>", line 1' in failing.stderr
        assert (await session.run("x * 7")).stdout == "42\n"
    assert await run_ok(sandbox, "print(len([1, 2]))") == "2\n"


@shared_loop
async def test_a_cell_that_breaks_the_workers_machinery_is_told_so(sandbox: PythonSandbox) -> None:
    async with sandbox.session() as session:
        broken = await session.run("import json\nx = 1\njson.dumps = None")
        assert not broken.ok and not broken.timed_out
        assert (broken.error or "").startswith("the code broke the sandbox's own machinery")
        assert "TypeError: 'NoneType' object is not callable" in (broken.error or "")
        assert (broken.error or "").endswith("the session restarted, its variables are gone")
        assert (await session.run("print('x' in globals())")).stdout == "False\n"


@shared_loop
async def test_200_concurrent_calls(sandbox: PythonSandbox) -> None:
    start = time.perf_counter()
    results = await asyncio.gather(*(sandbox.run(f"print({i} * 2)") for i in range(200)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(200)]
    assert time.perf_counter() - start < 20


@shared_loop
async def test_calls_take_milliseconds(sandbox: PythonSandbox) -> None:
    durations = []
    for _ in range(50):
        start = time.perf_counter()
        await run_ok(sandbox, "import math\nprint(math.factorial(20))")
        durations.append(time.perf_counter() - start)
    assert statistics.median(durations) < 0.02  # ~1 ms on an idle 2-core machine (a fresh process for each)


@shared_loop
async def test_isolation_off_runs_but_warns(caplog: pytest.LogCaptureFixture) -> None:
    async with PythonSandbox(timeout_s=2, isolation=False, workers=1) as sb:
        assert await run_ok(sb, "print(6 * 7)") == "42\n"
    assert any("WITHOUT isolation" in record.getMessage() for record in caplog.records)


def test_refuses_to_start_without_user_namespaces() -> None:
    """In a user namespace whose limit on nested user namespaces is 0, the sandbox must refuse."""
    script = (
        "import asyncio, ctypes, os\n"
        "uid, gid = os.geteuid(), os.getegid()\n"
        "assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0\n"
        "open('/proc/self/uid_map', 'w').write(f'0 {uid} 1')\n"
        "open('/proc/self/setgroups', 'w').write('deny')\n"
        "open('/proc/self/gid_map', 'w').write(f'0 {gid} 1')\n"
        "open('/proc/sys/user/max_user_namespaces', 'w').write('0')\n"
        "from mathtool.errors import SandboxUnavailable\n"
        "from mathtool.sandbox import PythonSandbox\n"
        "async def main():\n"
        "    try:\n"
        "        async with PythonSandbox():\n"
        "            print('started')\n"
        "    except SandboxUnavailable as exc:\n"
        "        print('refused:', exc)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("refused:") and "isolation=False" in done.stdout, done.stdout + done.stderr


def test_bad_limits_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="memory_mb"):
        PythonSandbox(memory_mb=16)


def test_tool_result_text() -> None:
    traceback = "Traceback (most recent call last):\n" + '  File "<cell>", line 1, in <module>\n' * 30
    stderr = traceback + "ZeroDivisionError: division by zero\n"
    failed = RunResult("partial\n", stderr, False, error="ZeroDivisionError: division by zero")
    text = format_tool_result(failed)
    assert text.startswith("partial\n[... earlier stderr lines omitted ...]")
    assert text.endswith("ZeroDivisionError: division by zero") and len(text.splitlines()) < 16
    timed_out = RunResult("1\n", "", False, timed_out=True, error="timed out after 5 s")
    assert format_tool_result(timed_out) == "1\n[Stopped: timed out after 5 s]"
    assert format_tool_result(RunResult("", "", True)) == "[No output. Use print() to see values.]"
    assert format_tool_result(RunResult("42\n", "", True)) == "42"
