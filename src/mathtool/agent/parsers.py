"""Tool-call parsers: Hermes `<tool_call>{json}</tool_call>` and markdown ```python blocks.

A parser never raises on model output: a malformed call becomes a `ToolCall` with `error` set, which
the loop answers with an error message so the model can correct itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

HERMES = "hermes"
MARKDOWN = "markdown"
TOOL_FORMATS = (HERMES, MARKDOWN)

OUTPUT_FENCE = "```output"  # how the tool's result begins in the markdown format; only the tool writes it
_HERMES_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_MARKDOWN_RE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    code: str | None  # the code to run; None when the call is malformed
    end: int  # offset in the text just after the call
    error: str | None = None  # why the call could not be understood


def _after_think(text: str) -> int:
    """Offset where the final answer part begins: after the last </think>, else 0."""
    cut = text.rfind("</think>")
    return cut + len("</think>") if cut >= 0 else 0


def _hermes_call(body: str, end: int) -> ToolCall:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError as e:
        return ToolCall(None, end, f"tool call is not valid JSON ({e.msg})")
    if not isinstance(call, dict) or call.get("name") != "python":
        return ToolCall(None, end, 'unknown tool; the only tool is "python"')
    args = call.get("arguments")
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = None
    code = args.get("code") if isinstance(args, dict) else None
    if not isinstance(code, str) or not code.strip():
        return ToolCall(None, end, 'the python tool needs {"code": "<python source>"} as its arguments')
    return ToolCall(code, end)


def parse_hermes(text: str) -> list[ToolCall]:
    start = _after_think(text)
    return [_hermes_call(m.group(1), m.end()) for m in _HERMES_RE.finditer(text, start)]


def parse_markdown(text: str) -> list[ToolCall]:
    start = _after_think(text)
    return [ToolCall(m.group(1), m.end()) for m in _MARKDOWN_RE.finditer(text, start) if m.group(1).strip()]


def turn_end(text: str, tool_format: str) -> int:
    """Where the model's turn really ends. In the markdown format a model that writes its own ```output
    block after a ```python block is making the output up: its turn ends with that python block, so the
    tool can run it and answer. Elsewhere: len(text)."""
    if tool_format != MARKDOWN:
        return len(text)
    fence = text.find(OUTPUT_FENCE, _after_think(text))
    calls = parse_markdown(text[:fence]) if fence >= 0 else []
    return calls[-1].end if calls else len(text)


PARSERS = {HERMES: parse_hermes, MARKDOWN: parse_markdown}


def parse_tool_calls(text: str, tool_format: str) -> list[ToolCall]:
    return PARSERS[tool_format](text)
