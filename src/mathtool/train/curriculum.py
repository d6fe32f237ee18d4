"""A generated curriculum for small models: integer arithmetic that the Python tool solves exactly.

Each problem asks the model to compute one sum, difference or product of small integers, after one
worked example of the two-turn exchange in the agent's tool-call format (a ```python block and the tool's
```output, or a Hermes <tool_call> and its <tool_response>; then the \\boxed{} answer). Without the
example SmolLM2-135M writes code but boxes an answer in about 1 try of 64, so GRPO has no signal past
"use the tool"; with the markdown one, 48 of 64 tries run code, 10 box an answer and 4 are right
(measured on the embedded server at temperature 0.7), and learning has somewhere to start.
"""

from __future__ import annotations

import random

from mathtool.agent.parsers import HERMES, MARKDOWN
from mathtool.data.problem import Problem
from mathtool.errors import ConfigError

_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_SMALL, _LARGE = (2, 12), (10, 60)  # operand ranges: products of small numbers, sums of larger ones
_CALL = '<tool_call>\n{{"name": "python", "arguments": {{"code": "print(7 * 8)"}}}}\n</tool_call>'  # for format()
PROMPTS = {  # the question, with a worked example in the tool-call format the agent uses
    MARKDOWN: (
        "Example. Question: compute 7 * 8.\nFirst reply:\n```python\nprint(7 * 8)\n```\n"
        "Tool output:\n```output\n56\n```\nSecond reply:\nThe answer is \\boxed{{56}}.\n\n"
        "Question: compute {expression}."
    ),
    # SmolLM2 writes a well-formed call about 4 times in 64 with this wording, none with the markdown one's
    HERMES: (
        "Question: compute {expression}.\nFirst call the python tool: reply with only a <tool_call> whose "
        "code prints the result, like this one for 7 * 8:\n" + _CALL + "\nAfter the tool's response, give the "
        "answer as \\boxed{{answer}}."
    ),
}
MAX_PROBLEMS = 2 * (_LARGE[1] - _LARGE[0] + 1) ** 2 + (_SMALL[1] - _SMALL[0] + 1) ** 2


def arithmetic_problems(count: int, seed: int = 0, tool_format: str = MARKDOWN) -> list[Problem]:
    """`count` distinct problems, the same for the same seed, each after the worked example in `tool_format`."""
    if not 1 <= count <= MAX_PROBLEMS:
        raise ConfigError(f"curriculum_size must be between 1 and {MAX_PROBLEMS}")
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    while len(problems) < count:
        op = rng.choice(list(_OPERATIONS))
        low, high = _SMALL if op == "*" else _LARGE
        a, b = rng.randint(low, high), rng.randint(low, high)
        text = PROMPTS[tool_format].format(expression=f"{a} {op} {b}")
        if text not in problems:
            answer = str(_OPERATIONS[op](a, b))
            problems[text] = Problem(f"arith-{len(problems):05d}", text, answer, source="arithmetic")
    return list(problems.values())
