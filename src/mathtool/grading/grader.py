"""grade(): extract the final answer, compare it with the ground truth, say why; bounded and thread-safe.

Decided in the calling process, with no sympy and no waiting for a worker: answers that are the gold
string itself, number literals (integers, decimals, `1e3`, `\\frac{a}{b}`), choice letters, a missing
ground truth (empty or NaN: pandas' missing value; no answer is right, and NaN is not equal to NaN) and
answers past MAX_ANSWER_CHARS (wrong unless the very gold string: an exact match needs no parsing). The
rest goes to a worker process; the pool grows while its workers are held by slow comparisons, so that
cheap answers do not queue behind adversarial ones.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mathtool.grading.equivalence import check_equivalence
from mathtool.grading.extract import MAX_ANSWER_CHARS, TOO_LONG, find_final_answer
from mathtool.grading.normalize import align_angle_units, is_missing, normalize_answer, normalize_gold, quick_verdict
from mathtool.grading.pool import KillablePool, WorkerError, WorkerTimeout

logger = logging.getLogger(__name__)

EQUIVALENT = "equivalent"
NOT_EQUIVALENT = "not equivalent"
TIMEOUT = "timeout"
GRADER_ERROR = "grader error"
MISSING_GOLD = "missing ground truth"

DEFAULT_TIMEOUT_S = 5.0
KILL_GRACE_S = 0.5  # the worker's own timer fires at timeout_s; the parent kills it this much later
WAIT_FOR_WORKER_S = 600.0  # bound on queueing for a free worker (each use of one is itself bounded)
GROWTH = 2  # up to GROWTH x pool_size() workers, the extra ones running only while slow comparisons run


@dataclass(frozen=True)
class GradeResult:
    """What was graded and how: `reason` is one of the module's reason strings or an extraction failure."""

    extracted: str | None
    correct: bool
    reason: str


def is_correct(response: str, ground_truth: str | int | float) -> bool:
    """True if the final \\boxed{} answer of `response` is mathematically equal to `ground_truth`."""
    return grade(response, ground_truth).correct


def grade(response: str, ground_truth: str | int | float, timeout_s: float = DEFAULT_TIMEOUT_S) -> GradeResult:
    """Grade the last boxed answer of `response`; whatever is not decided within `timeout_s` is wrong."""
    _check_timeout(timeout_s)
    prepared = _prepare(response, ground_truth)
    return prepared if isinstance(prepared, GradeResult) else _compare(prepared, timeout_s)


async def grade_async(
    response: str, ground_truth: str | int | float, timeout_s: float = DEFAULT_TIMEOUT_S
) -> GradeResult:
    """grade() for asyncio: what needs no worker is decided at once; the rest waits on a grader thread."""
    _check_timeout(timeout_s)
    prepared = _prepare(response, ground_truth)  # string work, linear in the response: no blocking wait
    if isinstance(prepared, GradeResult):
        return prepared
    call = functools.partial(_compare, prepared, timeout_s)
    return await asyncio.get_running_loop().run_in_executor(_shared().threads, call)


@dataclass(frozen=True)
class _Pending:
    """An answer that needs math-verify: what was extracted, and both sides normalized."""

    extracted: str
    answer: str
    gold: str


def _check_timeout(timeout_s: float) -> None:
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")


def _prepare(response: str, ground_truth: str | int | float) -> GradeResult | _Pending:
    """The verdict if no worker is needed, else what the worker is to compare."""
    gold = normalize_gold(ground_truth)
    if is_missing(gold):
        logger.warning("ground truth %r is missing: graded wrong", ground_truth)
        return GradeResult(find_final_answer(response)[0], False, MISSING_GOLD)
    extracted, why_none = find_final_answer(response, max(MAX_ANSWER_CHARS, len(gold)))
    if extracted is None:
        return GradeResult(None, False, why_none)
    return _judge(extracted, gold)


def same_answer(reference: str, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """Whether two final answers (contents of \\boxed{}) are one value by grade()'s rules, with `reference`
    in the place of the ground truth: `\\frac{1}{2}` and `0.5` are one answer. None: not decided within
    `timeout_s` (or the grader failed)."""
    _check_timeout(timeout_s)
    gold = normalize_gold(reference)
    if is_missing(gold):
        return None
    prepared = _judge(answer, gold)
    result = prepared if isinstance(prepared, GradeResult) else _compare(prepared, timeout_s)
    return None if result.reason in (TIMEOUT, GRADER_ERROR) else result.correct


def _judge(extracted: str, gold: str) -> GradeResult | _Pending:
    """The verdict on an extracted answer against a normalized gold if no worker is needed, else the work."""
    if len(extracted) > MAX_ANSWER_CHARS:  # only ever compared as a string: no parsing
        return GradeResult(extracted, extracted == gold, EQUIVALENT if extracted == gold else TOO_LONG)
    answer, gold = align_angle_units(normalize_answer(extracted, gold), gold)
    verdict = quick_verdict(answer, gold)
    if verdict is not None:
        return GradeResult(extracted, verdict, _reason(verdict))
    return _Pending(extracted, answer, gold)


def _compare(pending: _Pending, timeout_s: float) -> GradeResult:
    reason = _compare_in_worker(pending.gold, pending.answer, timeout_s)
    return GradeResult(pending.extracted, reason == EQUIVALENT, reason)


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


def start_workers(timeout_s: float = 300.0) -> None:
    """Start all grader workers now (else they start on first use), waiting up to `timeout_s` for them."""
    _shared().pool.start_all(timeout_s)


def pool_size() -> int:
    """Worker processes for fast comparisons: MATHTOOL_GRADER_WORKERS, else one per core up to 4.

    The pool may hold up to GROWTH times as many while slow comparisons hold its workers.
    """
    configured = os.environ.get("MATHTOOL_GRADER_WORKERS")
    return max(1, int(configured)) if configured else max(1, min(4, os.cpu_count() or 1))


def _shared() -> _Shared:
    global _shared_state
    with _shared_lock:
        if _shared_state is None:
            size = pool_size()
            pool = KillablePool(size, preload=("mathtool.grading.equivalence:warm_up",), max_size=GROWTH * size)
            threads = ThreadPoolExecutor(max_workers=pool.max_size, thread_name_prefix="mathtool-grade")
            _shared_state = _Shared(pool, threads)
        return _shared_state


def _forget_parent_state() -> None:
    """In a forked child: the parent's workers, threads and lock are not ours; start afresh on first use."""
    global _shared_state, _shared_lock
    _shared_state, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_state)
