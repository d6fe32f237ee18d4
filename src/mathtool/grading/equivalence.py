"""The math-verify comparison, run inside a grader worker process (where SIGALRM works: main thread).

math-verify's own timeouts are switched off; one interval timer bounds the whole comparison instead.
A computation the timer cannot interrupt (a long C call) is the parent's outer timeout's to kill.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from math_verify import parse, verify

# math-verify logs a whole input on its warnings, which can be megabytes: keep it quiet in workers.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)


class _OutOfTime(BaseException):
    """Raised by the interval timer; a BaseException so that math-verify's `except Exception` lets it by."""


def check_equivalence(gold: str, answer: str, budget_s: float) -> bool | None:
    """math-verify's verdict on `answer` against `gold` (both LaTeX), or None if it took over `budget_s`."""
    try:
        return _verify_with_timer(gold, answer, budget_s)
    except _OutOfTime:  # also catches a timer that fired just as the comparison finished
        return None


def _verify_with_timer(gold: str, answer: str, budget_s: float) -> bool:
    previous = signal.signal(signal.SIGALRM, _raise_out_of_time)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    try:
        return _verify(gold, answer)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _verify(gold: str, answer: str) -> bool:
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def _raise_out_of_time(signum: int, frame: FrameType | None) -> None:
    raise _OutOfTime
