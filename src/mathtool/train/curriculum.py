"""A generated curriculum for small models: integer arithmetic that the Python tool solves exactly.

Each problem asks the model to compute one sum, difference or product of small integers with Python
and to give the answer in \\boxed{}. A 135M model already writes a ```python block for most of them
but rarely finishes the job; GRPO teaches it to run a short block, read the output and box it.
"""

from __future__ import annotations

import random

from mathtool.data.problem import Problem
from mathtool.errors import ConfigError

_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_SMALL, _LARGE = (2, 12), (10, 60)  # operand ranges: products of small numbers, sums of larger ones
MAX_PROBLEMS = 2 * (_LARGE[1] - _LARGE[0] + 1) ** 2 + (_SMALL[1] - _SMALL[0] + 1) ** 2


def arithmetic_problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems, the same for the same seed."""
    if not 1 <= count <= MAX_PROBLEMS:
        raise ConfigError(f"curriculum_size must be between 1 and {MAX_PROBLEMS}")
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    while len(problems) < count:
        op = rng.choice(list(_OPERATIONS))
        low, high = _SMALL if op == "*" else _LARGE
        a, b = rng.randint(low, high), rng.randint(low, high)
        text = f"Use Python to compute {a} {op} {b}, then give the final answer as \\boxed{{}}."
        if text not in problems:
            answer = str(_OPERATIONS[op](a, b))
            problems[text] = Problem(f"arith-{len(problems):05d}", text, answer, source="arithmetic")
    return list(problems.values())
