"""The Problem record: one row of a dataset, as the agent and grader see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
