"""The Problem record: one row of a dataset, as the agent and grader see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkedExample:
    """A solved problem the agent sees before its own, as a finished conversation in its tool-call format:
    the question, one tool call running `code`, the tool's `output`, and the \\boxed{} `answer`."""

    question: str
    code: str
    output: str
    answer: str


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    examples: tuple[WorkedExample, ...] = ()  # few-shot conversations before the problem (row field `examples`)
