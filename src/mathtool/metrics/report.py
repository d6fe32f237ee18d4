"""`mathtool report RUN_DIR`: `report.md` and a self-contained `report.html` written into the run dir.

An existing report is never overwritten silently: by default the next free pair of names is taken
(report-1.md / report-1.html, report-2.*, ...); `overwrite=True` replaces report.md / report.html.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from mathtool.metrics.html_page import render_html, run_info, uncertainty_note
from mathtool.metrics.plots import report_plots
from mathtool.metrics.summary import (
    ProblemRow,
    compute_metrics,
    format_score,
    format_value,
    per_problem_rows,
    score_names,
    summary_rows,
)
from mathtool.paths import atomic_write_text, check_writable, write_errors
from mathtool.run_record import load_run

log = logging.getLogger(__name__)

REPORT_STEM = "report"
REPORT_FIX = "copy the run directory to a writable place and report the copy"


def free_paths(directory: Path, stem: str, suffixes: tuple[str, ...], overwrite: bool) -> list[Path]:
    """<stem><suffix> for each suffix, or with overwrite=False the first numbered set (<stem>-1..., <stem>-2...)
    where none exists."""
    index = 0
    while True:
        name = stem if index == 0 else f"{stem}-{index}"
        paths = [directory / f"{name}{suffix}" for suffix in suffixes]
        if overwrite or not any(path.exists() for path in paths):
            return paths
        index += 1


def report_paths(run_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    """report.md / report.html, or with overwrite=False the first numbered pair where neither exists."""
    markdown, page = free_paths(run_dir, REPORT_STEM, (".md", ".html"), overwrite)
    return markdown, page


def _md_cell(value: Any) -> str:
    """Text safe inside a markdown table cell (and inert if the viewer allows raw HTML)."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]


def render_markdown(title: str, config: dict[str, Any], metrics: dict[str, Any], rows: list[ProblemRow],
                    html_name: str) -> str:
    """Scores with their intervals, statistics and the per-problem table; plots and conversations live in the
    HTML page."""
    scores = score_names(metrics)
    problems = [[r.problem_id, r.n, r.correct, format_value(r.pass_at_1), r.vote.majority_answer or "-",
                 f"{r.vote.agreement:.2f}", "yes" if r.vote.majority_right else "no", f"{r.mean_tool_calls:.2f}",
                 f"{r.mean_response_tokens:.1f}", r.ground_truth] for r in rows]
    lines = [f"# {_md_cell(title)}", "", _md_cell(run_info(config)), "", "## Scores", ""]
    lines += _md_table(["metric", "value ± stderr [95% interval]"], [[n, format_score(metrics, n)] for n in scores])
    lines += ["", uncertainty_note(), "", "## Run statistics", ""]
    lines += _md_table(["metric", "value"], [list(row) for row in summary_rows(metrics) if row[0] not in scores])
    lines += ["", "## Per-problem results", ""]
    lines += _md_table(["problem", "n", "correct", "pass@1", "majority answer", "agreement", "majority right",
                        "mean tool calls", "mean tokens", "ground truth"], problems)
    lines += ["", f"Plots and every trajectory: [{html_name}]({html_name})", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the markdown and HTML reports of a run directory; returns (markdown path, HTML path)."""
    run_dir = Path(run_dir)
    check_writable(run_dir, REPORT_FIX)
    config, trajectories = load_run(run_dir)
    rows = per_problem_rows(trajectories)
    n_samples = int(config.get("n_samples") or max((row.n for row in rows), default=1))
    metrics = compute_metrics(trajectories, n_samples, rows)
    title = f"mathtool report: {run_dir.resolve().name}"
    markdown_path, html_path = report_paths(run_dir, overwrite)
    page = render_html(title, config, metrics, rows, trajectories, report_plots(rows, trajectories))
    with write_errors(run_dir, REPORT_FIX):
        atomic_write_text(markdown_path, render_markdown(title, config, metrics, rows, html_path.name))
        atomic_write_text(html_path, page)
    log.info("wrote %s and %s (%d trajectories)", markdown_path, html_path, len(trajectories))
    return markdown_path, html_path
