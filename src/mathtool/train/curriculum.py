"""A generated curriculum for small models: integer arithmetic that the Python tool solves exactly.

Each problem asks the model to compute one sum, difference or product of small integers, after one
worked example of the two-turn exchange in the agent's tool-call format (a ```python block and the tool's
```output, or a Hermes <tool_call> and its <tool_response>; then the \\boxed{} answer), written in the
question; in Hermes format two more examples come first as finished conversations (`EXAMPLES`). Without the
example SmolLM2-135M writes code but boxes an answer in about 1 try of 64, so GRPO has no signal past
"use the tool"; with the markdown one, 48 of 64 tries run code, 10 box an answer and 4 are right
(measured on the embedded server at temperature 0.7), and learning has somewhere to start.

One expression in ten is held out (`held_out`, fixed by the expression alone): training never draws one,
whatever its seed or size, so that `heldout_problems` measures what a trained model does on problems it
never saw. A training run writes them to `heldout.jsonl` in its output directory, in its own prompt format.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from mathtool.agent.parsers import HERMES, MARKDOWN
from mathtool.data.problem import Problem, WorkedExample
from mathtool.errors import ConfigError
from mathtool.paths import atomic_write_text

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
# In Qwen3's format the model is also shown two exchanges as finished conversations before its problem:
# without them SmolLM2 answers the tool's response by echoing a <tool_response> (0 boxed answers in 16
# tries at temperature 1.0); with them 24 of 24 second turns box the tool's output, and 11 of 24 first
# turns call the tool at 1.0, 16 of 24 at 0.7 (transformers, embedded model).
EXAMPLES = {MARKDOWN: (), HERMES: tuple(
    WorkedExample(PROMPTS[HERMES].format(expression=e), f"print({e})", str(value), str(value))
    for e, value in (("7 * 8", 56), ("35 - 12", 23))
)}
HELDOUT_EVERY = 10  # one expression in this many is held out of training
HELDOUT_SIZE, HELDOUT_SEED = 100, 1  # the held-out split a training run writes


def held_out(expression: str) -> bool:
    return hashlib.sha256(expression.encode()).digest()[0] % HELDOUT_EVERY == 0


def _expressions() -> list[str]:
    expressions = []
    for op in _OPERATIONS:
        low, high = _SMALL if op == "*" else _LARGE
        expressions += [f"{a} {op} {b}" for a, b in itertools.product(range(low, high + 1), repeat=2)]
    return expressions


_SPLIT_SIZES = Counter(held_out(e) for e in _expressions())  # {True: held out, False: training}
MAX_PROBLEMS = _SPLIT_SIZES[False]  # in the training split


def arithmetic_problems(count: int, seed: int = 0, tool_format: str = MARKDOWN, heldout: bool = False) -> list[Problem]:
    """`count` distinct training problems (or held-out ones), the same for the same seed, each after the
    worked example in `tool_format`."""
    limit = _SPLIT_SIZES[heldout]
    if not 1 <= count <= limit:
        raise ConfigError(f"curriculum_size must be between 1 and {limit}")
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    prefix = "heldout" if heldout else "arith"
    while len(problems) < count:
        op = rng.choice(list(_OPERATIONS))
        low, high = _SMALL if op == "*" else _LARGE
        a, b = rng.randint(low, high), rng.randint(low, high)
        expression = f"{a} {op} {b}"
        text = PROMPTS[tool_format].format(expression=expression)
        if held_out(expression) == heldout and text not in problems:
            answer = str(_OPERATIONS[op](a, b))
            problems[text] = Problem(f"{prefix}-{len(problems):05d}", text, answer, source="arithmetic",
                                     examples=EXAMPLES[tool_format])
    return list(problems.values())


def heldout_problems(tool_format: str) -> list[Problem]:
    return arithmetic_problems(HELDOUT_SIZE, HELDOUT_SEED, tool_format, heldout=True)


def write_heldout(path: Path, tool_format: str) -> None:
    """The held-out split as a problem file that `mathtool eval --dataset` reads."""
    rows = [{"id": p.id, "problem": p.problem, "answer": p.answer} | _examples_field(p)
            for p in heldout_problems(tool_format)]
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _examples_field(problem: Problem) -> dict[str, list[dict[str, str]]]:
    return {"examples": [asdict(e) for e in problem.examples]} if problem.examples else {}
