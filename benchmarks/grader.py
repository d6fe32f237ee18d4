"""Grader throughput and worst-case latency, each beside plain in-process math-verify.

1. Grades/s over the DeepScaleR mirror rows that carry a `solution` (each solution graded against its
   row's answer): mathtool.grading from several threads vs math-verify's parse+verify in one process.
2. Latency on adversarial responses (2 MB strings, 20k nested braces, power towers). The baseline runs
   in a subprocess, killed after --baseline-timeout (reported as ">= N"), in two ways: on a main thread
   with math-verify's own SIGALRM timeouts, and as on any other thread, where they must be off.
3. Queueing: the latency of a cheap answer (a number, decided in the caller; `2\\sqrt{2}` for `\\sqrt{8}`,
   which needs a worker) while as many power towers as the pool has workers run into the 5 s timeout,
   from a thread and from asyncio; the baseline is a fixed-size pool of the same size (no growth, no
   decisions in the caller), as the grader was before.

Usage: python benchmarks/grader.py [--data ../shared/data] [--rows N]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mathtool.grading import grade, grade_async
from mathtool.grading.equivalence import check_equivalence
from mathtool.grading.grader import DEFAULT_TIMEOUT_S, KILL_GRACE_S, pool_size, start_workers
from mathtool.grading.pool import KillablePool, WorkerTimeout

ADVERSARIAL = {
    "2MB_text_then_correct_box": "x" * 2_000_000 + "\\boxed{5}",
    "2MB_math_then_power_tower": "1+" * 1_000_000 + "\\boxed{9^{9^{9}}}",
    "power_tower": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "huge_factorial": "\\boxed{(10^{10})!}",
    "400_nested_braces": "\\boxed{" + "{" * 400 + "5" + "}" * 400 + "}",
    "20k_nested_braces": "\\boxed{" + "{" * 20_000 + "5" + "}" * 20_000 + "}",
    "2MB_unclosed_box": "\\boxed{" + "(" * 2_000_000,
}

POWER_TOWER = "9^{9^{9^{9^{9}}}}"
CHEAP = {"number": ("\\frac{1}{2}", "0.5"), "sympy": ("2\\sqrt{2}", "\\sqrt{8}")}  # (answer, gold)
WARM_POOL_S = 300.0

# Plain math-verify on one response, timed inside the child (argv: response file, gold, mode).
_BASELINE_CHILD = """
import json, logging, sys, time
logging.disable(logging.CRITICAL)
from math_verify import parse, verify
response = open(sys.argv[1]).read()
off = sys.argv[3] == "thread"  # off the main thread math-verify's SIGALRM timeouts must be disabled
kw_parse = {"parsing_timeout": None} if off else {}
kw_verify = {"timeout_seconds": None} if off else {}
started = time.perf_counter()
correct = verify(parse("$" + sys.argv[2] + "$", **kw_parse), parse(response, **kw_parse), **kw_verify)
print(json.dumps({"seconds": time.perf_counter() - started, "correct": bool(correct)}))
"""


def load_rows(data_dir: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (data_dir / "deepscaler.jsonl").open()]
    rows = [row for row in rows if row.get("solution")]
    return rows[:limit] if limit else rows


def ours_throughput(rows: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    start_workers()  # before timing
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda row: grade(row["solution"], row["answer"]), rows))
    seconds = time.perf_counter() - started
    return {"grades_per_s": len(rows) / seconds, "seconds": seconds, "correct": sum(r.correct for r in results)}


def baseline_throughput(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    correct = sum(bool(verify(parse(f"${row['answer']}$"), parse(row["solution"]))) for row in rows)
    seconds = time.perf_counter() - started
    return {"grades_per_s": len(rows) / seconds, "seconds": seconds, "correct": correct}


def ours_latency(response: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = grade(response, "5")
    return {"seconds": time.perf_counter() - started, "correct": result.correct, "reason": result.reason}


def baseline_latency(response: str, mode: str, timeout_s: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
        file.write(response)
        file.flush()
        command = [sys.executable, "-c", _BASELINE_CHILD, file.name, "5", mode]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=True)
        except subprocess.TimeoutExpired:
            return {"seconds": None, "at_least_s": timeout_s, "correct": False}
        except subprocess.CalledProcessError as exc:
            return {"seconds": None, "error": exc.stderr.strip().splitlines()[-1:], "correct": False}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cheap_latency_behind_towers(
    grade_cheap: Callable[[str, str], bool], start_towers: Callable[[], list[Any]], towers_still_running: bool
) -> dict[str, float]:
    """Seconds for each cheap answer, graded 0.2 s after towers of its own were started."""
    seconds = {}
    for name, (answer, gold) in CHEAP.items():
        towers = start_towers()
        time.sleep(0.2)
        started = time.perf_counter()
        assert grade_cheap(answer, gold), name
        seconds[name] = time.perf_counter() - started
        if towers_still_running:  # else the cheap answer waited for a tower's timeout
            assert not any(tower.done() for tower in towers), "a tower finished before the cheap answer"
        for tower in towers:
            tower.result()
    return seconds


def ours_queueing(threads: ThreadPoolExecutor, size: int) -> dict[str, dict[str, float]]:
    def start_towers() -> list[Any]:
        return [threads.submit(grade, f"\\boxed{{{POWER_TOWER}}}", "5") for _ in range(size)]

    from_thread = cheap_latency_behind_towers(lambda a, g: grade(f"\\boxed{{{a}}}", g).correct, start_towers, True)
    return {"thread": from_thread, "asyncio": asyncio.run(_ours_queueing_async(size))}


async def _ours_queueing_async(size: int) -> dict[str, float]:
    seconds = {}
    for name, (answer, gold) in CHEAP.items():
        towers = [asyncio.create_task(grade_async(f"\\boxed{{{POWER_TOWER}}}", "5")) for _ in range(size)]
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        assert (await grade_async(f"\\boxed{{{answer}}}", gold)).correct, name
        seconds[name] = time.perf_counter() - started
        assert not any(tower.done() for tower in towers), "a tower finished before the cheap answer"
        await asyncio.gather(*towers)
    return seconds


def baseline_queueing(threads: ThreadPoolExecutor, size: int) -> dict[str, float]:
    """The same in a fixed-size pool, every comparison sent to a worker (the grader before growth)."""
    pool = KillablePool(size, preload=("mathtool.grading.equivalence:warm_up",))
    timeout_s = DEFAULT_TIMEOUT_S

    def compare(answer: str, gold: str) -> bool:
        return pool.call(check_equivalence, (gold, answer, timeout_s), timeout_s + KILL_GRACE_S, WARM_POOL_S)

    def tower() -> None:
        with contextlib.suppress(WorkerTimeout):  # killed by the outer timeout: the same wait for the others
            compare(POWER_TOWER, "5")

    try:
        pool.start_all(WARM_POOL_S)
        return cheap_latency_behind_towers(compare, lambda: [threads.submit(tower) for _ in range(size)], False)
    finally:
        pool.shutdown()


def show(seconds: float | None, at_least: float | None = None) -> str:
    return f"{seconds:8.3f} s" if seconds is not None else f">= {at_least or 0:.0f} s".rjust(10)


def report_throughput(rows: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    ours, base = ours_throughput(rows, threads), baseline_throughput(rows)
    print(f"throughput over {len(rows)} DeepScaleR solutions ({pool_size()} workers, {threads} threads)")
    for name, figures in (("mathtool.grading", ours), ("math-verify in-process", base)):
        print(f"  {name:24} {figures['grades_per_s']:8.1f} grades/s   judged correct {figures['correct']}")
    return {
        "grades_per_s": round(ours["grades_per_s"], 1),
        "baseline_grades_per_s": round(base["grades_per_s"], 1),
        "correct": ours["correct"],
        "baseline_correct": base["correct"],
    }


def report_latency(baseline_timeout: float) -> dict[str, Any]:
    print(f"latency on adversarial responses (grade timeout {DEFAULT_TIMEOUT_S:.0f} s; gold answer 5)")
    print(f"  {'case':28} {'mathtool':>10} {'mv main thread':>16} {'mv other thread':>16}")
    latency = {}
    for name, response in ADVERSARIAL.items():
        row = {"ours": ours_latency(response)}
        for mode in ("main", "thread"):
            row[f"baseline_{mode}"] = baseline_latency(response, mode, baseline_timeout)
        latency[name] = row
        cells = [
            show(row[k]["seconds"], row[k].get("at_least_s")) for k in ("ours", "baseline_main", "baseline_thread")
        ]
        print(f"  {name:28} {cells[0]:>10} {cells[1]:>16} {cells[2]:>16}   ({row['ours']['reason']})")
    worst = max(row["ours"]["seconds"] for row in latency.values())
    print(f"  worst case: mathtool {worst:.2f} s")
    return {"worst_latency_s": round(worst, 3), "baseline_timeout_s": baseline_timeout, "latency": latency}


def report_queueing() -> dict[str, Any]:
    size = pool_size()
    with ThreadPoolExecutor(2 * size + 2) as threads:
        ours, base = ours_queueing(threads, size), baseline_queueing(threads, size)
    print(f"cheap answers while {size} power towers hold the pool's {size} workers (timeout {DEFAULT_TIMEOUT_S:.0f} s)")
    print(f"  {'answer':28} {'from thread':>12} {'from asyncio':>13} {'fixed pool (before)':>20}")
    for name, (answer, gold) in CHEAP.items():
        cells = [f"{ours['thread'][name]:9.3f} s", f"{ours['asyncio'][name]:10.3f} s", f"{base[name]:17.3f} s"]
        print(f"  {answer + ' for ' + gold:28} {cells[0]:>12} {cells[1]:>13} {cells[2]:>20}")
    worst = max(max(figures.values()) for figures in ours.values())
    return {
        "queued_cheap_worst_s": round(worst, 3),
        "baseline_queued_cheap_worst_s": round(max(base.values()), 3),
        "queueing": {"ours": ours, "baseline_fixed_pool": base},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--rows", type=int, default=None, help="grade only the first N solution rows")
    parser.add_argument("--threads", type=int, default=2 * pool_size(), help="threads calling grade()")
    parser.add_argument("--baseline-timeout", type=float, default=30.0)
    args = parser.parse_args()

    rows = load_rows(args.data, args.rows)
    summary = {"rows": len(rows), "workers": pool_size(), "threads": args.threads}
    summary |= report_throughput(rows, args.threads)
    summary |= report_latency(args.baseline_timeout)
    summary |= report_queueing()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
