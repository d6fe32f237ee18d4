"""Run metrics (what `metrics.json` holds), the per-problem table, and the CLI's summary table.

Pass@k is averaged over problems. Each problem uses its own n, the number of its trajectories (a run
that was stopped early may hold fewer than n_samples for some problems); a problem with fewer than k
trajectories is left out of pass@k's average rather than counted as a guess. `pass@k_num_problems`
says how many problems each pass@k averages over.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from rich.table import Table

from mathtool.metrics.pass_at_k import pass_at_k, pass_k_values

ERROR_TERMINATION = "error"  # mathtool.agent.trajectory.ERROR


@dataclass(frozen=True)
class ProblemRow:
    """One problem's results over its samples."""

    problem_id: str
    n: int  # trajectories of this problem
    correct: int
    pass_at_1: float
    mean_tool_calls: float
    mean_response_tokens: float
    ground_truth: str


def is_correct(record: dict[str, Any]) -> bool:
    """A trajectory counts as correct when its reward is 1.0 (graded equal to the ground truth)."""
    return float(record.get("reward") or 0.0) >= 1.0


def has_error(record: dict[str, Any]) -> bool:
    return bool(record.get("error")) or record.get("termination") == ERROR_TERMINATION


def _natural_key(text: str) -> list[Any]:
    """Sort "p2" before "p10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def group_by_problem(trajectories: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Trajectories per problem id, problems in natural order, samples in sample order."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in trajectories:
        groups[str(record["problem_id"])].append(record)
    return {
        pid: sorted(groups[pid], key=lambda r: int(r.get("sample", 0)))
        for pid in sorted(groups, key=_natural_key)
    }


def per_problem_rows(trajectories: list[dict[str, Any]]) -> list[ProblemRow]:
    """The per-problem table: id, n, correct count, pass@1, mean tool calls, mean response tokens."""
    rows = []
    for pid, records in group_by_problem(trajectories).items():
        correct = sum(is_correct(r) for r in records)
        rows.append(ProblemRow(
            problem_id=pid,
            n=len(records),
            correct=correct,
            pass_at_1=correct / len(records),
            mean_tool_calls=fmean(int(r.get("num_tool_calls") or 0) for r in records),
            mean_response_tokens=fmean(int(r.get("response_tokens") or 0) for r in records),
            ground_truth=str(records[0].get("ground_truth") or ""),
        ))
    return rows


def _pass_at_k_metrics(rows: list[ProblemRow], n_samples: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for k in pass_k_values(n_samples):
        values = [pass_at_k(row.n, row.correct, k) for row in rows if row.n >= k]
        metrics[f"pass@{k}"] = fmean(values) if values else None
        counts[str(k)] = len(values)
    metrics["pass@k_num_problems"] = counts
    return metrics


def _trajectory_stats(trajectories: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = [int(r.get("response_tokens") or 0) for r in trajectories]
    tool_calls = [int(r.get("num_tool_calls") or 0) for r in trajectories]
    terminations = Counter(str(r.get("termination")) for r in trajectories)
    empty = not trajectories
    return {
        "mean_reward": None if empty else fmean(float(r.get("reward") or 0.0) for r in trajectories),
        "mean_response_tokens": None if empty else fmean(tokens),
        "max_response_tokens": None if empty else max(tokens),
        "mean_tool_calls": None if empty else fmean(tool_calls),
        "frac_with_tool_calls": None if empty else sum(c > 0 for c in tool_calls) / len(tool_calls),
        "mean_turns": None if empty else fmean(int(r.get("num_turns") or 0) for r in trajectories),
        "termination_counts": dict(terminations.most_common()),
        "num_errors": sum(has_error(r) for r in trajectories),
        # token-exact trajectories whose record had to be resynced to the template (masked in training)
        "num_inexact": sum(r.get("prompt_ids") is not None and r.get("token_exact") is False for r in trajectories),
    }


def compute_metrics(trajectories: list[dict[str, Any]], n_samples: int) -> dict[str, Any]:
    """The run's metrics, JSON-ready: pass@1, pass@2, pass@4, ... pass@n_samples, counts, token and
    tool statistics. A value with nothing to average (an empty run) is None."""
    rows = per_problem_rows(trajectories)
    return {
        "num_problems": len(rows),
        "num_trajectories": len(trajectories),
        "n_samples": n_samples,
        **_pass_at_k_metrics(rows, n_samples),
        **_trajectory_stats(trajectories),
    }


def format_value(value: Any) -> str:
    """A metric as the tables show it: floats with 4 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _pass_at_k_shown(metrics: dict[str, Any], key: str) -> str:
    """A pass@k value, saying over how many problems when some had fewer than k trajectories."""
    shown = format_value(metrics[key])
    counted = metrics.get("pass@k_num_problems", {}).get(key.removeprefix("pass@"))
    total = metrics.get("num_problems")
    if counted is not None and total is not None and counted < total:
        shown += f" (over {counted} of {total} problems)"
    return shown


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, shown value) pairs: pass@k first, then counts and statistics, then terminations."""
    pass_keys = [k for k in metrics if k.startswith("pass@") and k != "pass@k_num_problems"]
    skip = {*pass_keys, "pass@k_num_problems", "termination_counts"}
    rows = [(key, _pass_at_k_shown(metrics, key)) for key in pass_keys]
    rows += [(key, format_value(value)) for key, value in metrics.items() if key not in skip]
    rows += [(f"termination: {name}", str(count))
             for name, count in metrics.get("termination_counts", {}).items()]
    return rows


def summary_table(metrics: dict[str, Any], title: str = "Results") -> Table:
    """The run's metrics as a two-column rich table, for the CLI."""
    table = Table("metric", "value", title=title)
    for name, value in summary_rows(metrics):
        style = "bold" if name.startswith("pass@") else None
        table.add_row(name, value, style=style)
    return table
