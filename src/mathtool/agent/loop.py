"""run_agent(): one trajectory. Prompt -> model -> tool calls -> sandbox -> ... -> \\boxed{} -> grade.

Token-exact when the backend takes token-id prompts and the `ChatFormat` has a tokenizer: the conversation
is rendered with the chat template on the client, the ids the server returned are kept, and the tokens the
environment adds after each model turn (template tokens, tool results, the next generation prompt) are
found by rendering the conversation without and with them, so the model's own tokens are never
re-tokenized. Otherwise the loop uses chat completions: the server renders, and parses tool calls when
it is run with a tool-call parser (the text is parsed when it is not).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any

from mathtool.agent.chat_format import ChatFormat
from mathtool.agent.parsers import (
    HERMES,
    TOOL_OUTPUT_START,
    ToolCall,
    after_reasoning,
    parse_server_tool_calls,
    parse_tool_calls,
    turn_end,
)
from mathtool.agent.prompts import initial_messages, tool_result_message
from mathtool.agent.trajectory import Trajectory
from mathtool.data.problem import Problem
from mathtool.errors import ContextExceeded, MathtoolError
from mathtool.grading import extract_boxed, grade_async
from mathtool.llm.base import Completion, LLMBackend, SamplingParams
from mathtool.run_record import ANSWERED, BUDGET, CONTEXT, ERROR, MAX_TURNS, STOPPED
from mathtool.sandbox.base import Sandbox, Session
from mathtool.sandbox.tool import PYTHON_TOOL, format_tool_result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    chat: ChatFormat = field(default_factory=ChatFormat)  # tool format, thinking; with a tokenizer: token-exact
    max_turns: int = 5
    max_response_length: int = 16384  # model tokens across all turns
    max_prompt_length: int = 2048  # the first prompt
    context_length: int | None = None  # the server's; prompt + response must fit
    sampling: SamplingParams = field(default_factory=SamplingParams)


def turn_seed(seed: int, problem_id: str, sample: int, turn: int) -> int:
    """A distinct, reproducible sampling seed for each (problem, sample, turn) of a seeded run."""
    return zlib.crc32(f"{seed}/{problem_id}/{sample}/{turn}".encode())


def _tokens_spelling(tokenizer: Any, ids: list[int], text: str) -> int | None:
    """n such that ids[:n] decode to exactly `text` (a prefix of what all of `ids` decode to), if any."""
    low, high = 0, len(ids)
    while low < high:  # the fewest tokens that decode to at least len(text) characters
        mid = (low + high) // 2
        if len(tokenizer.decode(ids[:mid])) < len(text):
            low = mid + 1
        else:
            high = mid
    return low if tokenizer.decode(ids[:low]) == text else None


@dataclass
class _TokenRecord:
    """The growing token record: prompt, then model tokens (mask 1) and everything else (mask 0)."""

    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    exact: bool = True

    @property
    def full(self) -> list[int]:
        return self.prompt + self.ids

    def add_model(self, completion: Completion) -> None:
        ids = completion.token_ids or []
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logprobs += completion.logprobs or [0.0] * len(ids)

    def add_env(self, through_model: list[int], rendered: list[int]) -> None:
        """Append what follows the model's turn (template tokens, tool output, the next generation prompt)
        without re-tokenizing the model's text, which can tokenize differently from how it was sampled.

        `through_model` is the conversation rendered up to the model's last turn; `rendered` adds the tool
        results and the generation prompt. The tokens after the model's final (end-of-turn) token in
        `through_model`, then the rest of `rendered`, are the environment's.
        """
        tail = through_model[-8:]
        last = self.ids[-1] if self.ids else None
        if rendered[: len(through_model)] != through_model or last not in tail:
            self._resync(rendered)
            return
        after_end = tail[len(tail) - tail[::-1].index(last) :]
        extra = after_end + rendered[len(through_model) :]
        self.ids += extra
        self.mask += [0] * len(extra)
        self.logprobs += [0.0] * len(extra)

    def _resync(self, rendered: list[int]) -> None:
        """The template cannot be extended token-exactly: continue from `rendered`, masking the past."""
        self.exact = False
        log.warning("the chat template does not extend the sampled tokens; earlier model tokens are masked out")
        if rendered[: len(self.prompt)] != self.prompt:
            self.prompt, rendered = rendered, []
        else:
            rendered = rendered[len(self.prompt) :]
        self.ids, self.mask, self.logprobs = rendered, [0] * len(rendered), [0.0] * len(rendered)


class _Run:
    """The state of one trajectory while it runs."""

    def __init__(self, problem: Problem, sample: int, llm: LLMBackend, config: AgentConfig):
        self.problem, self.llm, self.config = problem, llm, config
        route = getattr(llm, "route", None)  # a multi-server backend keeps a trajectory on one server
        if route is not None:
            self.llm = route((problem.id, sample))
        self.traj = Trajectory(problem_id=problem.id, sample=sample, ground_truth=problem.answer)
        self.traj.messages = initial_messages(problem, config.chat.tool_format)
        self.traj.worked_examples = len(problem.examples)
        self.traj.timings = {"generation": 0.0, "tools": 0.0, "grading": 0.0}
        self.tokens: _TokenRecord | None = None
        if llm.supports_token_ids and config.chat.on_client:
            self.tokens = _TokenRecord(config.chat.render(self.traj.messages))

    def budget(self) -> tuple[int, str]:
        """How many tokens the next turn may generate, and what runs out first."""
        left = self.config.max_response_length - self.traj.response_tokens
        if self.config.context_length and self.tokens is not None:
            room = self.config.context_length - len(self.tokens.full)
            if room < left:
                return room, CONTEXT
        return left, BUDGET

    async def generate(self, max_tokens: int) -> Completion:
        seed = self.config.sampling.seed
        if seed is not None:
            seed = turn_seed(seed, self.problem.id, self.traj.sample, self.traj.num_turns)
        stop = (TOOL_OUTPUT_START[self.config.chat.tool_format],)
        params = replace(self.config.sampling, max_tokens=max_tokens, seed=seed, stop=stop)
        started = time.perf_counter()
        if self.tokens is not None:
            completion = self.end_turn(await self.llm.complete_tokens(self.tokens.full, params))
            self.tokens.add_model(completion)
        else:
            completion = self.end_turn(await self.llm.complete_chat(self.traj.messages, params, *self.chat_extras()))
        self.traj.timings["generation"] += time.perf_counter() - started
        self.traj.response_tokens += completion.num_tokens
        self.traj.num_turns += 1
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        if completion.tool_calls:
            message["tool_calls"] = completion.tool_calls
        self.traj.messages.append(message)
        return completion

    def chat_extras(self) -> tuple[list[dict] | None, dict | None]:
        """What the chat path sends beside the messages: the tool, and the template's thinking switch."""
        chat = self.config.chat
        tools = [PYTHON_TOOL] if chat.tool_format == HERMES else None
        thinking = None if chat.thinking is None else {"enable_thinking": chat.thinking}
        return tools, thinking

    def end_turn(self, completion: Completion) -> Completion:
        """Cut a turn where the model began to write the tool's output itself (see `turn_end`): the text,
        and the token ids to the same point. Left whole if no token boundary falls exactly there."""
        end = turn_end(completion.text, self.config.chat.tool_format)
        if end == len(completion.text):
            return completion
        text = completion.text[:end]
        if completion.token_ids is None or not self.config.chat.on_client:
            return replace(completion, text=text, finish_reason="stop")
        n = _tokens_spelling(self.config.chat.tokenizer, completion.token_ids, text)
        if n is None:
            return completion
        logprobs = completion.logprobs[:n] if completion.logprobs is not None else None
        return Completion(text, "stop", completion.token_ids[:n], logprobs)

    def tool_calls(self, completion: Completion) -> list[ToolCall]:
        """The turn's calls: those the server parsed (chat path), else those in the text after the reasoning."""
        if completion.tool_calls:
            return parse_server_tool_calls(completion.tool_calls, len(completion.text))
        return parse_tool_calls(completion.text, self.config.chat.tool_format)

    async def run_tools(self, calls: list[ToolCall], session: Session) -> None:
        started = time.perf_counter()
        through_model = list(self.traj.messages)
        for call in calls:
            if call.code is None:
                text = f"Error: {call.error}"
            else:
                self.traj.num_tool_calls += 1
                text = format_tool_result(await session.run(call.code))
            self.traj.messages.append(tool_result_message(text, self.config.chat.tool_format, call.call_id))
        self.traj.timings["tools"] += time.perf_counter() - started
        if self.tokens is not None:
            chat = self.config.chat
            self.tokens.add_env(chat.render(through_model, generation_prompt=False, record=True),
                                chat.render(self.traj.messages, record=True))

    async def loop(self, session: Session) -> str:
        """Turns until the model answers, stops, or a limit is hit; returns the termination reason."""
        if self.tokens is not None and len(self.tokens.prompt) > self.config.max_prompt_length:
            return CONTEXT
        for turn in range(self.config.max_turns):
            max_tokens, limit = self.budget()
            if max_tokens <= 0:
                return limit
            try:
                completion = await self.generate(max_tokens)
            except ContextExceeded:  # the chat path, which cannot count the prompt's tokens itself
                return CONTEXT
            if completion.finish_reason == "length":
                return limit
            calls = self.tool_calls(completion)
            rest = completion.text[calls[-1].end :] if calls else after_reasoning(completion.text)
            if extract_boxed(rest) is not None:  # a final answer after the last call
                return ANSWERED
            if all(call.code is None for call in calls):  # no call, or only malformed ones
                self.traj.void_turns += 1
            if not calls:
                return STOPPED
            if turn == self.config.max_turns - 1:
                return MAX_TURNS
            await self.run_tools(calls, session)
        return MAX_TURNS

    async def finish(self, termination: str) -> Trajectory:
        traj = self.traj
        traj.termination = termination
        if self.tokens is not None:
            traj.prompt_ids, traj.completion_ids = self.tokens.prompt, self.tokens.ids
            traj.completion_mask, traj.logprobs = self.tokens.mask, self.tokens.logprobs
            traj.token_exact = self.tokens.exact
        final = next((m["content"] for m in reversed(traj.messages) if m["role"] == "assistant"), "")
        started = time.perf_counter()
        result = await grade_async(final, self.problem.answer)
        traj.timings["grading"] = time.perf_counter() - started
        traj.extracted_answer, traj.correct = result.extracted, result.correct
        return traj


async def run_agent(problem: Problem, sample: int, llm: LLMBackend, sandbox: Sandbox,
                    config: AgentConfig) -> Trajectory:
    """Run one trajectory to its end. Server and loop failures are recorded, never raised."""
    run = _Run(problem, sample, llm, config)
    try:
        async with sandbox.session() as session:
            termination = await run.loop(session)
    except Exception as e:  # one failed trajectory is recorded, never aborts a run
        log.debug("trajectory %s/%d failed", problem.id, sample, exc_info=True)
        run.traj.error = str(e) if isinstance(e, MathtoolError) else f"{type(e).__name__}: {e}"
        termination = ERROR
    return await run.finish(termination)
