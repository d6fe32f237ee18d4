"""Grader throughput and worst-case latency, each beside plain in-process math-verify.

1. Grades/s over the DeepScaleR mirror rows that carry a `solution` (each solution graded against its
   row's answer): mathtool.grading from several threads vs math-verify's parse+verify in one process.
2. Latency on adversarial responses (2 MB strings, 20k nested braces, power towers). The baseline runs
   in a subprocess, killed after --baseline-timeout (reported as ">= N"), in two ways: on a main thread
   with math-verify's own SIGALRM timeouts, and as on any other thread, where they must be off.

Usage: python benchmarks/grader.py [--data ../shared/data] [--rows N]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mathtool.grading import grade
from mathtool.grading.grader import DEFAULT_TIMEOUT_S, pool_size

ADVERSARIAL = {
    "2MB_text_then_correct_box": "x" * 2_000_000 + "\\boxed{5}",
    "2MB_math_then_power_tower": "1+" * 1_000_000 + "\\boxed{9^{9^{9}}}",
    "power_tower": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "huge_factorial": "\\boxed{(10^{10})!}",
    "400_nested_braces": "\\boxed{" + "{" * 400 + "5" + "}" * 400 + "}",
    "20k_nested_braces": "\\boxed{" + "{" * 20_000 + "5" + "}" * 20_000 + "}",
    "2MB_unclosed_box": "\\boxed{" + "(" * 2_000_000,
}

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
    grade("\\boxed{\\frac{1}{2}}", "0.5")  # start the workers before timing
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


def show(seconds: float | None, at_least: float | None = None) -> str:
    return f"{seconds:8.3f} s" if seconds is not None else f">= {at_least or 0:.0f} s".rjust(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--rows", type=int, default=None, help="grade only the first N solution rows")
    parser.add_argument("--threads", type=int, default=2 * pool_size(), help="threads calling grade()")
    parser.add_argument("--baseline-timeout", type=float, default=30.0)
    args = parser.parse_args()

    rows = load_rows(args.data, args.rows)
    ours, base = ours_throughput(rows, args.threads), baseline_throughput(rows)
    print(f"throughput over {len(rows)} DeepScaleR solutions ({pool_size()} workers, {args.threads} threads)")
    for name, figures in (("mathtool.grading", ours), ("math-verify in-process", base)):
        print(f"  {name:24} {figures['grades_per_s']:8.1f} grades/s   judged correct {figures['correct']}")

    print(f"latency on adversarial responses (grade timeout {DEFAULT_TIMEOUT_S:.0f} s; gold answer 5)")
    print(f"  {'case':28} {'mathtool':>10} {'mv main thread':>16} {'mv other thread':>16}")
    latency = {}
    for name, response in ADVERSARIAL.items():
        row = {"ours": ours_latency(response)}
        for mode in ("main", "thread"):
            row[f"baseline_{mode}"] = baseline_latency(response, mode, args.baseline_timeout)
        latency[name] = row
        cells = [
            show(row[k]["seconds"], row[k].get("at_least_s")) for k in ("ours", "baseline_main", "baseline_thread")
        ]
        print(f"  {name:28} {cells[0]:>10} {cells[1]:>16} {cells[2]:>16}   ({row['ours']['reason']})")
    worst = max(row["ours"]["seconds"] for row in latency.values())
    print(f"  worst case: mathtool {worst:.2f} s")
    summary = {
        "rows": len(rows),
        "workers": pool_size(),
        "threads": args.threads,
        "grades_per_s": round(ours["grades_per_s"], 1),
        "baseline_grades_per_s": round(base["grades_per_s"], 1),
        "correct": ours["correct"],
        "baseline_correct": base["correct"],
        "worst_latency_s": round(worst, 3),
        "baseline_timeout_s": args.baseline_timeout,
        "latency": latency,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
