"""The report's figures, rendered with matplotlib's Agg canvas to base64 PNG (no pyplot, no display)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

from mathtool.metrics.summary import ProblemRow

MAX_LABELLED_PROBLEMS = 40  # beyond this, the accuracy plot's x axis shows indices only


def _render(draw: Callable[[Any], None], width: float = 7.0, height: float = 3.2) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure.subplots())
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def accuracy_plot(rows: list[ProblemRow]) -> str:
    def draw(ax: Any) -> None:
        ax.bar(range(len(rows)), [row.pass_at_1 for row in rows], color="#4c72b0")
        if len(rows) <= MAX_LABELLED_PROBLEMS:
            ax.set_xticks(range(len(rows)), [row.problem_id for row in rows], rotation=90, fontsize=7,
                          parse_math=False)  # ids are data, not mathtext
        ax.set_ylim(0, 1)
        ax.set(title="Accuracy per problem (pass@1)", xlabel="problem", ylabel="fraction correct")

    return _render(draw, width=max(7.0, min(len(rows) * 0.22, 16.0)))


def tool_calls_histogram(tool_calls: list[int]) -> str:
    from matplotlib.ticker import MaxNLocator

    def draw(ax: Any) -> None:
        bins = [b - 0.5 for b in range(max(tool_calls) + 2)]
        ax.hist(tool_calls, bins=bins, color="#55a868", edgecolor="white")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title="Tool calls per trajectory", xlabel="tool calls", ylabel="trajectories")

    return _render(draw)


def response_length_histogram(tokens: list[int]) -> str:
    def draw(ax: Any) -> None:
        ax.hist(tokens, bins=30, color="#c44e52", edgecolor="white")
        ax.set(title="Response length", xlabel="response tokens (all turns)", ylabel="trajectories")

    return _render(draw)


def report_plots(rows: list[ProblemRow], trajectories: list[dict[str, Any]]) -> dict[str, str]:
    """Figure title -> base64 PNG; empty when there is nothing to plot."""
    if not trajectories:
        return {}
    tool_calls = [int(r.get("num_tool_calls") or 0) for r in trajectories]
    tokens = [int(r.get("response_tokens") or 0) for r in trajectories]
    return {
        "Accuracy per problem": accuracy_plot(rows),
        "Tool calls per trajectory": tool_calls_histogram(tool_calls),
        "Response length": response_length_histogram(tokens),
    }
