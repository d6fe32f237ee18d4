"""`mathtool report RUN_DIR`: `report.md` and a self-contained `report.html` written into the run dir.

An existing report is never overwritten silently: by default the next free pair of names is taken
(report-1.md / report-1.html, report-2.*, ...); `overwrite=True` replaces report.md / report.html.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from mathtool.metrics.html_page import render_html, run_info
from mathtool.metrics.plots import report_plots
from mathtool.metrics.run_files import load_run
from mathtool.metrics.summary import ProblemRow, compute_metrics, format_value, per_problem_rows, summary_rows

log = logging.getLogger(__name__)

REPORT_STEM = "report"


def report_paths(run_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    """report.md / report.html, or with overwrite=False the first numbered pair where neither exists."""
    index = 0
    while True:
        stem = REPORT_STEM if index == 0 else f"{REPORT_STEM}-{index}"
        markdown, page = run_dir / f"{stem}.md", run_dir / f"{stem}.html"
        if overwrite or not (markdown.exists() or page.exists()):
            return markdown, page
        index += 1


def _md_cell(value: Any) -> str:
    """Text safe inside a markdown table cell (and inert if the viewer allows raw HTML)."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]


def render_markdown(title: str, config: dict[str, Any], metrics: dict[str, Any], rows: list[ProblemRow],
                    html_name: str) -> str:
    """Summary metrics and the per-problem table; plots and conversations live in the HTML page."""
    problems = [[r.problem_id, r.n, r.correct, format_value(r.pass_at_1), f"{r.mean_tool_calls:.2f}",
                 f"{r.mean_response_tokens:.1f}", r.ground_truth] for r in rows]
    lines = [f"# {_md_cell(title)}", "", _md_cell(run_info(config)), "", "## Summary", ""]
    lines += _md_table(["metric", "value"], [list(row) for row in summary_rows(metrics)])
    lines += ["", "## Per-problem results", ""]
    lines += _md_table(["problem", "n", "correct", "pass@1", "mean tool calls", "mean tokens", "ground truth"],
                       problems)
    lines += ["", f"Plots and every trajectory: [{html_name}]({html_name})", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the markdown and HTML reports of a run directory; returns (markdown path, HTML path)."""
    run_dir = Path(run_dir)
    config, trajectories = load_run(run_dir)
    rows = per_problem_rows(trajectories)
    n_samples = int(config.get("n_samples") or max((row.n for row in rows), default=1))
    metrics = compute_metrics(trajectories, n_samples)
    title = f"mathtool report: {run_dir.resolve().name}"
    markdown_path, html_path = report_paths(run_dir, overwrite)
    page = render_html(title, config, metrics, rows, trajectories, report_plots(rows, trajectories))
    markdown_path.write_text(render_markdown(title, config, metrics, rows, html_path.name), encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    log.info("wrote %s and %s (%d trajectories)", markdown_path, html_path, len(trajectories))
    return markdown_path, html_path
