"""Run metrics (what `metrics.json` holds), the per-problem table, and the CLI's summary table.

Pass@k is averaged over problems. Each problem uses its own n, the number of its trajectories (a run
that was stopped early may hold fewer than n_samples for some problems); a problem with fewer than k
trajectories is left out of pass@k's average rather than counted as a guess. `pass@k_num_problems`
says how many problems each pass@k averages over; maj@k (see `majority`) averages over the same problems.
Beside each pass@k and maj@k stand `<name>_stderr` and `<name>_ci95` (a bootstrap over problems, see
`uncertainty`; the method is recorded under `uncertainty`).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from rich.table import Table

from mathtool.grading.grader import pool_size
from mathtool.metrics.majority import Vote, maj_at_k, vote
from mathtool.metrics.pass_at_k import pass_at_k, pass_k_values
from mathtool.metrics.uncertainty import METHOD, Estimate, bootstrap
from mathtool.run_record import record_failed, record_is_correct

SCORE_NAME = re.compile(r"^(pass|maj)@\d+$")
UNCERTAINTY_NOTE = "± standard error [95% interval], bootstrap over problems"


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
    vote: Vote  # the samples' final answers, grouped by the grader

    def score(self, metric: str, k: int) -> float:
        """This problem's pass@k or maj@k (metric "pass" or "maj"); needs k <= n."""
        return pass_at_k(self.n, self.correct, k) if metric == "pass" else maj_at_k(self.vote, k)


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
    """The per-problem table: id, n, correct count, pass@1, mean tool calls, mean response tokens, and the
    vote (problems are voted on in parallel: grouping answers may wait on the grader's workers)."""
    problems = group_by_problem(trajectories)
    ballots = [[(r.get("extracted_answer"), record_is_correct(r)) for r in records] for records in problems.values()]
    with ThreadPoolExecutor(max_workers=pool_size(), thread_name_prefix="mathtool-vote") as threads:
        votes = list(threads.map(vote, ballots))
    rows = []
    for (pid, records), problem_vote in zip(problems.items(), votes, strict=True):
        correct = sum(record_is_correct(r) for r in records)
        rows.append(ProblemRow(
            problem_id=pid,
            n=len(records),
            correct=correct,
            pass_at_1=correct / len(records),
            mean_tool_calls=fmean(int(r.get("num_tool_calls") or 0) for r in records),
            mean_response_tokens=fmean(int(r.get("response_tokens") or 0) for r in records),
            ground_truth=str(records[0].get("ground_truth") or ""),
            vote=problem_vote,
        ))
    return rows


def _with_spread(name: str, estimate: Estimate | None) -> dict[str, Any]:
    if estimate is None:
        return {name: None, f"{name}_stderr": None, f"{name}_ci95": None}
    return {name: estimate.mean, f"{name}_stderr": estimate.stderr, f"{name}_ci95": list(estimate.ci95)}


def _scores(rows: list[ProblemRow], ks: list[int]) -> dict[str, Any]:
    """pass@k and maj@k for every k, each with its stderr and 95% interval; problems with n >= k."""
    metrics: dict[str, Any] = {}
    for metric in ("pass", "maj"):
        for k in ks:
            values = [row.score(metric, k) for row in rows if row.n >= k]
            metrics.update(_with_spread(f"{metric}@{k}", bootstrap(values)))
    return metrics


def _trajectory_stats(trajectories: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = [int(r.get("response_tokens") or 0) for r in trajectories]
    tool_calls = [int(r.get("num_tool_calls") or 0) for r in trajectories]
    terminations = Counter(str(r.get("termination")) for r in trajectories)
    empty = not trajectories
    return {
        "mean_correct": None if empty else fmean(record_is_correct(r) for r in trajectories),
        "mean_response_tokens": None if empty else fmean(tokens),
        "max_response_tokens": None if empty else max(tokens),
        "mean_tool_calls": None if empty else fmean(tool_calls),
        "frac_with_tool_calls": None if empty else sum(c > 0 for c in tool_calls) / len(tool_calls),
        "mean_turns": None if empty else fmean(int(r.get("num_turns") or 0) for r in trajectories),
        "termination_counts": dict(terminations.most_common()),
        "num_errors": sum(record_failed(r) for r in trajectories),
        # token-exact trajectories whose record had to be resynced to the template (masked in training)
        "num_inexact": sum(r.get("prompt_ids") is not None and r.get("token_exact") is False for r in trajectories),
    }


def compute_metrics(trajectories: list[dict[str, Any]], n_samples: int,
                    rows: list[ProblemRow] | None = None) -> dict[str, Any]:
    """The run's metrics, JSON-ready: pass@1, pass@2, pass@4, ... pass@n_samples and maj@k for the same k,
    each with its uncertainty; counts, token and tool statistics. A value with nothing to average (an
    empty run) is None. `rows`: per_problem_rows(trajectories), when the caller has it already."""
    rows = per_problem_rows(trajectories) if rows is None else rows
    ks = pass_k_values(n_samples)
    return {
        "num_problems": len(rows),
        "num_trajectories": len(trajectories),
        "n_samples": n_samples,
        **_scores(rows, ks),
        "pass@k_num_problems": {str(k): sum(row.n >= k for row in rows) for k in ks},
        "uncertainty": METHOD,
        "mean_agreement": fmean(row.vote.agreement for row in rows) if rows else None,
        **_trajectory_stats(trajectories),
    }


def format_value(value: Any) -> str:
    """A metric as the tables show it: floats with 4 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def score_names(metrics: dict[str, Any]) -> list[str]:
    """The pass@k and maj@k keys of a metrics dict, in its order."""
    return [key for key in metrics if SCORE_NAME.match(key)]


def format_score(metrics: dict[str, Any], name: str) -> str:
    """`0.4133 ± 0.0612 [0.2933, 0.5367]`; says over how many problems when some had fewer than k samples."""
    value, stderr, ci95 = metrics.get(name), metrics.get(f"{name}_stderr"), metrics.get(f"{name}_ci95")
    if value is None:
        return "-"
    shown = f"{value:.4f}"
    if stderr is not None and ci95:
        shown += f" ± {stderr:.4f} [{ci95[0]:.4f}, {ci95[1]:.4f}]"
    counted = metrics.get("pass@k_num_problems", {}).get(name.split("@")[1])
    total = metrics.get("num_problems")
    if counted is not None and total is not None and counted < total:
        shown += f" (over {counted} of {total} problems)"
    return shown


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, shown value) pairs: pass@k and maj@k first, then counts and statistics, then terminations."""
    scores = score_names(metrics)
    skip = {*scores, *(f"{n}_stderr" for n in scores), *(f"{n}_ci95" for n in scores), "pass@k_num_problems",
            "termination_counts", "uncertainty"}
    rows = [(key, format_score(metrics, key)) for key in scores]
    rows += [(key, format_value(value)) for key, value in metrics.items() if key not in skip]
    rows += [(f"termination: {name}", str(count))
             for name, count in metrics.get("termination_counts", {}).items()]
    return rows


def summary_table(metrics: dict[str, Any], title: str = "Results") -> Table:
    """The run's metrics as a two-column rich table, for the CLI."""
    table = Table("metric", "value", title=title, caption=UNCERTAINTY_NOTE)
    for name, value in summary_rows(metrics):
        style = "bold" if SCORE_NAME.match(name) else None
        table.add_row(name, value, style=style)
    return table
