"""An in-process `LLMBackend` over a transformers causal LM: the policy being trained generates its own rollouts.

Concurrent `complete_tokens` calls from many agent loops are gathered by a small dynamic batcher into one
left-padded `generate` call, run on a worker thread so the event loop stays free for tools and grading.

Logprobs are those of the sampled tokens under the sampling temperature, `log_softmax(logits / T)`: the
quantity TRL's GRPO computes for the policy when it forms its importance ratio. Top-k, top-p and min-p
are not folded in, as in TRL (vLLM's `processed_logprobs` do include them: train with top_p 1, top_k 0,
min_p 0 for the two to agree). As with vLLM, the EOS id that ends a turn is kept in
`token_ids` (finish_reason "stop") and left out of `text`; "length" means `max_tokens` ran out.
`SamplingParams.seed` is not applied per request: batched requests share torch's generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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

log = logging.getLogger(__name__)

Request = tuple[list[int], SamplingParams]
BatchFn = Callable[[list[Request]], list[Completion]]


@dataclass
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    future: asyncio.Future[Completion]


class DynamicBatcher:
    """Gathers concurrent requests into batches for a blocking batch function run on one worker thread.

    Requests that arrive while a batch is generating wait for the next one; a batch holds requests with
    the same sampling settings, at most `max_batch_size` of them. Bound to the event loop that first
    uses it.
    """

    def __init__(self, run_batch: BatchFn, max_batch_size: int = 32, gather_s: float = 0.02) -> None:
        self.run_batch, self.max_batch_size, self.gather_s = run_batch, max_batch_size, gather_s
        self._pending: list[_Pending] = []
        self._drainer: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.batch_sizes: list[int] = []  # for diagnostics and tests

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()
        self._pending.append(_Pending(list(prompt_ids), params, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await future

    def _take(self) -> list[_Pending]:
        key = _sampling_key(self._pending[0].params)
        batch = [p for p in self._pending if _sampling_key(p.params) == key][: self.max_batch_size]
        taken = {id(p) for p in batch}
        self._pending = [p for p in self._pending if id(p) not in taken]
        return [p for p in batch if not p.future.done()]  # a cancelled caller needs no tokens

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            await asyncio.sleep(self.gather_s)  # let callers that are about to submit join this batch
            batch = self._take()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, [(p.prompt_ids, p.params) for p in batch]
                )
            except Exception as e:  # every caller of the failed batch sees the error
                results = [e] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _sampling_key(params: SamplingParams) -> tuple[float, float, int, float]:
    return params.temperature, params.top_p, params.top_k, params.min_p


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


class BatchedBackend:
    """An in-process `LLMBackend` whose concurrent requests are batched into `generate_batch` calls.

    Subclasses set `self.tokenizer` and `self.batcher = DynamicBatcher(self.generate_batch, ...)`.
    """

    supports_token_ids = True
    tokenizer: Any
    batcher: DynamicBatcher

    async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        if params.max_tokens < 1:
            return Completion(text="", finish_reason="length", token_ids=[], logprobs=[])
        return await self.batcher.submit(prompt_ids, params)

    async def complete_chat(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> Completion:
        rendered = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=True, **(template_kwargs or {}))
        ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        return await self.complete_tokens(list(ids), params)

    def close(self) -> None:
        self.batcher.close()


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
