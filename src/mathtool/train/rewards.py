"""Reward functions for TRL: plain callables over the fields the rollout returns beside the tokens.

The agent loop has already graded each trajectory (math-verify, in worker processes); these functions
only read the result, so TRL's reward step costs nothing. TRL passes every extra rollout field to each
reward function as a keyword argument holding one value per completion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., list[float]]


def correctness(correct: list[float], **_: Any) -> list[float]:
    """1 when the final \\boxed{} answer is equivalent to the ground truth, else 0."""
    return [float(c) for c in correct]


def boxed_format(answered: list[float], **_: Any) -> list[float]:
    """1 when the final turn ends with a \\boxed{} answer (after any tool calls), else 0."""
    return [float(a) for a in answered]


def tool_use(num_tool_calls: list[int], **_: Any) -> list[float]:
    """1 when the trajectory ran the Python tool at least once, else 0."""
    return [float(n > 0) for n in num_tool_calls]


def reward_functions(correct: float, boxed: float, tool: float) -> tuple[list[RewardFn], list[float]]:
    """The reward functions with a non-zero weight, and their weights (TRL sums them)."""
    weighted = ((correctness, correct), (boxed_format, boxed), (tool_use, tool))
    chosen = [(fn, w) for fn, w in weighted if w != 0]
    if not chosen:
        chosen = [(correctness, 1.0)]
    return [fn for fn, _ in chosen], [w for _, w in chosen]


def total_reward(fields: dict[str, list[Any]], functions: list[RewardFn], weights: list[float]) -> list[float]:
    """What TRL computes from the same fields: the weighted sum of every reward function."""
    per_fn = [fn(**fields) for fn in functions]
    return [sum(w * values[i] for w, values in zip(weights, per_fn, strict=True)) for i in range(len(per_fn[0]))]
