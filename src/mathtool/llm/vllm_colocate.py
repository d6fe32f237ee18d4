"""An in-process `LLMBackend` over a `vllm.LLM` engine (the one TRL builds inside each training process in
its `vllm-colocate` mode): concurrent requests go to `LLM.generate` in batches, each with its own sampling
parameters, token-in/token-out with the sampled tokens' logprobs (`logprobs=0`: the chosen token's only).
"""

from __future__ import annotations

from typing import Any

from mathtool.llm.base import Completion
from mathtool.llm.batching import BatchedBackend, DynamicBatcher, Request


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
