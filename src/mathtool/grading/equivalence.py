"""The math-verify comparison, run inside a grader worker process (where SIGALRM works: main thread).

math-verify's own timeouts are switched off; one interval timer bounds the whole comparison instead.
A computation the timer cannot interrupt (a long C call) is the parent's outer timeout's to kill.

Where one side is a decimal literal (`0.3333333`, `1e3`) and the other evaluates to a real number
(`\\frac{1}{3}`, `1-\\frac{1}{e}`, `\\sqrt{2}`), the tolerance rule of numeric.py decides, not
math-verify (which rounds to 6 decimal places, and reads `1e3` as 3e).
"""

from __future__ import annotations

import logging
import signal
from fractions import Fraction
from types import FrameType

from math_verify import parse, verify
from sympy import Basic, N, Rational

from mathtool.grading.numeric import Literal, read_literal

# math-verify logs a whole input on its warnings, which can be megabytes: keep it quiet in workers.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)

_EXACT = Fraction(1, 10**40)  # how close to zero an exact comparison's 50-digit difference must be
_WARM_UP = [  # one comparison of each common kind: roots, polynomials, intervals, sets, equations, pi
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("(x-1)(x+1)", "x^2-1"),
    ("[-2,4]", "(-2,4)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("5", "x=5"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
]
WARM_UP_BUDGET_S = 30.0


def warm_up() -> None:
    """Pay sympy's first-use costs (a second or two on a busy box) at worker start, not in a grade's timeout."""
    for gold, answer in _WARM_UP:
        check_equivalence(gold, answer, WARM_UP_BUDGET_S)


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
    for text, other_text, other_parsed in ((answer, gold, gold_parsed), (gold, answer, answer_parsed)):
        verdict = _decimal_verdict(text, other_text, other_parsed)
        if verdict is not None:
            return verdict
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def _decimal_verdict(text: str, other_text: str, other_parsed: list[object]) -> bool | None:
    """The tolerance rule if `text` is a decimal literal and the other side a real number (no percentage)."""
    literal = read_literal(text)
    if literal is None or not literal.decimal or "%" in other_text or not other_parsed:
        return None
    return _compare(literal, other_parsed[0])


def _compare(literal: Literal, other: object) -> bool | None:
    if not isinstance(other, Basic) or not other.is_number:
        return None
    difference = N(other - _rational(literal.value), 50)
    if not difference.is_Number:  # a complex number
        return None
    bound = _EXACT if literal.unit is None else literal.unit
    return bool(abs(difference) < _rational(bound))


def _rational(value: Fraction) -> Rational:
    return Rational(value.numerator, value.denominator)


def _raise_out_of_time(signum: int, frame: FrameType | None) -> None:
    raise _OutOfTime
