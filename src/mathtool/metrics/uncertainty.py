"""How far a score averaged over problems could move: a seeded bootstrap over problems.

A score (pass@k, maj@k) is the mean of one value per problem. The bootstrap draws RESAMPLES sets of
as many problems, with replacement, from the run's problems and takes each set's mean: `stderr` is the
standard deviation of those means and `ci95` their 2.5th and 97.5th percentiles. Each problem's value
came from its own samples, so the spread covers both which problems were drawn and which samples.
The generator is seeded, so the same values always give the same interval. For two runs on the same
problems, `paired` resamples the per-problem differences, problem by problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
METHOD = {"method": "bootstrap over problems", "resamples": RESAMPLES, "seed": SEED,
          "stderr": "standard deviation of the resampled means", "ci95": "2.5th and 97.5th percentiles"}


@dataclass(frozen=True)
class Estimate:
    """A mean over problems with its bootstrap standard error and 95% interval."""

    mean: float
    stderr: float
    ci95: tuple[float, float]
    num_problems: int


def resampled_means(values: Sequence[float]) -> np.ndarray:
    """RESAMPLES means of `values` drawn with replacement; the same draws for every list of that length."""
    data = np.asarray(values, dtype=float)
    picks = np.random.default_rng(SEED).integers(0, len(data), size=(RESAMPLES, len(data)))
    return data[picks].mean(axis=1)


def bootstrap(values: Sequence[float]) -> Estimate | None:
    """The mean of `values` (one per problem) with its spread; None when there are none."""
    if not len(values):
        return None
    means = resampled_means(values)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(np.mean(values)), float(means.std(ddof=1)), (float(low), float(high)), len(values))


def paired(first: Sequence[float], second: Sequence[float]) -> Estimate | None:
    """second - first, problem by problem (same order in both), resampled as pairs."""
    if len(first) != len(second):
        raise ValueError(f"paired values need equal lengths, got {len(first)} and {len(second)}")
    return bootstrap([b - a for a, b in zip(first, second, strict=True)])
