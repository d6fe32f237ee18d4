"""One agent setup for evaluation and training: the tokenizer, the chat format, the AgentConfig.

`mathtool eval` and `mathtool train` both load the tokenizer with `load_tokenizer` and build the agent with
`agent_setup`, so the tool-format rule, the chat template, thinking, the limits and the sampling fields
are decided in one place. Every sampling field is explicit: a field left out takes the model's
generation_config default on vLLM, and TRL's logprobs are over the whole vocabulary (top_k 0, min_p 0).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from mathtool.agent.chat_format import chat_setup, read_chat_template
from mathtool.agent.loop import AgentConfig
from mathtool.errors import ConfigError
from mathtool.llm.base import SamplingParams

log = logging.getLogger(__name__)


class AgentSettings(Protocol):
    """The settings an agent is built from (`EvalSettings` and `TrainConfig` both have them)."""

    chat_template: str | None  # a name (qwen3, qwen3-training) or a Jinja file; None: the tokenizer's own
    thinking: bool | None
    tool_format: str | None  # None: by the chat template (`choose_tool_format`)
    max_turns: int
    max_response_length: int
    max_prompt_length: int
    temperature: float
    top_p: float


def load_tokenizer(source: str | None, chat_template: str | None = None, required: bool = False) -> Any:
    """The model's tokenizer, with `chat_template` (a name or file) as its template when given, so that
    whatever saves it (training's checkpoints) carries the template too.

    Where it cannot be loaded: a ConfigError line when `required` (training), else None with a warning
    (evaluation then uses the server's chat completions, not token-exact).
    """
    if not source:
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # missing package, offline Hub, unknown id
        if required:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot load the tokenizer of {source!r}: {first_line}") from None
        log.warning("cannot load the tokenizer of %s (%s); using chat completions, not token-exact", source, e)
        return None
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def agent_setup(settings: AgentSettings, tokenizer: Any, context_length: int | None,
                seed: int | None = None) -> AgentConfig:
    """The AgentConfig of a run: its chat format (rendered on the client when there is a tokenizer, else by
    the server), limits and sampling (`seed`: one per (problem, sample, turn), derived from it; None: unseeded)."""
    return AgentConfig(
        chat=chat_setup(tokenizer, settings.chat_template, settings.thinking, settings.tool_format),
        max_turns=settings.max_turns,
        max_response_length=settings.max_response_length,
        max_prompt_length=settings.max_prompt_length,
        context_length=context_length,
        sampling=SamplingParams(temperature=settings.temperature, top_p=settings.top_p, top_k=0, min_p=0.0,
                                max_tokens=settings.max_response_length, seed=seed),
    )
