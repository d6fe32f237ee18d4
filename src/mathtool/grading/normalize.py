"""Answer clean-ups for what math-verify 0.9.0 gets wrong, and the cheap verdicts that need no sympy.

Each rule here has a test case in tests/test_grading.py that fails without it:
- a multiple-choice label before the value, `\\textbf{(B)}\\ 7`, parses as the product b*7;
- a number in a text wrapper with parentheses, `\\textbf{(025)}`, stays a text symbol;
- a unit word inside a text wrapper, `\\text{245 yd.}`, or in a plain ground truth `245 yd.`, is not a number;
- a trailing full stop, `7.`, makes the whole answer unparseable;
- a braced minus, `{-}13.5`, and sizing commands, `\\Big[1,2\\Big]`, are not understood;
- when the ground truth is a choice letter, `\\textbf{(C)}\\ 28` is graded on its letter.
"""

from __future__ import annotations

import re

_SPACING = r"(?:\s|~|\\[,;:! ]|\\q?quad\b)*"
_TEXT_COMMAND = r"\\(?:text|textbf|textnormal|textrm|mathrm|mathbf|mbox)\s*"
_DOLLARS = re.compile(r"^\$+(.*?)\$+$", re.DOTALL)
_DISPLAY = re.compile(r"^\\[(\[](.*?)\\[)\]]$", re.DOTALL)
_TRAILING_JUNK = re.compile(r"(?:\s|~|\\[,;:! ]|\\q?quad\b|[.,;])+$")
_TEXT_WRAPPER = re.compile(_TEXT_COMMAND + r"\{(.*)\}$", re.DOTALL)
_LETTER_IN_PARENS = r"\(\s*([A-Z])\s*\)"
_CHOICE_LABEL = re.compile(  # \textbf{(B)}  \mathrm{(B)\ }  (\text{B})  (B)  -- then any spacing
    r"^(?:" + _TEXT_COMMAND + r"\{\s*" + _LETTER_IN_PARENS + _SPACING + r"\}"
    r"|\(\s*" + _TEXT_COMMAND + r"\{\s*([A-Z])\s*\}\s*\)"
    r"|" + _LETTER_IN_PARENS + r")" + _SPACING
)
_BRACED_MINUS = re.compile(r"\{\s*-\s*\}")
_SIZING = re.compile(r"\\(?:big|Big|bigg|Bigg)[lrm]?(?![A-Za-z])")
_CHOICE_ONLY = re.compile(r"^\(?\s*([A-Z])\s*\)?$")
_PAREN_NUMBER = re.compile(r"^\((-?\d+(?:\.\d+)?)\)$")
_NUMBER_AND_UNIT = re.compile(r"^(-?\d+(?:\.\d+)?)\s+[A-Za-z]{2,}\.?$")
_INTEGER = re.compile(r"^[-+]?\d+$")


def normalize_gold(ground_truth: str | int) -> str:
    """The ground truth as clean LaTeX: delimiters, trailing stops and `245 yd.`-style units removed."""
    text = _strip(str(ground_truth))
    text, _ = _unwrap_number_text(text)
    return _drop_unit_word(text)


def normalize_answer(answer: str, gold: str) -> str:
    """A boxed answer cleaned up for comparison with the (normalized) ground truth `gold`."""
    text = _strip(answer)
    if choice_letter(gold) is None:
        text = _drop_choice_label(text)
    text, from_text = _unwrap_number_text(text)
    return _drop_unit_word(text) if from_text else text


def quick_verdict(answer: str, gold: str) -> bool | None:
    """True/False when no sympy is needed (same string, two integers, choice letters); else None."""
    if answer == gold:
        return True
    if _INTEGER.match(answer) and _INTEGER.match(gold):
        return int(answer) == int(gold)  # AIME zero padding: "025" == "25"
    gold_letter = choice_letter(gold)
    if gold_letter is not None:
        return gold_letter == (_choice_label(answer) or choice_letter(answer))
    return None


def choice_letter(text: str) -> str | None:
    """The letter for `C`, `(C)`, `\\text{(C)}`, `\\textbf{C}`; else None."""
    wrapped = _TEXT_WRAPPER.match(text)
    match = _CHOICE_ONLY.match((wrapped.group(1) if wrapped else text).strip())
    return match.group(1) if match else None


def _strip(text: str) -> str:
    text = _SIZING.sub("", _BRACED_MINUS.sub("-", text)).strip()
    for delimiters in (_DOLLARS, _DISPLAY):
        match = delimiters.match(text)
        if match:
            text = match.group(1).strip()
    stripped = _TRAILING_JUNK.sub("", text)
    return stripped or text


def _choice_label(text: str) -> str | None:
    match = _CHOICE_LABEL.match(_open_labelled_wrapper(text))
    return next(letter for letter in match.groups() if letter) if match else None


def _drop_choice_label(text: str) -> str:
    """`\\textbf{(B)}\\ 7` and `\\textbf{(B) 7}` -> `7`; a bare label is left as it is."""
    opened = _open_labelled_wrapper(text)
    match = _CHOICE_LABEL.match(opened)
    rest = opened[match.end() :].strip() if match else ""
    return rest or text


def _open_labelled_wrapper(text: str) -> str:
    """`\\textbf{(E) 24}` -> `(E) 24`; anything else unchanged."""
    match = _TEXT_WRAPPER.match(text)
    if match and _balanced(match.group(1)) and _CHOICE_LABEL.match(match.group(1).strip()):
        return match.group(1).strip()
    return text


def _unwrap_number_text(text: str) -> tuple[str, bool]:
    """`\\textbf{(025)}` -> `025`, `\\text{245 yd.}` -> `245 yd`; only when the text starts like a number."""
    match = _TEXT_WRAPPER.match(text)
    if not match or not _balanced(match.group(1)):
        return text, False
    inner = _strip(match.group(1))
    if not re.match(r"^\(?-?\d", inner):
        return text, False
    number = _PAREN_NUMBER.match(inner)
    return (number.group(1) if number else inner), True


def _drop_unit_word(text: str) -> str:
    match = _NUMBER_AND_UNIT.match(text)
    return match.group(1) if match else text


def _balanced(text: str) -> bool:
    """True if `text` never closes a brace it did not open (so a wrapper's braces enclose all of it)."""
    depth = 0
    for char in re.sub(r"\\.", "", text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0
