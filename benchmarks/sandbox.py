"""PythonSandbox on the agent's path, beside a fresh `python -c` per call, measured in the same run.

    python benchmarks/sandbox.py [--sessions 500] [--throughput-sessions 2000] [--concurrency 64]

A session as the agent uses one: opened, three cells that build on each other's variables, closed.
Latency: sessions one at a time, isolation on, default knobs; the first call's time includes opening the
session (a fresh worker process is taken for it). Also shown, not in the JSON: 1,000 more cells in one
long session (a call once its process is warm). Throughput: `--concurrency` sessions in flight from one
event loop, each closed session replaced by a new one. Baseline: the first cell run by this interpreter
(`sys.executable`, the venv's python3) in a new process, as a naive tool would; its calls are interleaved
with the sessions so that both see the same load (the machine may be shared).
The last line is one JSON object: session_first_call_p50_ms (open + first cell), session_call_p50_ms
(the later cells), session_p99_ms (a whole session: open, three cells, close), sessions_per_s_64 and
calls_per_s_64 (at `--concurrency` in flight), subprocess_p50_ms and speedup (= subprocess p50 / first call p50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time

from mathtool.sandbox import PythonSandbox

CELLS = (
    ("import math\nx = math.factorial(20)\nprint(x)", "2432902008176640000\n"),
    ("y = x // 20\nprint(y)", "121645100408832000\n"),
    ("print(x - y)", "2311256907767808000\n"),
)
BASELINE = "import math\nprint(math.factorial(20))"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_session(sandbox: PythonSandbox) -> list[float]:
    """Seconds at the end of each cell, then at the close, counted from the opening."""
    marks = []
    start = time.perf_counter()
    async with sandbox.session() as session:
        for code, expected in CELLS:
            outcome = await session.run(code)
            assert outcome.stdout == expected, outcome
            marks.append(time.perf_counter() - start)
    marks.append(time.perf_counter() - start)
    return marks


async def sequential(
    sandbox: PythonSandbox, sessions: int, subprocess_every: int = 0
) -> tuple[list[list[float]], list[float]]:
    """Sessions one at a time; every `subprocess_every` sessions also one fresh-process call."""
    ours, theirs = [], []
    for i in range(sessions):
        if subprocess_every and i % subprocess_every == 0:
            theirs.append(subprocess_latency_ms())
            await one_session(sandbox)  # not counted: the machine settles after the fresh process
        ours.append(await one_session(sandbox))
    return ours, theirs


def subprocess_latency_ms() -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert done.stdout == CELLS[0][1], done
    return (time.perf_counter() - start) * 1e3


async def long_session_ms(sandbox: PythonSandbox, cells: int) -> list[float]:
    """Cells of one long session, after the three of `CELLS`: what a call costs once its process is warm."""
    times = []
    async with sandbox.session() as session:
        for code, _ in CELLS:
            await session.run(code)
        for _ in range(cells):
            start = time.perf_counter()
            outcome = await session.run(CELLS[-1][0])
            times.append((time.perf_counter() - start) * 1e3)
            assert outcome.stdout == CELLS[-1][1], outcome
    return times


async def concurrent(sandbox: PythonSandbox, sessions: int, concurrency: int) -> tuple[float, list[list[float]]]:
    """Sessions per second with `concurrency` in flight, and each session's marks."""
    remaining, marks = sessions, []

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            marks.append(await one_session(sandbox))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return sessions / (time.perf_counter() - start), marks


async def measure(
    args: argparse.Namespace,
) -> tuple[list[list[float]], list[float], float, list[list[float]], list[float]]:
    every = max(1, args.sessions // args.subprocess_calls)
    async with PythonSandbox(timeout_s=5, memory_mb=1024) as sandbox:
        await sequential(sandbox, 20)  # warm-up
        ours, theirs = await sequential(sandbox, args.sessions, every)
        warm = await long_session_ms(sandbox, 1000)
        await concurrent(sandbox, args.concurrency, args.concurrency)  # warm-up: spares sized to the load
        rate, loaded = await concurrent(sandbox, args.throughput_sessions, args.concurrency)
    return ours, theirs, rate, loaded, warm


def first_and_later_ms(marks: list[list[float]]) -> tuple[list[float], list[float]]:
    first = [m[0] * 1e3 for m in marks]
    later = [(m[i] - m[i - 1]) * 1e3 for m in marks for i in range(1, len(CELLS))]
    return first, later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=500, help="sequential sessions for the latency figures")
    parser.add_argument("--throughput-sessions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--subprocess-calls", type=int, default=50)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    ours, theirs, rate, loaded, warm = asyncio.run(measure(args))
    first, later = first_and_later_ms(ours)
    whole = [m[-1] * 1e3 for m in ours]
    first_p50, later_p50, whole_p99 = percentile(first, 0.5), percentile(later, 0.5), percentile(whole, 0.99)
    base_p50 = percentile(theirs, 0.5)
    print(
        f"one session at a time: open + first cell p50 {first_p50:.2f} ms (p99 {percentile(first, 0.99):.2f}), "
        f"later cells p50 {later_p50:.2f} ms, whole session p50 {percentile(whole, 0.5):.2f} ms, p99 {whole_p99:.2f} ms"
    )
    print(f"one long session, 1,000 more cells: p50 {percentile(warm, 0.5):.2f} ms")
    loaded_first, loaded_later = (percentile(values, 0.5) for values in first_and_later_ms(loaded))
    print(
        f"{args.concurrency} sessions in flight: {rate:.0f} sessions/s, {rate * len(CELLS):.0f} calls/s; "
        f"open + first cell p50 {loaded_first:.2f} ms, later cells p50 {loaded_later:.2f} ms"
    )
    print(f"fresh `{sys.executable} -c` per call (interleaved): p50 {base_p50:.2f} ms")
    print(f"speedup: {base_p50 / first_p50:.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    figures = {
        "session_first_call_p50_ms": round(first_p50, 3),
        "session_call_p50_ms": round(later_p50, 3),
        "session_p99_ms": round(whole_p99, 3),
        "sessions_per_s_64": round(rate, 1),
        "calls_per_s_64": round(rate * len(CELLS), 1),
        "subprocess_p50_ms": round(base_p50, 3),
        "speedup": round(base_p50 / first_p50, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
