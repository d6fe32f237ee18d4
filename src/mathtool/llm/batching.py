"""In-process generation for many agent loops at once: a dynamic batcher and the backend built on it.

Concurrent `complete_tokens` calls are gathered into batches for one blocking batch function (a
transformers `generate`, a `vllm.LLM.generate`), run on a worker thread so the event loop stays free for
tools and grading. `TransformersBackend` and `VLLMColocateBackend` are the two `BatchedBackend`s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mathtool.llm.base import Completion, SamplingParams

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
