"""The report's figures, rendered with matplotlib's Agg canvas to base64 PNG (no pyplot, no display)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

from mathtool.metrics.summary import ProblemRow

MAX_LABELLED_PROBLEMS = 40  # beyond this, the accuracy plot's x axis shows indices only
RIGHT_COLOR, WRONG_COLOR = "#55a868", "#4c72b0"


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
    """pass@1 per problem, easiest first; a bar is green where the majority vote over its samples was right."""
    from matplotlib.patches import Patch

    ordered = sorted(rows, key=lambda row: -row.pass_at_1)  # stable: ties stay in problem order

    def draw(ax: Any) -> None:
        colors = [RIGHT_COLOR if row.vote.majority_right else WRONG_COLOR for row in ordered]
        ax.bar(range(len(ordered)), [row.pass_at_1 for row in ordered], color=colors)
        if len(ordered) <= MAX_LABELLED_PROBLEMS:
            ax.set_xticks(range(len(ordered)), [row.problem_id for row in ordered], rotation=90, fontsize=7,
                          parse_math=False)  # ids are data, not mathtext
        ax.set_ylim(0, 1.05)
        ax.legend(handles=[Patch(color=RIGHT_COLOR, label="majority vote right"),
                           Patch(color=WRONG_COLOR, label="majority vote wrong")], fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
        ax.set(title="pass@1 per problem, easiest to hardest", xlabel="problem", ylabel="pass@1")

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
        "pass@1 per problem": accuracy_plot(rows),
        "Tool calls per trajectory": tool_calls_histogram(tool_calls),
        "Response length": response_length_histogram(tokens),
    }
