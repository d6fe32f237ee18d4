"""Qwen3's chat template on the agent's token record: scripted turns rendered through the real qwen3.jinja.

The tokenizer is the embedded SmolLM2's (ChatML: the same <|im_start|>/<|im_end|> special tokens as Qwen3);
the template is the qwen3.jinja that TRL ships. A scripted backend answers each turn with given text, as
token ids ending in <|im_end|>, and records the prompt ids it was sent: the sandbox and the grader are real.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from mathtool.agent.chat_format import (
    chat_setup,
    chat_template_path,
    is_prefix_preserving,
    read_chat_template,
)
from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.parsers import HERMES, MARKDOWN, after_reasoning, parse_hermes, turn_end
from mathtool.agent.trajectory import Trajectory
from mathtool.data.problem import Problem, WorkedExample
from mathtool.errors import ConfigError
from mathtool.llm.base import Completion, SamplingParams
from mathtool.metrics import compute_metrics
from mathtool.run_record import ANSWERED, STOPPED
from mathtool.sandbox import PythonSandbox

PROBLEM = Problem("mul", "What is 6 * 7?", "42")
CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'
ANSWER = "The product is \\boxed{42}."


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from mathtool.serve.embedded import ensure_embedded_model

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


class Scripted:
    """A model that says the given turns in order, token-in/token-out."""

    model = "scripted"
    supports_token_ids = True

    def __init__(self, tokenizer: Any, turns: list[str]) -> None:
        self.tokenizer, self.turns = tokenizer, list(turns)
        self.prompts: list[list[int]] = []
        self.generated: list[list[int]] = []

    async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        self.prompts.append(list(prompt_ids))
        text = self.turns.pop(0)
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        self.generated.append(ids)
        return Completion(text=text, finish_reason="stop", token_ids=ids, logprobs=[-0.25] * len(ids))

    async def complete_chat(self, *args: Any, **kwargs: Any) -> Completion:
        raise AssertionError("the token path must be used")


def run(tokenizer: Any, turns: list[str], thinking: bool | None = None, template: str | None = "qwen3",
        max_turns: int = 3, problem: Problem = PROBLEM) -> tuple[Trajectory, Scripted, AgentConfig]:
    config = AgentConfig(chat=chat_setup(tokenizer, template, thinking, None), max_turns=max_turns)
    backend = Scripted(tokenizer, turns)

    async def one() -> Trajectory:
        async with PythonSandbox(timeout_s=5) as sandbox:
            return await run_agent(problem, 0, backend, sandbox, config)

    return asyncio.run(one()), backend, config


def render_text(tokenizer: Any, messages: list[dict], template: str, thinking: bool | None) -> str:
    from mathtool.sandbox.tool import PYTHON_TOOL

    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    return tokenizer.apply_chat_template(messages, tools=[PYTHON_TOOL], chat_template=template, tokenize=False,
                                         add_generation_prompt=True, **kwargs)


def check_turn_by_turn(tokenizer: Any, traj: Trajectory, backend: Scripted, template: str,
                       thinking: bool | None) -> None:
    """Every turn's prompt is the record so far, is what `template` renders for the conversation so far,
    and the mask is 1 on exactly the model's tokens."""
    assert traj.token_exact
    record = traj.prompt_ids + traj.completion_ids
    assistant_at = [i for i, m in enumerate(traj.messages) if m["role"] == "assistant"][-len(backend.prompts):]
    for turn, prompt in enumerate(backend.prompts):
        assert record[: len(prompt)] == prompt
        assert tokenizer.decode(prompt) == render_text(tokenizer, traj.messages[: assistant_at[turn]], template,
                                                       thinking), f"turn {turn}"
        assert record[len(prompt) : len(prompt) + len(backend.generated[turn])] == backend.generated[turn]
    model_tokens = [t for t, m in zip(traj.completion_ids, traj.completion_mask, strict=True) if m]
    assert model_tokens == [t for ids in backend.generated for t in ids]
    assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.completion_mask, strict=True) if not m)


def test_named_templates_are_read_from_the_installed_trl_package() -> None:
    import trl

    path = chat_template_path("qwen3")
    assert path == Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
    assert chat_template_path("qwen3-training").name == "qwen3_training.jinja"
    assert "<tool_call>" in read_chat_template("qwen3")


def test_an_unknown_template_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a known name"):
        read_chat_template("qwen9")
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert read_chat_template(str(custom)).startswith("{% for")


def test_tool_format_follows_from_the_template_by_one_rule(tokenizer: Any) -> None:
    from mathtool.agent.setup import agent_setup
    from mathtool.engine.settings import EvalSettings
    from mathtool.train.config import TrainConfig

    assert chat_setup(tokenizer, "qwen3", None, None).tool_format == HERMES  # renders the tools into the system turn
    assert chat_setup(tokenizer, None, None, None).tool_format == MARKDOWN  # SmolLM2's own template ignores tools
    assert chat_setup(None, "qwen3", None, None).tool_format == HERMES  # the chat path decides the same way
    assert chat_setup(tokenizer, "qwen3", None, MARKDOWN).tool_format == MARKDOWN  # --tool-format overrides
    # evaluation and training build their agent in one place, with the same rule, on either path
    for settings in (TrainConfig(chat_template="qwen3", thinking=False),
                     EvalSettings(chat_template="qwen3", thinking=False)):
        for on_client in (tokenizer, None):
            chat = agent_setup(settings, on_client, 4096).chat
            assert (chat.tool_format, chat.thinking, chat.on_client) == (HERMES, False, on_client is not None)


def test_the_tokenizer_is_loaded_with_the_runs_template_or_not_at_all(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from mathtool.agent.setup import load_tokenizer
    from mathtool.serve.embedded import ensure_embedded_model

    loaded = load_tokenizer(str(ensure_embedded_model()), "qwen3", required=True)
    assert loaded.chat_template == read_chat_template("qwen3")  # what training's checkpoints then carry
    missing = str(tmp_path / "no-model")
    with caplog.at_level(logging.WARNING):
        assert load_tokenizer(missing) is None  # evaluation falls back to the chat path, and says so
    assert f"cannot load the tokenizer of {missing}" in caplog.text
    with pytest.raises(ConfigError, match=f"^cannot load the tokenizer of '{missing}': [^\n]+$"):
        load_tokenizer(missing, required=True)  # training cannot


def test_qwen3_is_not_prefix_preserving_so_the_record_uses_trls_training_variant(tokenizer: Any) -> None:
    qwen3 = read_chat_template("qwen3")
    assert not is_prefix_preserving(tokenizer, qwen3, HERMES, None)
    chat = chat_setup(tokenizer, "qwen3", None, None)
    assert chat.template == qwen3 and chat.record_template == read_chat_template("qwen3-training")
    assert chat_setup(tokenizer, None, None, None).record_template == tokenizer.chat_template


def test_prompt_holds_the_tool_schema_in_the_system_turn(tokenizer: Any) -> None:
    traj, backend, _ = run(tokenizer, [ANSWER])
    prompt = tokenizer.decode(traj.prompt_ids)
    assert prompt.startswith("<|im_start|>system\n") and "<tools>\n" in prompt and '"name": "python"' in prompt
    assert prompt.index("</tools>") < prompt.index("<|im_start|>user\nWhat is 6 * 7?")
    assert (traj.termination, traj.correct, traj.num_tool_calls) == (ANSWERED, True, 0)


def test_a_turn_without_a_think_block_stays_exact(tokenizer: Any) -> None:
    traj, backend, _ = run(tokenizer, [CALL, ANSWER])
    assert (traj.termination, traj.correct, traj.num_tool_calls) == (ANSWERED, True, 1)
    check_turn_by_turn(tokenizer, traj, backend, read_chat_template("qwen3"), None)
    second = tokenizer.decode(backend.prompts[1])
    assert second.endswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")


def test_worked_examples_are_a_finished_conversation_before_the_problem_and_stay_exact(tokenizer: Any) -> None:
    from mathtool.sandbox.tool import PYTHON_TOOL

    problem = replace(PROBLEM, examples=(WorkedExample("What is 7 * 8?", "print(7 * 8)", "56", "56"),))
    traj, backend, _ = run(tokenizer, [CALL, ANSWER], problem=problem)
    assert (traj.termination, traj.correct, traj.num_tool_calls) == (ANSWERED, True, 1)
    check_turn_by_turn(tokenizer, traj, backend, read_chat_template("qwen3"), None)
    prompt = tokenizer.decode(backend.prompts[0])
    example = ('<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "python", '
               '"arguments": {"code": "print(7 * 8)"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n56\n'
               '</tool_response><|im_end|>\n<|im_start|>assistant\n\\boxed{56}<|im_end|>\n')
    assert prompt.index("</tools>") < prompt.index(example) < prompt.index("<|im_start|>user\nWhat is 6 * 7?")
    # the call is written as the template writes a structured call: as if the model had written it
    structured = [*traj.messages[:2], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "python", "arguments": {"code": "print(7 * 8)"}}}]},
        *traj.messages[3:5]]
    as_structured = tokenizer.apply_chat_template(structured, tools=[PYTHON_TOOL], chat_template=read_chat_template(
        "qwen3"), tokenize=False, add_generation_prompt=True)
    assert as_structured == render_text(tokenizer, traj.messages[:5], read_chat_template("qwen3"), None)


def test_worked_examples_in_markdown_format(tokenizer: Any) -> None:
    problem = replace(PROBLEM, examples=(WorkedExample("What is 7 * 8?", "print(7 * 8)", "56", "56"),))
    traj, backend, _ = run(tokenizer, ["```python\nprint(6 * 7)\n```", ANSWER], template=None, problem=problem)
    assert (traj.termination, traj.correct, traj.num_tool_calls) == (ANSWERED, True, 1)
    assert [m["content"] for m in traj.messages[2:5]] == ["```python\nprint(7 * 8)\n```", "```output\n56\n```",
                                                          "\\boxed{56}"]
    assert "What is 7 * 8?" in tokenizer.decode(backend.prompts[0]) and traj.token_exact


def test_an_empty_think_block_stays_exact(tokenizer: Any) -> None:
    # qwen3.jinja drops an empty think block from a turn a tool message follows; the record keeps it, as
    # the model wrote and saw it, which is what the prefix-preserving training variant renders.
    traj, backend, _ = run(tokenizer, ["<think>\n\n</think>\n\n" + CALL, "<think>\n\n</think>\n\n" + ANSWER])
    assert (traj.termination, traj.num_tool_calls) == (ANSWERED, 1)
    check_turn_by_turn(tokenizer, traj, backend, read_chat_template("qwen3-training"), None)


def test_reasoning_then_a_call_stays_exact(tokenizer: Any) -> None:
    traj, backend, _ = run(tokenizer, ["<think>\nI should compute it.\n</think>\n\n" + CALL,
                                       "<think>\nIt printed 42.\n</think>\n\n" + ANSWER])
    assert (traj.termination, traj.correct) == (ANSWERED, True)
    check_turn_by_turn(tokenizer, traj, backend, read_chat_template("qwen3"), None)


def test_no_thinking_stays_exact(tokenizer: Any) -> None:
    traj, backend, _ = run(tokenizer, [CALL, ANSWER], thinking=False)
    assert tokenizer.decode(backend.prompts[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert (traj.termination, traj.correct) == (ANSWERED, True)
    check_turn_by_turn(tokenizer, traj, backend, read_chat_template("qwen3-training"), False)


def test_the_newline_after_im_end_is_the_environments(tokenizer: Any) -> None:
    traj, backend, _ = run(tokenizer, [CALL, ANSWER])
    end = len(backend.generated[0])
    assert traj.completion_ids[end - 1] == tokenizer.eos_token_id and traj.completion_mask[end - 1] == 1
    assert tokenizer.decode(traj.completion_ids[end : end + 1]) == "\n" and traj.completion_mask[end] == 0


def test_text_before_the_call_and_two_calls_in_one_turn(tokenizer: Any) -> None:
    second = CALL.replace("6 * 7", "6 + 7")
    traj, backend, _ = run(tokenizer, ["Let me compute both.\n" + CALL + "\n" + second, ANSWER])
    assert traj.num_tool_calls == 2 and traj.termination == ANSWERED
    check_turn_by_turn(tokenizer, traj, backend, read_chat_template("qwen3"), None)
    prompt = tokenizer.decode(backend.prompts[1])
    assert ("<|im_start|>user\n<tool_response>\n42\n</tool_response>\n<tool_response>\n13\n</tool_response>"
            "<|im_end|>") in prompt  # both results in one user turn, in call order


def test_malformed_json_is_answered_with_an_error_and_stays_exact(tokenizer: Any) -> None:
    traj, backend, _ = run(tokenizer, ['<tool_call>\n{"name": "python", "arguments": {"code": </tool_call>', CALL,
                                       ANSWER])
    assert traj.num_tool_calls == 1 and traj.termination == ANSWERED
    assert traj.messages[3]["role"] == "tool" and traj.messages[3]["content"].startswith("Error: tool call is not")
    check_turn_by_turn(tokenizer, traj, backend, read_chat_template("qwen3"), None)


@pytest.mark.parametrize("turn", [
    "<think>\nMaybe " + CALL + "\n</think>\n\nI am not sure.",  # a call inside closed reasoning
    "<think>\nMaybe " + CALL,  # reasoning that never ends
])
def test_a_call_inside_think_is_not_executed(tokenizer: Any, turn: str) -> None:
    traj, backend, _ = run(tokenizer, [turn])
    assert (traj.num_tool_calls, traj.termination, len(backend.prompts)) == (0, STOPPED, 1)


def test_a_made_up_tool_response_is_cut_and_the_tool_answers(tokenizer: Any) -> None:
    traj, backend, config = run(tokenizer, [CALL + "\n<tool_response>\n41\n</tool_response>", ANSWER])
    assert config.chat.tool_format == HERMES
    assert traj.messages[2]["content"] == CALL and traj.messages[3]["content"] == "42"
    assert traj.token_exact and traj.correct


def test_a_template_that_cannot_be_extended_is_counted_as_inexact(tokenizer: Any, tmp_path: Path) -> None:
    # qwen3.jinja with one comment added: TRL does not know it, so no prefix-preserving variant exists.
    custom = tmp_path / "qwen3-copy.jinja"
    custom.write_text("{#- a copy -#}\n" + read_chat_template("qwen3"))
    traj, backend, _ = run(tokenizer, [CALL, ANSWER], template=str(custom))
    assert traj.termination == ANSWERED and not traj.token_exact
    # what was sampled before the resync is masked out; the turn sampled after it counts
    model_tokens = [t for t, m in zip(traj.completion_ids, traj.completion_mask, strict=True) if m]
    assert model_tokens == backend.generated[1]
    exact, _, _ = run(tokenizer, [CALL, ANSWER])
    metrics = compute_metrics([traj.to_json(), {**exact.to_json(), "sample": 1}], 2)
    assert metrics["num_inexact"] == 1


def test_parsers_after_reasoning_and_turn_end() -> None:
    assert after_reasoning("<think>a</think>b") == "b" and after_reasoning("<think>a") == ""
    assert after_reasoning("plain") == "plain"
    assert [c.code for c in parse_hermes(CALL)] == ["print(6 * 7)"]
    text = CALL + "\n<tool_response>\n41"
    assert turn_end(text, HERMES) == len(CALL)
    assert turn_end("no call <tool_response>", HERMES) == len("no call <tool_response>")


def test_a_flood_of_output_reaches_the_model_as_a_screenful(tokenizer: Any) -> None:
    """Code that prints in a loop (as the embedded model's sometimes does) must not fill the context."""
    flood = '<tool_call>\n{"name": "python", "arguments": {"code": "for i in range(30000): print(i)"}}\n</tool_call>'
    traj, backend, _ = run(tokenizer, [flood, ANSWER])
    shown = traj.messages[3]["content"]
    assert shown.startswith("0\n1\n2\n") and shown.endswith("more characters not shown ...]")
    assert 4000 < len(shown) < 4100 and traj.token_exact and traj.termination == ANSWERED
