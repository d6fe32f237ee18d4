"""`mathtool compare RUN_DIR RUN_DIR [...]`: runs' scores side by side; for two runs, the paired difference.

- Each run's pass@k and maj@k with its bootstrap interval, recomputed from its trajectories (as
  `mathtool report` does).
- For two runs: the difference second - first, problem by problem over the problems both ran, with a
  paired bootstrap interval; and the problems that flipped: whose majority vote over all of a run's
  samples was right in one run and wrong in the other.
- A one-line warning for each setting that changes what the scores mean and differs between the runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from mathtool.errors import ConfigError
from mathtool.metrics.summary import (
    UNCERTAINTY_NOTE,
    ProblemRow,
    compute_metrics,
    format_score,
    per_problem_rows,
    score_names,
)
from mathtool.metrics.uncertainty import Estimate, paired
from mathtool.run_record import load_run

# config.json keys that change what a score means. The optional ones are recorded by newer runs only:
# they are compared when every run records them.
MEANING_KEYS = ("dataset", "dataset_sha256", "model", "chat_template", "tool_format", "max_response_length",
                "n_samples", "temperature", "top_p")
OPTIONAL_KEYS = frozenset({"dataset_sha256", "chat_template"})
LONG_VALUE = 40  # longer values (a chat template) are shown by their hash
SHA256 = re.compile(r"[0-9a-f]{64}")
DIFFERENCE_HEADER = "difference (paired)"


@dataclass(frozen=True)
class RunScores:
    """One run directory, scored."""

    label: str
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    rows: dict[str, ProblemRow]  # by problem id, in natural order


@dataclass(frozen=True)
class Comparison:
    runs: list[RunScores]
    warnings: list[str]
    differences: dict[str, Estimate | None]  # two runs: score name -> second - first, paired
    common: list[str]  # problems both runs ran (two runs)
    gained: list[str]  # right in the second run's majority vote only
    lost: list[str]  # right in the first run's majority vote only


def score_run(run_dir: Path, label: str) -> RunScores:
    config, trajectories = load_run(run_dir)
    rows = per_problem_rows(trajectories)
    n_samples = int(config.get("n_samples") or max((row.n for row in rows), default=1))
    metrics = compute_metrics(trajectories, n_samples, rows)
    return RunScores(label, run_dir, config, metrics, {row.problem_id: row for row in rows})


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or the path as given where two runs share a name."""
    names = [path.resolve().name for path in run_dirs]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, run_dirs, strict=True)]


def _shown(value: Any) -> str:
    """A config value for a warning line: a sha256 by its first 12 digits, other long text by its hash's."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if SHA256.fullmatch(text):
        return text[:12]
    if len(text) > LONG_VALUE:
        return f"sha256:{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return text


def config_warnings(runs: list[RunScores]) -> list[str]:
    """One line per meaning-changing setting that differs, and one if the runs ran different problems."""
    lines = []
    for key in MEANING_KEYS:
        values = [run.config.get(key) for run in runs]
        if key in OPTIONAL_KEYS and any(value is None for value in values):
            continue
        if len({json.dumps(value, sort_keys=True, default=str) for value in values}) > 1:
            shown = ", ".join(f"{run.label}: {_shown(value)}" for run, value in zip(runs, values, strict=True))
            lines.append(f"runs differ in {key} ({shown})")
    problem_sets = [set(run.rows) for run in runs]
    if any(problems != problem_sets[0] for problems in problem_sets):
        common = set.intersection(*problem_sets)
        counts = ", ".join(f"{run.label}: {len(run.rows)}" for run in runs)
        lines.append(f"runs differ in their problems ({counts}; {len(common)} in common)")
    return lines


def paired_differences(first: RunScores, second: RunScores, common: list[str]) -> dict[str, Estimate | None]:
    """second - first for each score both runs report, over the common problems with at least k samples."""
    differences: dict[str, Estimate | None] = {}
    for name in score_names(first.metrics):
        if name not in second.metrics:
            continue
        metric, k = name.split("@")[0], int(name.split("@")[1])
        pairs = [(first.rows[p], second.rows[p]) for p in common if min(first.rows[p].n, second.rows[p].n) >= k]
        differences[name] = paired([a.score(metric, k) for a, _ in pairs], [b.score(metric, k) for _, b in pairs])
    return differences


def compare_runs(run_dirs: list[Path]) -> Comparison:
    """Score every run; for exactly two, add the paired differences and the flipped problems."""
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run directories")
    runs = [score_run(path, label) for path, label in zip(run_dirs, run_labels(run_dirs), strict=True)]
    warnings = config_warnings(runs)
    if len(runs) != 2:
        return Comparison(runs, warnings, {}, [], [], [])
    first, second = runs
    common = [pid for pid in first.rows if pid in second.rows]
    gained = [p for p in common if second.rows[p].vote.majority_right and not first.rows[p].vote.majority_right]
    lost = [p for p in common if first.rows[p].vote.majority_right and not second.rows[p].vote.majority_right]
    return Comparison(runs, warnings, paired_differences(first, second, common), common, gained, lost)


def format_difference(estimate: Estimate | None) -> str:
    if estimate is None:
        return "-"
    low, high = estimate.ci95
    return f"{estimate.mean:+.4f} ± {estimate.stderr:.4f} [{low:+.4f}, {high:+.4f}]"


def all_score_names(comparison: Comparison) -> list[str]:
    """pass@k then maj@k, k ascending, over the union of the runs' scores."""
    names = {name for run in comparison.runs for name in score_names(run.metrics)}
    return sorted(names, key=lambda name: (not name.startswith("pass"), int(name.split("@")[1])))


def comparison_table(comparison: Comparison) -> Table:
    """Rows: pass@k and maj@k; columns: each run ('value ± stderr' over its 95% interval), then the difference."""
    table = Table("metric", *(run.label for run in comparison.runs), caption=UNCERTAINTY_NOTE)
    if comparison.differences:
        table.add_column(DIFFERENCE_HEADER)
    for name in all_score_names(comparison):
        cells = [format_score(run.metrics, name) if name in run.metrics else "-" for run in comparison.runs]
        if comparison.differences:
            cells.append(format_difference(comparison.differences.get(name)))
        table.add_row(name, *(cell.replace(" [", "\n[", 1) for cell in cells))
    return table


def comparison_lines(comparison: Comparison) -> list[str]:
    """The lines under the table: what the difference is over, and the problems that flipped."""
    if not comparison.differences:
        return []
    first, second = comparison.runs
    return [
        f"difference: {second.label} - {first.label}, problem by problem over the {len(comparison.common)} "
        "problems both runs ran; an interval that holds 0 is no evidence of a difference",
        f"right in {second.label} only (majority vote): {_problem_list(comparison.gained)}",
        f"right in {first.label} only (majority vote): {_problem_list(comparison.lost)}",
    ]


def _problem_list(problems: list[str]) -> str:
    return ", ".join(problems) if problems else "none"
