"""Finding the final answer in a response: the last \\boxed{...} (or \\fbox{...}) after the last </think>.

Linear time in the response length, whatever it holds (megabytes, deep nesting, unclosed braces).
"""

from __future__ import annotations

import re

THINK_END = "</think>"
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_INLINE_END = re.compile(r"[\s$]")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


MAX_ANSWER_CHARS = 1000  # a longer "final answer" is not one; also bounds the scan for its closing brace

NO_BOX = "no boxed answer"
UNCLOSED = "unclosed boxed answer"
TOO_LONG = "answer too long"


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (also `\\boxed 5`), or None if there is none.

    Only the text after the last `</think>` counts. An unclosed, empty or overlong last box gives None:
    a response cut off inside its final answer has no answer, whatever it boxed before.
    """
    return find_final_answer(text)[0]


def find_final_answer(text: str) -> tuple[str | None, str]:
    """(answer, "") as extract_boxed finds it, or (None, why not): NO_BOX, UNCLOSED or TOO_LONG."""
    if THINK_END in text:
        text = text[text.rindex(THINK_END) + len(THINK_END) :]
    last = None
    for last in _BOX_COMMAND.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None, NO_BOX
    content, why = _argument(text, last.end())
    if content is None:
        return None, why
    content = content.strip()
    if not content:
        return None, NO_BOX
    if len(content) > MAX_ANSWER_CHARS:
        return None, TOO_LONG
    return content, ""


def _argument(text: str, start: int) -> tuple[str | None, str]:
    """The argument of a command that ends at `start`: a braced group, or in `\\boxed 5` the next word."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced_group(text, i)
    if i == start:  # "\boxed" directly followed by something that is neither "{" nor a space
        return None, NO_BOX
    end = _INLINE_END.search(text, i)
    return text[i : end.start() if end else len(text)], ""


def _braced_group(text: str, open_index: int) -> tuple[str | None, str]:
    """Content between the "{" at `open_index` and its matching "}"; escaped braces (\\{ \\}) skipped.

    Scans at most MAX_ANSWER_CHARS (+ a margin for the braces) so that megabytes cost nothing.
    """
    depth = 0
    scan_end = min(len(text), open_index + MAX_ANSWER_CHARS + 64)
    for token in _BRACE_OR_ESCAPE.finditer(text, open_index, scan_end):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : token.start()], ""
    return None, TOO_LONG if scan_end < len(text) else UNCLOSED
