"""An in-process `LLMBackend` over a `vllm.LLM` engine (the one TRL builds inside each training process in
its `vllm-colocate` mode): concurrent requests go to `LLM.generate` in batches, each with its own sampling
parameters, token-in/token-out with the sampled tokens' logprobs (`logprobs=0`: the chosen token's only).

`InPlaceWeightSync` replaces TRL's weight sync for that engine where TRL's cannot work: vLLM's CPU build
repacks each linear layer's weight for its GEMM kernels after loading and drops the parameter TRL's
per-tensor `load_weights` writes into. vLLM's own in-place reload restores the checkpoint-format layers,
loads the policy's tensors and repacks them, except an output layer tied to the input embeddings: the
policy names that tensor once, so vLLM puts the old one back; the sync ties it to the new embeddings and
repacks it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mathtool.llm.base import Completion
from mathtool.llm.batching import BatchedBackend, DynamicBatcher, Request

log = logging.getLogger(__name__)


class VLLMColocateBackend(BatchedBackend):
    """`LLMBackend` over an in-process `vllm.LLM`: concurrent requests go to `LLM.generate` in batches."""

    def __init__(self, llm: Any, tokenizer: Any, max_batch_size: int = 1024) -> None:
        self.llm, self.tokenizer = llm, tokenizer
        self.model = "vllm-colocate"
        self.batcher = DynamicBatcher(self.generate_batch, max_batch_size)

    def generate_batch(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams as VLLMSamplingParams

        prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
        sampling = [VLLMSamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                                       max_tokens=p.max_tokens, stop=list(p.stop), include_stop_str_in_output=True,
                                       logprobs=0, seed=p.seed) for _, p in requests]
        outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
        return [_completion(output.outputs[0]) for output in outputs]


def _completion(out: Any) -> Completion:
    ids = list(out.token_ids)
    logprobs = [float(step[token].logprob) for step, token in zip(out.logprobs or [], ids, strict=True)]
    return Completion(text=out.text, finish_reason="length" if out.finish_reason == "length" else "stop",
                      token_ids=ids, logprobs=logprobs)


class InPlaceWeightSync:
    """Pushes the policy's weights into TRL's colocated `vllm.LLM` through vLLM's in-place reload
    (`Worker.reload_weights`), then clears vLLM's prefix cache. Installed as `vllm_generation.sync_weights`;
    `seconds` holds each sync's duration, in order."""

    def __init__(self, vllm_generation: Any) -> None:
        self.generation = vllm_generation
        self.seconds: list[float] = []

    def __call__(self) -> None:
        started = time.perf_counter()
        llm = self.generation.llm
        # TRL's iterator: the names vLLM's checkpoint loader expects, gathered where the policy is sharded.
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self.generation._iter_named_params(),
                                                     "is_checkpoint_format": True})
        llm.collective_rpc(_retie_output_embeddings)
        llm.reset_prefix_cache()
        self.seconds.append(time.perf_counter() - started)
        log.debug("synced the policy's weights into vLLM in %.2f s", self.seconds[-1])


def _retie_output_embeddings(worker: Any) -> None:
    """In vLLM's worker: a tied output layer shares the (new) input embeddings again, repacked for its kernels."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    model = worker.model_runner.get_model()
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    modules = list(model.modules())
    heads = [m for m in modules if isinstance(m, ParallelLMHead)]
    embeddings = [m for m in modules if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    for head in heads:
        head.weight = embeddings[0].weight
        head.quant_method.process_weights_after_loading(head)


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def install_weight_sync(vllm_generation: Any) -> InPlaceWeightSync:
    """Replace TRL's weight sync of a colocated engine with `InPlaceWeightSync`; returns it."""
    sync = InPlaceWeightSync(vllm_generation)
    vllm_generation.sync_weights = sync
    return sync
