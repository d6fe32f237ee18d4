"""PythonSandbox latency and throughput, beside a fresh `python -c` per call, measured in the same run.

    python benchmarks/sandbox.py [--calls 1000] [--throughput-calls 5000] [--concurrency 16]

Latency: sequential calls of a small stdlib snippet, isolation on, default knobs. Throughput: trivial
calls, `--concurrency` in flight from one event loop. Baseline: the same snippet run by this interpreter
(`sys.executable`, the venv's python3) in a new process per call, as a naive tool would; its calls are
interleaved with the sandbox's so that both see the same load (the machine may be shared). Also shown,
not in the JSON: the figures with `calls_per_worker=1` (a new forked process for every call).
The last line is one JSON object: p50_ms, p99_ms, calls_per_s, subprocess_p50_ms and
speedup (= subprocess p50 / sandbox p50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from mathtool.sandbox import PythonSandbox

SNIPPET = "import math\nprint(math.factorial(20))"
EXPECTED = "2432902008176640000\n"
TRIVIAL = "pass"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies_ms(
    sandbox: PythonSandbox, calls: int, subprocess_every: int = 0
) -> tuple[list[float], list[float]]:
    """Sequential sandbox calls; every `subprocess_every` calls also one fresh-process call, so that
    both are measured under the same load (the machine may be shared)."""
    ours, theirs = [], []
    for i in range(calls):
        if subprocess_every and i % subprocess_every == 0:
            theirs.append(subprocess_latency_ms())
            await sandbox.run(SNIPPET)  # not counted: the machine settles after the fresh process
        start = time.perf_counter()
        outcome = await sandbox.run(SNIPPET)
        ours.append((time.perf_counter() - start) * 1e3)
        assert outcome.stdout == EXPECTED, outcome
    return ours, theirs


def subprocess_latency_ms() -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert done.stdout == EXPECTED, done
    return (time.perf_counter() - start) * 1e3


async def calls_per_second(sandbox: PythonSandbox, calls: int, concurrency: int) -> float:
    remaining = calls

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            assert (await sandbox.run(TRIVIAL)).ok

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return calls / (time.perf_counter() - start)


async def measure(
    calls: int, throughput_calls: int, concurrency: int, calls_per_worker: int, subprocess_every: int = 0
) -> tuple[list[float], list[float], float]:
    async with PythonSandbox(timeout_s=5, memory_mb=1024, calls_per_worker=calls_per_worker) as sandbox:
        await latencies_ms(sandbox, 50)  # warm-up
        ours, theirs = await latencies_ms(sandbox, calls, subprocess_every)
        rate = await calls_per_second(sandbox, throughput_calls, concurrency)
    return ours, theirs, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="sequential calls for the latency figures")
    parser.add_argument("--throughput-calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--subprocess-calls", type=int, default=50)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    every = max(1, args.calls // args.subprocess_calls)
    latencies, baseline, rate = asyncio.run(measure(args.calls, args.throughput_calls, args.concurrency, 100, every))
    p50, p99, base_p50 = percentile(latencies, 0.5), percentile(latencies, 0.99), percentile(baseline, 0.5)
    print(f"sandbox (warm workers): p50 {p50:.2f} ms, p99 {p99:.2f} ms, {rate:.0f} trivial calls/s")
    print(f"fresh `{sys.executable} -c` per call (interleaved): p50 {base_p50:.2f} ms")
    print(f"speedup: {base_p50 / p50:.1f}x")
    fresh, _, fresh_rate = asyncio.run(measure(200, 500, args.concurrency, calls_per_worker=1))
    print(
        f"sandbox, a new process per call (calls_per_worker=1): p50 {statistics.median(fresh):.2f} ms, "
        f"{fresh_rate:.0f} trivial calls/s"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    figures = {
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "calls_per_s": round(rate, 1),
        "subprocess_p50_ms": round(base_p50, 3),
        "speedup": round(base_p50 / p50, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
