"""Tool-call parsers: Hermes `<tool_call>{json}</tool_call>` and markdown ```python blocks.

A parser never raises on model output: a malformed call becomes a `ToolCall` with `error` set, which
the loop answers with an error message so the model can correct itself. Only calls after the reasoning
count: after the last `</think>`; a turn whose `<think>` is never closed has no calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

HERMES = "hermes"
MARKDOWN = "markdown"
TOOL_FORMATS = (HERMES, MARKDOWN)

OUTPUT_FENCE = "```output"  # how the tool's result begins in the markdown format; only the tool writes it
TOOL_RESPONSE = "<tool_response>"  # the same in the Hermes format
# What only the tool writes: a model that writes it is making a tool's output up; its turn ends before it.
TOOL_OUTPUT_START = {MARKDOWN: OUTPUT_FENCE, HERMES: TOOL_RESPONSE}
_HERMES_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_MARKDOWN_RE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    code: str | None  # the code to run; None when the call is malformed
    end: int  # offset in the text just after the call
    error: str | None = None  # why the call could not be understood
    call_id: str | None = None  # the server's id for a call it parsed (chat path)


def _after_think(text: str) -> int:
    """Offset where the part after the reasoning begins: after the last </think>; the end of the text when
    a <think> is never closed; else 0."""
    cut = text.rfind("</think>")
    if cut >= 0:
        return cut + len("</think>")
    return len(text) if "<think>" in text else 0


def after_reasoning(text: str) -> str:
    """The part of a turn after its reasoning, where tool calls and the final answer count."""
    return text[_after_think(text) :]


def _hermes_call(body: str, end: int) -> ToolCall:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError as e:
        return ToolCall(None, end, f"tool call is not valid JSON ({e.msg})")
    return _python_call(call, end)


def _python_call(call: Any, end: int, call_id: str | None = None) -> ToolCall:
    """The python tool's code from a call {"name": "python", "arguments": {"code": ...}}."""
    if not isinstance(call, dict) or call.get("name") != "python":
        return ToolCall(None, end, 'unknown tool; the only tool is "python"', call_id)
    args = call.get("arguments")
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = None
    code = args.get("code") if isinstance(args, dict) else None
    if not isinstance(code, str) or not code.strip():
        return ToolCall(None, end, 'the python tool needs {"code": "<python source>"} as its arguments', call_id)
    return ToolCall(code, end, call_id=call_id)


def parse_server_tool_calls(tool_calls: list[dict], end: int) -> list[ToolCall]:
    """Calls a server parsed out of the model's text (OpenAI `message.tool_calls`); `end` is the text's length."""
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        call_id = call.get("id") if isinstance(call, dict) else None
        calls.append(_python_call(function, end, call_id if isinstance(call_id, str) else None))
    return calls


def parse_hermes(text: str) -> list[ToolCall]:
    start = _after_think(text)
    return [_hermes_call(m.group(1), m.end()) for m in _HERMES_RE.finditer(text, start)]


def parse_markdown(text: str) -> list[ToolCall]:
    start = _after_think(text)
    return [ToolCall(m.group(1), m.end()) for m in _MARKDOWN_RE.finditer(text, start) if m.group(1).strip()]


def turn_end(text: str, tool_format: str) -> int:
    """Where the model's turn really ends. A model that writes the tool's output itself (```output in the
    markdown format, <tool_response> in Hermes) after a tool call is making the output up: its turn ends
    with that call, so the tool can run it and answer. Otherwise: len(text)."""
    fence = text.find(TOOL_OUTPUT_START[tool_format], _after_think(text))
    calls = parse_tool_calls(text[:fence], tool_format) if fence >= 0 else []
    return calls[-1].end if calls else len(text)


PARSERS = {HERMES: parse_hermes, MARKDOWN: parse_markdown}


def parse_tool_calls(text: str, tool_format: str) -> list[ToolCall]:
    return PARSERS[tool_format](text)
