"""What the agent loop needs from a model: token-in/token-out generation, or chat as a fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """Every field is sent to the server: one left out takes the model's generation_config default there
    (Qwen3-4B: top_k=20), and the sampled logprobs would no longer be the ones the trainer computes."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0  # 0: the whole vocabulary
    min_p: float = 0.0
    max_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the generation, where the backend supports it


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (model ended its turn) or "length" (max_tokens reached)
    token_ids: list[int] | None = None  # generated ids, when the backend returns them
    logprobs: list[float] | None = None  # one per generated id
    usage_tokens: int = 0  # generated tokens as the server counted them (chat fallback)
    tool_calls: list[dict] | None = None  # calls the server parsed out of the text (chat path), OpenAI shape

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else self.usage_tokens


class LLMBackend(Protocol):
    """A model the agent can call. `supports_token_ids` selects the token-exact path."""

    model: str
    supports_token_ids: bool

    async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """Continue `prompt_ids` (already rendered with the chat template); return ids and logprobs."""
        ...

    async def complete_chat(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> Completion:
        """Fallback for servers without token-id prompts: OpenAI chat completions, the server rendering
        with its own chat template (`template_kwargs` such as enable_thinking passed to it)."""
        ...
