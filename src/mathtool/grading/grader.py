"""grade(): extract the final answer, compare it with the ground truth, say why; bounded and thread-safe."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mathtool.grading.equivalence import check_equivalence
from mathtool.grading.extract import find_final_answer
from mathtool.grading.normalize import normalize_answer, normalize_gold, quick_verdict
from mathtool.grading.pool import KillablePool, WorkerError, WorkerTimeout

logger = logging.getLogger(__name__)

EQUIVALENT = "equivalent"
NOT_EQUIVALENT = "not equivalent"
TIMEOUT = "timeout"
GRADER_ERROR = "grader error"

DEFAULT_TIMEOUT_S = 5.0
KILL_GRACE_S = 0.5  # the worker's own timer fires at timeout_s; the parent kills it this much later
WAIT_FOR_WORKER_S = 600.0  # bound on queueing for a free worker (each use of one is itself bounded)


@dataclass(frozen=True)
class GradeResult:
    """What was graded and how: `reason` is one of the module's reason strings or an extraction failure."""

    extracted: str | None
    correct: bool
    reason: str


def is_correct(response: str, ground_truth: str | int) -> bool:
    """True if the final \\boxed{} answer of `response` is mathematically equal to `ground_truth`."""
    return grade(response, ground_truth).correct


def grade(response: str, ground_truth: str | int, timeout_s: float = DEFAULT_TIMEOUT_S) -> GradeResult:
    """Grade the last boxed answer of `response`; whatever is not decided within `timeout_s` is wrong."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    extracted, why_none = find_final_answer(response)
    if extracted is None:
        return GradeResult(None, False, why_none)
    reason = _compare(normalize_gold(ground_truth), extracted, timeout_s)
    return GradeResult(extracted, reason == EQUIVALENT, reason)


def same_answer(reference: str, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """Whether two final answers (contents of \\boxed{}) are one value by grade()'s rules, with `reference`
    in the place of the ground truth: `\\frac{1}{2}` and `0.5` are one answer. None: not decided within
    `timeout_s` (or the grader failed)."""
    reason = _compare(normalize_gold(reference), answer, timeout_s)
    return None if reason in (TIMEOUT, GRADER_ERROR) else reason == EQUIVALENT


def _compare(gold: str, extracted: str, timeout_s: float) -> str:
    """The reason string for `extracted` against the normalized ground truth `gold`."""
    answer = normalize_answer(extracted, gold)
    verdict = quick_verdict(answer, gold)
    return _compare_in_worker(gold, answer, timeout_s) if verdict is None else _reason(verdict)


async def grade_async(response: str, ground_truth: str | int, timeout_s: float = DEFAULT_TIMEOUT_S) -> GradeResult:
    """grade() on a grader thread, so the event loop never blocks."""
    call = functools.partial(grade, response, ground_truth, timeout_s)
    return await asyncio.get_running_loop().run_in_executor(_shared().threads, call)


def _reason(same: bool) -> str:
    return EQUIVALENT if same else NOT_EQUIVALENT


def _compare_in_worker(gold: str, answer: str, timeout_s: float) -> str:
    pool = _shared().pool
    try:
        same = pool.call(check_equivalence, (gold, answer, timeout_s), timeout_s + KILL_GRACE_S, WAIT_FOR_WORKER_S)
    except WorkerTimeout as exc:
        logger.info("grading timed out (%s) on answer %.80r", exc, answer)
        return TIMEOUT
    except WorkerError as exc:
        logger.warning("grader worker failed (%s) on answer %.80r", exc, answer)
        return GRADER_ERROR
    if same is None:
        logger.info("grading timed out after %.1f s on answer %.80r", timeout_s, answer)
        return TIMEOUT
    return _reason(same)


@dataclass
class _Shared:
    """The process-wide worker pool and the threads that serve grade_async (started on first use)."""

    pool: KillablePool
    threads: ThreadPoolExecutor


_shared_state: _Shared | None = None
_shared_lock = threading.Lock()


def pool_size() -> int:
    """Worker processes: MATHTOOL_GRADER_WORKERS, else one per core up to 4."""
    configured = os.environ.get("MATHTOOL_GRADER_WORKERS")
    return max(1, int(configured)) if configured else max(1, min(4, os.cpu_count() or 1))


def _shared() -> _Shared:
    global _shared_state
    with _shared_lock:
        if _shared_state is None:
            size = pool_size()
            pool = KillablePool(size, preload=("mathtool.grading.equivalence",))
            threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="mathtool-grade")
            _shared_state = _Shared(pool, threads)
        return _shared_state


def _forget_parent_state() -> None:
    """In a forked child: the parent's workers, threads and lock are not ours; start afresh on first use."""
    global _shared_state, _shared_lock
    _shared_state, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_state)
