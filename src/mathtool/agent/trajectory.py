"""The Trajectory: everything one agent run produced; the seam between evaluation and training."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mathtool.run_record import ERROR


@dataclass
class Trajectory:
    problem_id: str
    sample: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    worked_examples: int = 0  # Problem.examples shown after the system turn (prompts.MESSAGES_PER_EXAMPLE each)
    termination: str = ERROR  # why it ended: one of the names in `mathtool.run_record`
    error: str | None = None
    num_tool_calls: int = 0
    num_turns: int = 0
    void_turns: int = 0  # model turns that ended with neither a runnable tool call nor a final answer
    response_tokens: int = 0  # model-generated tokens, all turns
    correct: bool = False  # the final answer was graded equal to the ground truth (training's reward is another)
    extracted_answer: str | None = None
    ground_truth: str = ""
    # Token-exact record (present when the backend returns token ids):
    prompt_ids: list[int] | None = None  # the first prompt, rendered with the chat template
    completion_ids: list[int] | None = None  # everything after it: model tokens and tool/template tokens
    completion_mask: list[int] | None = None  # 1 on model-generated tokens, 0 elsewhere
    logprobs: list[float] | None = None  # one per completion id (0.0 where mask is 0)
    token_exact: bool = True  # False when a turn's rendered prompt did not extend the previous ids
    timings: dict[str, float] = field(default_factory=dict)  # seconds: generation, tools, grading

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
