"""Model backends for the agent loop (`LLMBackend`): OpenAI-compatible HTTP (token-exact on vLLM), and the
in-process ones training generates with, whose concurrent requests are batched (`batching`): the policy
itself through transformers (`transformers_backend`) and a colocated vLLM engine (`vllm_colocate`)."""

from mathtool.llm.base import Completion, LLMBackend, SamplingParams
from mathtool.llm.openai_backend import OpenAIBackend

__all__ = ["Completion", "LLMBackend", "OpenAIBackend", "SamplingParams"]
