"""The messages an agent starts from, for each tool-call format."""

from __future__ import annotations

import json

from mathtool.agent.parsers import HERMES
from mathtool.data.problem import Problem, WorkedExample

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
    """The system turn, the problem's worked examples as finished conversations, then the problem."""
    system = HERMES_SYSTEM if tool_format == HERMES else MARKDOWN_SYSTEM
    messages = [{"role": "system", "content": system}]
    for example in problem.examples:
        messages += worked_example_messages(example, tool_format)
    return [*messages, {"role": "user", "content": problem.problem}]


MESSAGES_PER_EXAMPLE = 4  # what worked_example_messages returns: question, call, tool output, answer


def worked_example_messages(example: WorkedExample, tool_format: str) -> list[dict[str, str]]:
    """A worked example as the turns the model would write in `tool_format`: the call as text, like the
    model's own turns are recorded, so that the template renders it as the model would have written it."""
    if tool_format == HERMES:
        call = json.dumps({"name": "python", "arguments": {"code": example.code}}, ensure_ascii=False)
        turn = f"<tool_call>\n{call}\n</tool_call>"
    else:
        turn = f"```python\n{example.code}\n```"
    return [{"role": "user", "content": example.question}, {"role": "assistant", "content": turn},
            tool_result_message(example.output, tool_format),
            {"role": "assistant", "content": f"\\boxed{{{example.answer}}}"}]


def tool_result_message(text: str, tool_format: str, call_id: str | None = None) -> dict[str, str]:
    """How a tool's output goes back to the model: a `tool` message (answering the server's tool-call id
    on the chat path), or a user ```output block."""
    if tool_format == HERMES:
        return {"role": "tool", "content": text} | ({"tool_call_id": call_id} if call_id else {})
    return {"role": "user", "content": f"```output\n{text}\n```"}
