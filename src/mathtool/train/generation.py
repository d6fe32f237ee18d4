"""The generation backend the agent loops use during training, chosen by `TrainConfig.generation`.

The backends live in `mathtool.llm`; this module picks one and wires it to the trainer.

- `transformers`: the policy itself, in this process (`TransformersBackend`): CPU, or one GPU / DDP.
- `vllm-server`: the vLLM server that `trl vllm-serve` starts (vLLM's OpenAI-compatible server with
  weight transfer), through our `OpenAIBackend`, token-in/token-out. TRL pushes the new weights to it
  before every rollout; every process sends its own requests.
- `vllm-colocate`: the vLLM engine TRL builds inside each process (`trainer.vllm_generation.llm`),
  through `VLLMColocateBackend`, with per-request sampling parameters; TRL syncs its weights before every
  rollout. Needs `vllm_tensor_parallel_size` 1, since each process generates for its own prompts.

In every mode the logprobs are the sampled tokens' under the rollout temperature, as TRL's importance
sampling correction expects (`trl vllm-serve` runs vLLM with `--logprobs-mode processed_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mathtool.errors import ConfigError
from mathtool.llm.base import LLMBackend
from mathtool.llm.transformers_backend import TransformersBackend
from mathtool.llm.vllm_colocate import VLLMColocateBackend
from mathtool.train.config import TrainConfig
from mathtool.train.runtime import AgentRuntime


def backend_factory(config: TrainConfig, tokenizer: Any, runtime: AgentRuntime) -> Callable[[Any], LLMBackend]:
    """A function of the trainer that builds the configured backend (called at the first rollout)."""

    def make(trainer: Any) -> LLMBackend:
        if config.generation == "transformers":
            model = trainer.accelerator.unwrap_model(trainer.model)
            return TransformersBackend(model, tokenizer, max_batch_size=config.generation_batch_size)
        if config.generation == "vllm-server":
            return runtime.run(_connect(_server_url(trainer.args)))
        return VLLMColocateBackend(trainer.vllm_generation.llm, tokenizer)

    return make


async def _connect(url: str) -> LLMBackend:
    from mathtool.llm.openai_backend import OpenAIBackend

    backend = await OpenAIBackend.connect([url])
    if not backend.supports_token_ids:
        await backend.aclose()
        raise ConfigError(f"the vLLM server at {url} does not take token-id prompts; training needs them")
    return backend


def _server_url(args: Any) -> str:
    if args.vllm_server_base_url:
        return args.vllm_server_base_url
    host = "127.0.0.1" if args.vllm_server_host in ("0.0.0.0", "") else args.vllm_server_host
    return f"http://{host}:{args.vllm_server_port}"
