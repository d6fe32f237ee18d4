"""`compare.html`: the comparison of runs as a self-contained page (the report's style and script)."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from mathtool.metrics.compare import (
    DIFFERENCE_HEADER,
    Comparison,
    all_score_names,
    comparison_lines,
    format_difference,
)
from mathtool.metrics.html_page import page_html, run_info, uncertainty_note
from mathtool.metrics.report import free_paths
from mathtool.metrics.summary import ProblemRow, format_score

log = logging.getLogger(__name__)

COMPARE_STEM = "compare"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(text: str) -> str:
    """A score cell: 'value ± stderr' over its interval."""
    return f"<td class='num'>{_e(text).replace(' [', '<br>[', 1)}</td>"


def _runs_html(comparison: Comparison) -> str:
    items = "".join(f"<li><b>{_e(run.label)}</b>: {_e(run.path)} · {_e(run_info(run.config))}</li>"
                    for run in comparison.runs)
    warnings = "".join(f"<li class='bad'>{_e(line)}</li>" for line in comparison.warnings)
    return f"<ul>{items}</ul>" + (f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "")


def _scores_html(comparison: Comparison) -> str:
    headers = [run.label for run in comparison.runs]
    if comparison.differences:
        headers.append(DIFFERENCE_HEADER)
    head = "<tr><th>metric</th>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"
    body = ""
    for name in all_score_names(comparison):
        cells = [format_score(run.metrics, name) if name in run.metrics else "-" for run in comparison.runs]
        if comparison.differences:
            cells.append(format_difference(comparison.differences.get(name)))
        body += f"<tr><th>{_e(name)}</th>{''.join(_cell(c) for c in cells)}</tr>"
    lines = "".join(f"<p>{_e(line)}</p>" for line in comparison_lines(comparison))
    return f"<h2>Scores</h2><table>{head}{body}</table><p class='note'>{_e(uncertainty_note())}</p>{lines}"


def _majority(row: ProblemRow) -> str:
    mark = "<span class='ok'>✓</span>" if row.vote.majority_right else "<span class='bad'>✗</span>"
    return f"<td class='answer'>{mark} <code>{_e(row.vote.majority_answer or '-')}</code></td>"


def _problems_html(comparison: Comparison) -> str:
    """Two runs: each common problem's correct samples and majority answer in both."""
    if not comparison.differences:
        return ""
    first, second = comparison.runs
    head = (f"<tr><th>problem</th><th>{_e(first.label)} correct</th><th>{_e(second.label)} correct</th>"
            f"<th>pass@1 difference</th><th>{_e(first.label)} majority</th><th>{_e(second.label)} majority</th>"
            "<th>ground truth</th></tr>")
    body = ""
    for pid in comparison.common:
        a, b = first.rows[pid], second.rows[pid]
        body += (f"<tr><td>{_e(pid)}</td><td class='num'>{a.correct}/{a.n}</td><td class='num'>{b.correct}/{b.n}</td>"
                 f"<td class='num'>{b.pass_at_1 - a.pass_at_1:+.4f}</td>{_majority(a)}{_majority(b)}"
                 f"<td class='answer'>{_e(a.ground_truth)}</td></tr>")
    return (f"<h2>Problems both runs ran</h2><p class='note'>Click a column to sort.</p>"
            f"<table class='sortable'>{head}{body}</table>")


def render_comparison(comparison: Comparison) -> str:
    title = "mathtool compare: " + " vs ".join(run.label for run in comparison.runs)
    body = f"<h1>{_e(title)}</h1>{_runs_html(comparison)}{_scores_html(comparison)}{_problems_html(comparison)}"
    return page_html(title, body)


def write_comparison(comparison: Comparison, output: Path) -> Path:
    """Write compare.html into `output` (created if needed; an existing one is kept: compare-1.html, ...)."""
    output.mkdir(parents=True, exist_ok=True)
    (path,) = free_paths(output, COMPARE_STEM, (".html",), overwrite=False)
    path.write_text(render_comparison(comparison), encoding="utf-8")
    log.info("wrote %s", path)
    return path
