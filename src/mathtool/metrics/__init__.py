"""Unbiased pass@k, majority vote (maj@k), their bootstrap uncertainty, run metrics (metrics.json), per-problem
tables, the markdown + HTML report, and the comparison of runs (`compare`)."""

from mathtool.metrics.pass_at_k import pass_at_k, pass_k_values
from mathtool.metrics.report import write_report
from mathtool.metrics.summary import ProblemRow, compute_metrics, per_problem_rows, summary_table
from mathtool.run_record import load_run

__all__ = [
    "ProblemRow",
    "compute_metrics",
    "load_run",
    "pass_at_k",
    "pass_k_values",
    "per_problem_rows",
    "summary_table",
    "write_report",
]
