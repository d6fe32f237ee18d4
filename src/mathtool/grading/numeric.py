"""Plain number literals and the one tolerance rule for decimals (no sympy: cheap enough for the parent).

A literal is an integer (`1000`, `1,000`, `1 000`, `1\\,000`), a decimal (`0.25`, `.5`), scientific
notation (`1e3`, `3.3333333e-06`: digits, e, digits is what Python prints, never 3 times Euler's number)
or a fraction of integers (`\\frac{1}{3}`, `-1/3`). A comma only ever groups thousands (`1,000`); it is
never a decimal separator: `1,2` is the list 1, 2.

The tolerance rule: a decimal with at least MIN_APPROXIMATE_DIGITS significant digits stands for every
value within one unit of its last digit (what it is, rounded or truncated to the places it shows); digits
past the 15th significant one, a double's precision, are float noise and are dropped first. Any other
literal (an integer of any length, a fraction, a shorter decimal) is exact. Two numbers are equal when they differ by
less than the coarser unit of the two, or exactly when both are exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MIN_APPROXIMATE_DIGITS = 6  # 0.333333 stands for 1/3; 0.33333 does not
FLOAT_DIGITS = 15  # digits a double holds: 0.30000000000000004 is 0.3
_MAX_EXPONENT_DIGITS = 4  # 1e9999 is a number; 1e99999999 is not worth building
_MAX_LITERAL_CHARS = 4000  # below Python's 4300-digit limit on int(str)

_GROUP = r"(?:,|\{,\}|\\,|\\ |~| )"  # thousands separators: 1,000  14{,}238  1\,000  1 000
_DECIMAL = re.compile(
    r"(?P<sign>[-+]?)\s*"
    rf"(?P<int>[1-9]\d{{0,2}}(?P<group>{_GROUP})\d{{3}}(?:(?P=group)\d{{3}})*|\d*)"
    r"(?:\.(?P<frac>\d*))?"
    rf"(?:[eE](?P<exp>[-+]?\d{{1,{_MAX_EXPONENT_DIGITS}}}))?"
)
_FRACTION = re.compile(
    r"(?P<sign>-?)\s*(?:\\[dtc]?frac\s*(?:\{\s*(?P<num>\d+)\s*\}|(?P<num1>\d))\s*(?:\{\s*(?P<den>\d+)\s*\}|(?P<den1>\d))"
    r"|(?P<snum>\d+)\s*/\s*(?P<sden>\d+))"
)


@dataclass(frozen=True)
class Literal:
    """A number as written: its value, and for an approximate decimal one unit of its last digit."""

    value: Fraction
    unit: Fraction | None = None  # None: exact
    decimal: bool = False  # written with a decimal point or an exponent


def read_literal(text: str) -> Literal | None:
    """The number `text` is, if it is nothing but a plain literal (surrounding spaces allowed); else None."""
    text = text.strip()
    if len(text) > _MAX_LITERAL_CHARS:
        return None
    match = _DECIMAL.fullmatch(text)
    if match and (match.group("int") or match.group("frac")):
        return _decimal(match)
    match = _FRACTION.fullmatch(text)
    if match is None:
        return None
    numerator = int(match.group("num") or match.group("num1") or match.group("snum"))
    denominator = int(match.group("den") or match.group("den1") or match.group("sden"))
    if denominator == 0:
        return None
    value = Fraction(numerator, denominator)
    return Literal(-value if match.group("sign") else value)


def ungroup_digits(text: str) -> str:
    """`1 000` -> `1000`, `-12\\,345.5` -> `-12345.5`: thousands separators out of a whole literal."""
    stripped = text.strip()
    match = _DECIMAL.fullmatch(stripped) if len(stripped) <= _MAX_LITERAL_CHARS else None
    if match is None or match.group("group") is None:
        return text
    return stripped.replace(match.group("group"), "")


def literals_match(a: Literal, b: Literal) -> bool:
    """The tolerance rule: within the coarser unit of the two, or exactly equal when both are exact."""
    units = [unit for unit in (a.unit, b.unit) if unit is not None]
    if not units:
        return a.value == b.value
    return abs(a.value - b.value) < max(units)


def _decimal(match: re.Match[str]) -> Literal:
    whole = re.sub(r"\D", "", match.group("int"))
    fraction = match.group("frac") or ""
    exponent = int(match.group("exp") or 0) - len(fraction)  # value = digits * 10**exponent
    digits = (whole + fraction).lstrip("0")
    written_as_decimal = match.group("frac") is not None or match.group("exp") is not None
    if written_as_decimal and len(digits) > FLOAT_DIGITS:
        drop = len(digits) - FLOAT_DIGITS
        digits = str(round(Fraction(int(digits), 10**drop)))
        exponent += drop
    value = Fraction(int(digits or "0")) * Fraction(10) ** exponent
    if match.group("sign") == "-":
        value = -value
    approximate = written_as_decimal and len(digits) >= MIN_APPROXIMATE_DIGITS
    unit = Fraction(10) ** exponent if approximate else None
    return Literal(value, unit, written_as_decimal)
