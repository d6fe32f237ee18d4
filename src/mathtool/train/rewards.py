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


def overlong_fraction(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to `max_length - buffer` tokens, then down linearly to -1 at
    `max_length`, and -1 beyond it."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    return max((start - length) / buffer, -1.0)


def overlong_penalty(max_length: int, buffer: int) -> RewardFn:
    """The overlong penalty as a reward function over `response_tokens` (the model's tokens, all turns)."""

    def overlong(response_tokens: list[int], **_: Any) -> list[float]:
        """0 within the budget less the buffer, down to -1 over the buffer's last tokens (DAPO)."""
        return [overlong_fraction(n, max_length, buffer) for n in response_tokens]

    return overlong


def reward_functions(correct: float, boxed: float, tool: float,
                     overlong: tuple[RewardFn, float] | None = None) -> tuple[list[RewardFn], list[float]]:
    """The reward functions with a non-zero weight, and their weights (TRL sums them). `overlong` adds
    the overlong penalty (`overlong_penalty`) with its weight."""
    weighted = ((correctness, correct), (boxed_format, boxed), (tool_use, tool))
    chosen = [(fn, w) for fn, w in weighted if w != 0]
    if not chosen:
        chosen = [(correctness, 1.0)]
    if overlong is not None:
        chosen.append(overlong)
    return [fn for fn, _ in chosen], [w for _, w in chosen]


def penalized_overlong(fields: dict[str, list[Any]], functions: list[RewardFn]) -> int | None:
    """How many trajectories the overlong penalty lowered; None when it is not among `functions`."""
    for fn in functions:
        if fn.__name__ == "overlong":
            return sum(value < 0 for value in fn(**fields))
    return None


def total_reward(fields: dict[str, list[Any]], functions: list[RewardFn], weights: list[float]) -> list[float]:
    """What TRL computes from the same fields: the weighted sum of every reward function."""
    per_fn = [fn(**fields) for fn in functions]
    return [sum(w * values[i] for w, values in zip(weights, per_fn, strict=True)) for i in range(len(per_fn[0]))]
