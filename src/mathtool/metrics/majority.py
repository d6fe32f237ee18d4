"""Majority vote (maj@k): the most frequent final answer among k samples, answers grouped by the grader.

- Groups: a problem's samples are taken in sample order; an answer joins the first group whose
  representative (its first answer) the grader finds equal to it (`same_answer`, the representative in
  the place of the ground truth), else it starts a new group. `\\frac{1}{2}` and `0.5` are one group.
  Identical strings are grouped without the grader. Samples without a final answer do not vote. When
  the grader cannot decide a pair in time, both answers' groups are compared no more (bounding the cost
  of pathological answers to one timeout each).
- Correct: the vote is right when the winning group's representative was graded correct (its reward),
  so no answer is graded twice and the vote agrees with the per-sample grades.
- Ties: among groups with as many votes, the one voted for first (lowest sample index) wins.
- maj@k of a problem: the mean over k-sample subsets of its samples: every subset when there are at
  most MAX_SUBSETS, else MAX_SUBSETS subsets drawn with a fixed seed (so the same run gives the same
  number). maj@n is the vote over all n samples.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mathtool.grading import same_answer

NO_ANSWER = -1
GROUPING_TIMEOUT_S = 2.0  # two answers the grader cannot compare in this time are two groups
MAX_SUBSETS = 1000
SUBSET_SEED = 0


@dataclass(frozen=True)
class Vote:
    """One problem's samples as a vote."""

    groups: tuple[int, ...]  # per sample, in sample order: its answer group, or NO_ANSWER
    answers: tuple[str, ...]  # per group: its representative (first) answer
    correct: tuple[bool, ...]  # per group: its representative's grade

    @property
    def counts(self) -> list[int]:
        return [self.groups.count(group) for group in range(len(self.answers))]

    @property
    def winner(self) -> int | None:
        """The group the vote over all samples picks (ties: the earliest), or None if nobody answered."""
        return _winner(self.groups, len(self.answers))

    @property
    def majority_answer(self) -> str | None:
        winner = self.winner
        return None if winner is None else self.answers[winner]

    @property
    def majority_right(self) -> bool:
        """True if the vote over all samples picked a correct answer."""
        winner = self.winner
        return winner is not None and self.correct[winner]

    @property
    def agreement(self) -> float:
        """The share of all samples (answered or not) that gave the majority answer."""
        counts = self.counts
        return max(counts) / len(self.groups) if counts else 0.0


def _winner(groups: Sequence[int], num_groups: int) -> int | None:
    counts = [0] * num_groups
    for group in groups:
        if group != NO_ANSWER:
            counts[group] += 1
    if not any(counts):
        return None
    first_vote = {group: groups.index(group) for group in range(num_groups) if counts[group]}
    return max(first_vote, key=lambda group: (counts[group], -first_vote[group]))


def vote(samples: Sequence[tuple[str | None, bool]]) -> Vote:
    """Group a problem's (extracted answer, graded correct) pairs, given in sample order."""
    groups: list[int] = []
    answers: list[str] = []
    correct: list[bool] = []
    known: dict[str, int] = {}
    retired: set[int] = set()  # groups whose answers cost a grader timeout: joined only by identical text
    for answer, is_right in samples:
        text = str(answer).strip() if answer is not None else ""
        if not text:
            groups.append(NO_ANSWER)
            continue
        if text not in known:
            group, undecided = _match(text, answers, retired)
            if group is None:
                group = len(answers)
                answers.append(text)
                correct.append(is_right)
                if undecided is not None:  # one of the two is too costly to compare: compare neither again
                    retired.update({undecided, group})
            known[text] = group
        groups.append(known[text])
    return Vote(tuple(groups), tuple(answers), tuple(correct))


def _match(text: str, answers: list[str], retired: set[int]) -> tuple[int | None, int | None]:
    """(the first group whose representative the grader finds equal to `text`, or None; the group the
    grader could not compare it with in time, where the search stopped, or None)."""
    for group, representative in enumerate(answers):
        if group in retired:
            continue
        same = same_answer(representative, text, GROUPING_TIMEOUT_S)
        if same is None:
            return None, group
        if same:
            return group, None
    return None, None


@functools.lru_cache(maxsize=64)
def _subsets(n: int, k: int) -> np.ndarray:
    """k-subsets of range(n) as rows of sorted indices: all of them, or MAX_SUBSETS seeded draws."""
    if math.comb(n, k) <= MAX_SUBSETS:
        return np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    rng = np.random.default_rng(SUBSET_SEED)
    draws = rng.permuted(np.tile(np.arange(n), (MAX_SUBSETS, 1)), axis=1)[:, :k]
    return np.sort(draws, axis=1)


def maj_at_k(problem: Vote, k: int) -> float:
    """The chance that the vote of k of the problem's samples is right (see the module docstring)."""
    n = len(problem.groups)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if not problem.answers:
        return 0.0
    chosen = np.asarray(problem.groups)[_subsets(n, k)]  # (subsets, k): group of each chosen sample
    is_group = chosen[:, :, None] == np.arange(len(problem.answers))  # (subsets, k, groups)
    votes = is_group.sum(axis=1)
    first_vote = np.where(is_group, np.arange(k)[None, :, None], k).min(axis=1)
    winner = np.argmax(votes * (k + 1) + (k - first_vote), axis=1)  # most votes, then the earliest
    right = np.asarray(problem.correct)[winner] & (votes.max(axis=1) > 0)
    return float(right.mean())
