"""The messages an agent starts from, for each tool-call format."""

from __future__ import annotations

from mathtool.agent.parsers import HERMES
from mathtool.data.problem import Problem

HERMES_SYSTEM = (
    "You are a careful mathematician. Reason step by step. You can run Python code with the `python` "
    "tool (numpy and sympy are available; print what you need to see). Use it to compute and to check "
    "your work. Give the final answer as \\boxed{answer}."
)

MARKDOWN_SYSTEM = (
    "You are a careful mathematician. Reason step by step. To run Python, write a block that starts "
    "with ```python and ends with ```; you will get its printed output back in an ```output block. "
    "numpy and sympy are available. Give the final answer as \\boxed{answer}."
)


def initial_messages(problem: Problem, tool_format: str) -> list[dict[str, str]]:
    system = HERMES_SYSTEM if tool_format == HERMES else MARKDOWN_SYSTEM
    return [{"role": "system", "content": system}, {"role": "user", "content": problem.problem}]


def tool_result_message(text: str, tool_format: str, call_id: str | None = None) -> dict[str, str]:
    """How a tool's output goes back to the model: a `tool` message (answering the server's tool-call id
    on the chat path), or a user ```output block."""
    if tool_format == HERMES:
        return {"role": "tool", "content": text} | ({"tool_call_id": call_id} if call_id else {})
    return {"role": "user", "content": f"```output\n{text}\n```"}
