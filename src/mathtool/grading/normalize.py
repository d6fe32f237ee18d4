"""Answer clean-ups for what math-verify 0.9.0 gets wrong, and the cheap verdicts that need no sympy.

Each rule here has a test case in tests/test_grading.py that fails without it:
- a multiple-choice label before the value, `\\textbf{(B)}\\ 7`, parses as the product b*7;
- a number in a text wrapper with parentheses, `\\textbf{(025)}`, stays a text symbol;
- a unit word inside a text wrapper, `\\text{245 yd.}`, or in a plain ground truth `245 yd.`, is not a number;
- a trailing full stop, `7.`, makes the whole answer unparseable;
- a braced minus, `{-}13.5`, and sizing commands, `\\Big[1,2\\Big]`, are not understood;
- when the ground truth is a choice letter, `\\textbf{(C)}\\ 28` is graded on its letter;
- an upright letter, `\\mathrm{e}`, `\\mathrm{i}`, `{\\rm e}`, stops the parse: it is the letter `e`, `i`;
- a function in a font or operator command, `\\operatorname{sin}`, `\\mathrm{ln}`, is not parsed: it is `\\sin`;
- digits grouped in thousands by spaces, `1 000`, `1\\,000`, read as a product: they are one number;
- a degree sign against radians: `x^\\circ` is `x\\pi/180` when the other side is written with `\\pi`
  (a bare number against a gold in degrees stays in degrees: `90` is right for `90^\\circ`).
"""

from __future__ import annotations

import re

from mathtool.grading.numeric import literals_match, read_literal, ungroup_digits

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
_FONT_LETTER = re.compile(r"\\(?:mathrm|mathit|operatorname)\s*\{\s*([A-Za-z])\s*\}|\{\s*\\rm\s+([A-Za-z])\s*\}")
_FUNCTIONS = "sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|arccot|arcsec|arccsc|sinh|cosh|tanh|ln|log|exp|max|min|Re|Im"
_FONT_FUNCTION = re.compile(r"\\(?:mathrm|operatorname)\s*\{\s*(" + _FUNCTIONS + r")\s*\}")
_DEGREES = re.compile(r"^(-?\d+(?:\.\d+)?)\s*(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b)$")
_PI = re.compile(r"\\pi(?![A-Za-z])")
_MISSING = {"", "nan"}


def normalize_gold(ground_truth: str | int | float) -> str:
    """The ground truth as clean LaTeX: delimiters, trailing stops and `245 yd.`-style units removed."""
    text = _strip(str(ground_truth))
    text, _ = _unwrap_number_text(text)
    return _drop_unit_word(text)


def is_missing(gold: str) -> bool:
    """True for a normalized ground truth that is no label at all: empty, or NaN (pandas' missing value)."""
    return gold.strip().lower() in _MISSING


def normalize_answer(answer: str, gold: str) -> str:
    """A boxed answer cleaned up for comparison with the (normalized) ground truth `gold`."""
    text = _strip(answer)
    if choice_letter(gold) is None:
        text = _drop_choice_label(text)
    text, from_text = _unwrap_number_text(text)
    return _drop_unit_word(text) if from_text else text


def align_angle_units(answer: str, gold: str) -> tuple[str, str]:
    """(answer, gold) with a degree measure `x^\\circ` rewritten in radians where the other side has `\\pi`."""
    return _in_radians(gold, answer), _in_radians(answer, gold)


def quick_verdict(answer: str, gold: str) -> bool | None:
    """True/False when no sympy is needed (same string, choice letters, two number literals); else None."""
    if answer == gold:
        return True
    gold_letter = choice_letter(gold)
    if gold_letter is not None:
        return gold_letter == (_choice_label(answer) or choice_letter(answer))
    answer_number, gold_number = read_literal(answer), read_literal(gold)
    if answer_number is not None and gold_number is not None:  # AIME zero padding: "025" == "25"
        return literals_match(answer_number, gold_number)
    return None


def choice_letter(text: str) -> str | None:
    """The letter for `C`, `(C)`, `\\text{(C)}`, `\\textbf{C}`; else None."""
    wrapped = _TEXT_WRAPPER.match(text)
    match = _CHOICE_ONLY.match((wrapped.group(1) if wrapped else text).strip())
    return match.group(1) if match else None


def _in_radians(other: str, text: str) -> str:
    """`text` in radians if it is a bare degree measure and `other` is written with \\pi; else unchanged."""
    degrees = _DEGREES.match(text)
    if degrees is None or not _PI.search(other) or _DEGREES.match(other):
        return text
    return f"\\frac{{{degrees.group(1)}\\pi}}{{180}}"


def _plain_letters(text: str) -> str:
    """`\\mathrm{e}` -> `e`, `{\\rm i}` -> `i`, `\\operatorname{sin}` -> `\\sin`."""
    text = _FONT_LETTER.sub(lambda m: m.group(1) or m.group(2), text)
    return _FONT_FUNCTION.sub(r"\\\1", text)


def _strip(text: str) -> str:
    text = _plain_letters(_SIZING.sub("", _BRACED_MINUS.sub("-", text))).strip()
    for delimiters in (_DOLLARS, _DISPLAY):
        match = delimiters.match(text)
        if match:
            text = match.group(1).strip()
    stripped = _TRAILING_JUNK.sub("", text)
    return ungroup_digits(stripped or text)


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
