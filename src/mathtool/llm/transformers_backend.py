"""An in-process `LLMBackend` over a transformers causal LM: the policy being trained generates its own rollouts.

Concurrent `complete_tokens` calls from many agent loops are gathered by the dynamic batcher
(`mathtool.llm.batching`) into one left-padded `generate` call, run on a worker thread so the event loop
stays free for tools and grading.

Logprobs are those of the sampled tokens under the sampling temperature, `log_softmax(logits / T)`: the
quantity TRL's GRPO computes for the policy when it forms its importance ratio. Top-k, top-p and min-p
are not folded in, as in TRL (vLLM's `processed_logprobs` do include them: train with top_p 1, top_k 0,
min_p 0 for the two to agree). As with vLLM, the EOS id that ends a turn is kept in
`token_ids` (finish_reason "stop") and left out of `text`; "length" means `max_tokens` ran out.
`SamplingParams.seed` is not applied per request: batched requests share torch's generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mathtool.llm.base import Completion, SamplingParams
from mathtool.llm.batching import BatchedBackend, DynamicBatcher, Request


class _LogprobRecorder(LogitsProcessor):
    """Records log_softmax(raw logits / T) of each sampled token; runs before the sampling warpers.

    At step t it sees the token sampled at step t-1 as the last input id, so it keeps only the previous
    step's distribution (batch x vocab) in memory; `finish` takes the last step's values.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature if temperature > 0 else 1.0
        self.previous: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.values.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """Per-token logprobs, batch x generated length."""
        if self.previous is not None and len(self.values) < generated.shape[1]:
            self.values.append(self.previous.gather(1, generated[:, -1:]).squeeze(1))
        if not self.values:
            return generated.new_zeros(generated.shape, dtype=torch.float)
        return torch.stack(self.values, dim=1)


class TransformersBackend(BatchedBackend):
    """`LLMBackend` that generates with a transformers model in this process (token-exact, with logprobs)."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 32, name: str | None = None) -> None:
        self.hf_model, self.tokenizer = model, tokenizer
        self.model = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.batcher = DynamicBatcher(self.generate_batch, max_batch_size)

    def generate_batch(self, requests: list[Request]) -> list[Completion]:
        """One left-padded `generate` call for requests sharing their sampling settings (blocking)."""
        params = requests[0][1]
        max_new = max(p.max_tokens for _, p in requests)
        input_ids, attention = _left_pad([ids for ids, _ in requests], self.pad_id, self.hf_model.device)
        recorder = _LogprobRecorder(params.temperature)
        with torch.no_grad(), _eval_mode(self.hf_model):
            out = self.hf_model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                generation_config=self._generation_config(params, max_new),
                logits_processor=_processors(recorder, params),
            )
        generated = out[:, input_ids.shape[1] :]
        logprobs = recorder.finish(generated)
        return [
            self._completion(generated[i].tolist(), logprobs[i].tolist(), p.max_tokens)
            for i, (_, p) in enumerate(requests)
        ]

    def _generation_config(self, params: SamplingParams, max_new: int) -> GenerationConfig:
        # Temperature, top-k, top-p and min-p are applied by our own processors, after the logprob recorder.
        return GenerationConfig(
            max_new_tokens=max_new,
            do_sample=params.temperature > 0,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )

    def _completion(self, ids: list[int], logprobs: list[float], max_tokens: int) -> Completion:
        """Cut at the first EOS (kept) or at this request's own max_tokens."""
        ids = ids[:max_tokens]
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        finish = "length" if end is None else "stop"
        ids = ids if end is None else ids[: end + 1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(text=text, finish_reason=finish, token_ids=ids, logprobs=logprobs[: len(ids)])


def _processors(recorder: _LogprobRecorder, params: SamplingParams) -> LogitsProcessorList:
    processors: list[LogitsProcessor] = [recorder]
    if params.temperature > 0 and params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.temperature > 0 and params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.temperature > 0 and params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    if params.temperature > 0 and params.min_p > 0:
        processors.append(MinPLogitsWarper(params.min_p))
    return LogitsProcessorList(processors)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model and tokenizer define no EOS token; generation could never stop")
    return ids


def _left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Generate in eval mode (no dropout, KV cache on with gradient checkpointing), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
