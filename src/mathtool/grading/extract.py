"""Finding the final answer in a response: the last \\boxed{...} (or \\fbox{...}) after the last </think>.

Several boxes joined only by list separators (`\\boxed{1}, \\boxed{2} and \\boxed{3}`; commas,
semicolons, "and", "or", with spacing, `$` or `\\text{}` around them) are one answer, the list of their
contents, `1, 2, 3`: graded as a list, it matches a list-valued ground truth and never a single value,
so boxing candidates earns nothing. Boxes parted by any other text are earlier work: the last one counts.

Linear time in the response length, whatever it holds (megabytes, deep nesting, unclosed braces).
"""

from __future__ import annotations

import re
from collections import deque

THINK_END = "</think>"
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_INLINE_END = re.compile(r"[\s$]")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


MAX_ANSWER_CHARS = 1000  # a longer "final answer" is not one; also bounds the scan for its closing brace
MAX_LISTED_BOXES = 10
_MAX_SEPARATOR_CHARS = 80
_FILLER = r"(?:\s|~|\$|\\[()\[\],;:! ]|\\q?quad(?![A-Za-z]))*"
_WORD = r"(?:,|;|(?:,\s*)?(?:and|or))"
_LIST_SEPARATOR = re.compile(
    rf"{_FILLER}(?:{_WORD}|\\(?:text|textrm|mathrm|mbox)\s*\{{{_FILLER}{_WORD}{_FILLER}\}}){_FILLER}"
)

NO_BOX = "no boxed answer"
UNCLOSED = "unclosed boxed answer"
TOO_LONG = "answer too long"


def extract_boxed(text: str) -> str | None:
    """The final answer: the last \\boxed{...} or \\fbox{...} (also `\\boxed 5`), or None if there is none.

    Only the text after the last `</think>` counts. An unclosed, empty or overlong last box gives None:
    a response cut off inside its final answer has no answer, whatever it boxed before. A list of boxes
    gives their contents joined by ", ".
    """
    return find_final_answer(text)[0]


def find_final_answer(text: str, max_chars: int = MAX_ANSWER_CHARS) -> tuple[str | None, str]:
    """(answer, "") as extract_boxed finds it, or (None, why not): NO_BOX, UNCLOSED or TOO_LONG.

    `max_chars` bounds the answer (and the scan for its closing brace).
    """
    if THINK_END in text:
        text = text[text.rindex(THINK_END) + len(THINK_END) :]
    boxes = deque(_BOX_COMMAND.finditer(text), maxlen=MAX_LISTED_BOXES)
    if not boxes:
        return None, NO_BOX
    last = boxes.pop()
    content, why, _ = _argument(text, last.end(), max_chars)
    if content is None:
        return None, why
    if not content.strip():
        return None, NO_BOX
    parts = [content.strip()]
    next_start = last.start()
    while boxes:  # earlier boxes joined to the last one by list separators only
        box = boxes.pop()
        earlier, _, end = _argument(text, box.end(), max_chars)
        if earlier is None or not earlier.strip() or not _separates(text, end, next_start):
            break
        parts.insert(0, earlier.strip())
        next_start = box.start()
    answer = ", ".join(parts)
    if len(answer) > max_chars:
        return None, TOO_LONG
    return answer, ""


def _separates(text: str, start: int, end: int) -> bool:
    """True if text[start:end] is a list separator (`, `, ` and `, `$, $`, `\\quad\\text{or}\\quad`)."""
    return 0 < end - start <= _MAX_SEPARATOR_CHARS and _LIST_SEPARATOR.fullmatch(text, start, end) is not None


def _argument(text: str, start: int, max_chars: int) -> tuple[str | None, str, int]:
    """(argument, why not, end) of a command that ends at `start`: a braced group or the next word."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced_group(text, i, max_chars)
    if i == start:  # "\boxed" directly followed by something that is neither "{" nor a space
        return None, NO_BOX, start
    end = _INLINE_END.search(text, i)
    end_index = end.start() if end else len(text)
    return text[i:end_index], "", end_index


def _braced_group(text: str, open_index: int, max_chars: int) -> tuple[str | None, str, int]:
    """(content, why not, end) of the group opened by the "{" at `open_index`; `\\{ \\}` skipped.

    Scans at most `max_chars` (+ a margin for the braces) so that megabytes cost nothing.
    """
    depth = 0
    scan_end = min(len(text), open_index + max_chars + 64)
    for token in _BRACE_OR_ESCAPE.finditer(text, open_index, scan_end):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : token.start()], "", token.end()
    return None, TOO_LONG if scan_end < len(text) else UNCLOSED, scan_end
