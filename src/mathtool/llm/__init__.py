"""Model backends for the agent loop: OpenAI-compatible HTTP (token-exact on vLLM)."""

from mathtool.llm.base import Completion, LLMBackend, SamplingParams
from mathtool.llm.openai_backend import OpenAIBackend

__all__ = ["Completion", "LLMBackend", "OpenAIBackend", "SamplingParams"]
