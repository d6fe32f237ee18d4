"""Tool-call parsers on well-formed and malformed model output: never a crash."""

from __future__ import annotations

import json

import pytest

from mathtool.agent.parsers import HERMES, MARKDOWN, parse_server_tool_calls, parse_tool_calls, turn_end
from mathtool.sandbox.tool import PYTHON_TOOL


def test_hermes_call_is_parsed() -> None:
    text = 'Let me compute.\n<tool_call>\n{"name": "python", "arguments": {"code": "print(6*7)"}}\n</tool_call>'
    [call] = parse_tool_calls(text, HERMES)
    assert call.code == "print(6*7)" and call.error is None and call.end == len(text)


def test_a_call_written_from_the_tool_schema_runs_as_written() -> None:
    """The model writes its calls from the schema it reads (PYTHON_TOOL): a call with the schema's name and its
    one required parameter is run as written, from the text and as a server parses it; another name is not."""
    function = PYTHON_TOOL["function"]
    (parameter,) = function["parameters"]["required"]
    call = {"name": function["name"], "arguments": {parameter: "print(6 * 7)"}}
    text = f"<tool_call>{json.dumps(call)}</tool_call>"
    assert [(c.code, c.error) for c in parse_tool_calls(text, HERMES)] == [("print(6 * 7)", None)]
    parsed = {"id": "call-1", "type": "function", "function": {**call, "arguments": json.dumps(call["arguments"])}}
    assert [(c.code, c.call_id) for c in parse_server_tool_calls([parsed], len(text))] == [("print(6 * 7)", "call-1")]
    renamed = {**call, "arguments": {f"{parameter}_": "print(1)"}}
    assert parse_tool_calls(f"<tool_call>{json.dumps(renamed)}</tool_call>", HERMES)[0].code is None


def test_hermes_double_encoded_arguments() -> None:
    text = '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"x=1\\"}"}</tool_call>'
    assert parse_tool_calls(text, HERMES)[0].code == "x=1"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('{"name": "python", "arguments": {"code": "print(1)"', "not valid JSON"),
        ('{"name": "bash", "arguments": {"code": "ls"}}', "unknown tool"),
        ('{"name": "python", "arguments": {"src": "print(1)"}}', "needs"),
        ('{"name": "python", "arguments": {"code": "   "}}', "needs"),
        ("[1, 2]", "unknown tool"),
        ("", "not valid JSON"),
    ],
)
def test_malformed_hermes_calls_become_errors(body: str, error: str) -> None:
    [call] = parse_tool_calls(f"<tool_call>{body}</tool_call>", HERMES)
    assert call.code is None and error in call.error


def test_unclosed_hermes_call_at_end_of_text_is_still_read() -> None:
    [call] = parse_tool_calls('<tool_call>{"name": "python", "arguments": {"code": "1"}}', HERMES)
    assert call.code == "1"


def test_calls_inside_thinking_are_ignored() -> None:
    text = "<think>maybe ```python\nprint(1)\n``` no</think>\nNow:\n```python\nprint(2)\n```\n"
    assert [c.code for c in parse_tool_calls(text, MARKDOWN)] == ["print(2)\n"]
    think = '<think><tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call></think>done'
    assert parse_tool_calls(think, HERMES) == []


def test_markdown_blocks() -> None:
    text = "```python\nx = 1\n```\ntext\n```py\nprint(x)\n```\n```\nnot python\n```\n```python\n```"
    calls = parse_tool_calls(text, MARKDOWN)
    assert [c.code for c in calls] == ["x = 1\n", "print(x)\n"]
    assert text[calls[-1].end - 3 : calls[-1].end] == "```"


def test_unterminated_markdown_block_is_not_run() -> None:
    assert parse_tool_calls("```python\nwhile True: pass", MARKDOWN) == []


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        # the model makes up the output (and an answer from it): the turn ends with its code
        ("Hm.\n```python\nprint(6 * 9)\n```\n```output\n56\n```\n\\boxed{56}", "Hm.\n```python\nprint(6 * 9)\n```"),
        ("```python\nx=1\n```\n```py\nprint(x)\n```\n\n```output\n1\n```", "```python\nx=1\n```\n```py\nprint(x)\n```"),
        # nothing to cut: no output block, no code before it, or a thinking model's draft
        ("```python\nprint(1)\n```\nThen \\boxed{1}.", None),
        ("```output\n3\n```\nso \\boxed{3}", None),
        ("<think>```python\nprint(2)\n```\n```output\n2\n```</think>\\boxed{2}", None),
        ("```python\ns = '```output'\n", None),
    ],
)
def test_a_turn_ends_where_the_model_starts_to_write_the_output_itself(text: str, kept: str | None) -> None:
    assert text[: turn_end(text, MARKDOWN)] == (text if kept is None else kept)
    assert turn_end(text, HERMES) == len(text)
