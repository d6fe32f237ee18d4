"""The `python` tool as the model sees it: its OpenAI-style definition, and the text of a result."""

from __future__ import annotations

from mathtool.sandbox.base import RunResult

PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": (
            "Run Python 3 code and return what it prints. Variables and imports persist between calls in "
            "this conversation. numpy, sympy and the standard library are available; there is no network, "
            "and only /tmp is writable. The value of a final bare expression is printed too. "
            "Each call is limited in time and memory: prefer short, direct computations."
        ),
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
        },
    },
}

MAX_OUTPUT_CHARS = 4000  # of stdout, what the model is shown: printing in a loop gives a screenful, not a full context
MAX_ERROR_LINES = 12
MAX_ERROR_CHARS = 2000
NO_OUTPUT = "[No output. Use print() to see values.]"


def format_tool_result(result: RunResult) -> str:
    """stdout, then the tail of stderr (the traceback's last lines), then a marker if the run was stopped."""
    parts = [_head(result.stdout.rstrip("\n"))] if result.stdout.strip() else []
    stderr = _tail(result.stderr)
    if stderr:
        parts.append(stderr)
    if result.timed_out:
        parts.append(f"[Stopped: {result.error}]")
    elif not result.ok and result.error and result.error not in stderr:
        parts.append(f"[Error: {result.error}]")
    return "\n".join(parts) if parts else NO_OUTPUT


def _head(stdout: str) -> str:
    if len(stdout) <= MAX_OUTPUT_CHARS:
        return stdout
    return f"{stdout[:MAX_OUTPUT_CHARS]}\n[... {len(stdout) - MAX_OUTPUT_CHARS} more characters not shown ...]"


def _tail(stderr: str) -> str:
    lines = stderr.rstrip().splitlines()
    kept = "\n".join(lines[-MAX_ERROR_LINES:])
    trimmed = kept[-MAX_ERROR_CHARS:]
    if len(lines) > MAX_ERROR_LINES or len(trimmed) < len(kept):
        return f"[... earlier stderr lines omitted ...]\n{trimmed}"
    return trimmed
