"""Serving and the OpenAI-compatible client against real servers: the session's embedded vLLM server,
one more started and killed by `test_server_killed_mid_run_raises_server_error`, and llama.cpp."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mathtool.agent.chat_format import ChatFormat
from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.parsers import MARKDOWN
from mathtool.data.problem import Problem
from mathtool.errors import ConfigError, ServerError
from mathtool.llm import OpenAIBackend, SamplingParams
from mathtool.sandbox import PythonSandbox
from mathtool.serve import ServerSpec, embedded_spec, start_server
from mathtool.serve.embedded import EMBEDDED_MODEL_NAME
from mathtool.serve.launch import resolve_port, server_command

LONG_QUESTION = "Write a long, detailed essay about the history of mathematics, from Babylon to today."


@pytest.fixture(scope="module")
def tokenizer(embedded_server) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(embedded_server.model_dir)


@pytest.fixture
async def backend(embedded_server) -> AsyncIterator[OpenAIBackend]:
    async with await OpenAIBackend.connect([embedded_server.base_url]) as backend:
        yield backend


def chat_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.server
async def test_probe_detects_the_token_exact_path(backend: OpenAIBackend) -> None:
    assert backend.model == EMBEDDED_MODEL_NAME
    assert backend.supports_token_ids
    assert backend.max_model_len == 4096


@pytest.mark.server
async def test_token_prompt_returns_ids_that_decode_to_the_text(backend, tokenizer) -> None:
    prompt = chat_ids(tokenizer, "What is 2+3? Answer briefly.")
    greedy = await backend.complete_tokens(prompt, SamplingParams(temperature=0.0, max_tokens=200))
    assert greedy.finish_reason == "stop"
    assert greedy.token_ids[-1] == tokenizer.eos_token_id  # the turn ends at EOS, which is kept
    samples = await asyncio.gather(
        *[
            backend.complete_tokens(prompt, SamplingParams(temperature=1.0, max_tokens=64, seed=seed))
            for seed in range(4)
        ]
    )
    for completion in [greedy, *samples]:
        assert tokenizer.decode(completion.token_ids, skip_special_tokens=True) == completion.text
        assert len(completion.logprobs) == len(completion.token_ids)
        assert all(value <= 0.0 for value in completion.logprobs)


@pytest.mark.server
async def test_logprobs_are_of_the_sampling_distribution(backend, tokenizer) -> None:
    # The embedded server runs with --logprobs-mode processed_logprobs: with a nucleus of one token the
    # sampled token has probability 1 (raw model logprobs would be well below 0).
    prompt = chat_ids(tokenizer, LONG_QUESTION)
    completion = await backend.complete_tokens(prompt, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=16))
    assert all(value > -1e-3 for value in completion.logprobs)


@pytest.mark.server
async def test_small_max_tokens_finishes_with_length(backend, tokenizer) -> None:
    completion = await backend.complete_tokens(chat_ids(tokenizer, LONG_QUESTION), SamplingParams(max_tokens=3))
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == len(completion.logprobs) == 3


@pytest.mark.server
async def test_prompt_at_the_context_limit_gives_an_empty_length_completion(backend) -> None:
    completion = await backend.complete_tokens([198] * backend.max_model_len, SamplingParams(max_tokens=8))
    assert (completion.finish_reason, completion.token_ids) == ("length", [])


@pytest.mark.server
async def test_chat_fallback(backend) -> None:
    messages = [{"role": "user", "content": "What is 2+3?"}]
    completion = await backend.complete_chat(messages, SamplingParams(max_tokens=16, seed=0))
    assert completion.text.strip()
    assert completion.finish_reason in ("stop", "length")
    assert completion.token_ids is None
    assert 0 < completion.num_tokens <= 16  # the server's count: the token budget holds on this path too


@pytest.mark.server
async def test_requests_move_off_a_dead_server(embedded_server, tokenizer) -> None:
    dead = f"http://127.0.0.1:{unused_port()}/v1"
    async with OpenAIBackend(
        [dead, embedded_server.base_url], embedded_server.model, supports_token_ids=True, backoff_s=0.1
    ) as backend:
        prompt = chat_ids(tokenizer, "What is 2+3?")
        completions = await asyncio.gather(
            *[backend.complete_tokens(prompt, SamplingParams(max_tokens=4, seed=seed)) for seed in range(4)]
        )
    assert all(len(completion.token_ids) >= 1 for completion in completions)


@pytest.mark.server
async def test_a_generation_the_server_aborted_is_retried(backend, tokenizer, monkeypatch) -> None:
    """vLLM answers an aborted request with HTTP 200 and finish_reason "abort": that is retried, not fatal."""
    real_post, answers = backend._client.post, []

    async def first_one_aborted(url: str, **kwargs):
        response = await real_post(url, **kwargs)
        if url.endswith("/v1/completions") and not answers:
            body = response.json()
            body["choices"][0]["finish_reason"] = "abort"
            response = httpx.Response(200, json=body, request=response.request)
        answers.append(response.json()["choices"][0]["finish_reason"])
        return response

    monkeypatch.setattr(backend._client, "post", first_one_aborted)
    backend.backoff_s = 0.05
    completion = await backend.complete_tokens(chat_ids(tokenizer, "What is 2+3?"), SamplingParams(max_tokens=4))
    assert answers[0] == "abort" and answers[1] in ("stop", "length") and len(answers) == 2
    assert completion.finish_reason in ("stop", "length") and completion.token_ids


@pytest.mark.server
async def test_unknown_model_name_is_one_clear_line(embedded_server) -> None:
    with pytest.raises(ServerError, match="does not serve model 'no-such-model'") as caught:
        await OpenAIBackend.connect([embedded_server.base_url], "no-such-model")
    assert "\n" not in str(caught.value)


async def test_unreachable_url_fails_fast_with_one_line() -> None:
    url = f"http://127.0.0.1:{unused_port()}/v1"
    started = time.monotonic()
    with pytest.raises(ServerError) as caught:
        await OpenAIBackend.connect([url])
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "\n" not in message and url.removesuffix("/v1") in message and "mathtool serve" in message


def test_taken_port_is_an_error_and_port_zero_picks_a_free_one() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {taken} on 127.0.0.1 is already in use"):
            resolve_port("127.0.0.1", taken)
    assert resolve_port("127.0.0.1", 0) > 0


@pytest.mark.slow
def test_server_that_exits_while_starting_fails_fast_with_its_log(tmp_path: Path) -> None:
    spec = ServerSpec(model=str(tmp_path / "no-such-model"), port=0)
    started = time.monotonic()
    with pytest.raises(ServerError, match="exited with code") as caught:
        start_server(spec, log_path=tmp_path / "server.log", startup_timeout_s=300)
    assert time.monotonic() - started < 120
    first_line, *log_tail = str(caught.value).splitlines()
    assert str(tmp_path / "server.log") in first_line and log_tail


@pytest.mark.server
async def test_server_killed_mid_run_raises_server_error(tokenizer, tmp_path: Path) -> None:
    server = start_server(embedded_spec(port=0), log_path=tmp_path / "victim.log")
    try:
        async with await OpenAIBackend.connect([server.base_url], max_retries=2, backoff_s=0.2) as backend:
            prompt = chat_ids(tokenizer, LONG_QUESTION)
            params = SamplingParams(max_tokens=2000)
            requests = [asyncio.create_task(backend.complete_tokens(prompt, params)) for _ in range(4)]
            await asyncio.sleep(1.0)
            assert not any(request.done() for request in requests)
            os.killpg(server.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), timeout=60)
        assert time.monotonic() - killed < 30
        for result in results:
            assert isinstance(result, ServerError) and "\n" not in str(result)
    finally:
        server.stop()


@pytest.mark.slow
async def test_llamacpp_serves_the_embedded_gguf_and_the_agent_runs_on_the_chat_path(tmp_path: Path) -> None:
    """llama.cpp (llama-cpp-python's server) takes no token-id prompts: the probe finds that, and the agent
    loop falls back to chat completions, where the server's token counts still bound the response."""
    problem = Problem("mul", "Use Python to compute 123456 * 654321. Give the answer in \\boxed{}.", "80779853376")
    config = AgentConfig(chat=ChatFormat(MARKDOWN), max_turns=3, max_response_length=120,
                         sampling=SamplingParams(temperature=0.8, top_p=0.95))
    server = start_server(embedded_spec(port=0, engine="llamacpp"), log_path=tmp_path / "llamacpp.log")
    try:
        async with await OpenAIBackend.connect([server.base_url]) as backend, PythonSandbox() as sandbox:
            assert backend.model == EMBEDDED_MODEL_NAME and backend.supports_token_ids is False
            runs = await asyncio.gather(*[run_agent(problem, s, backend, sandbox, config) for s in range(4)])
    finally:
        server.stop()
    for run in runs:
        assert run.error is None and run.completion_ids is None and run.messages[2]["role"] == "assistant"
        assert 0 < run.response_tokens <= config.max_response_length
        assert run.num_turns >= 1 and run.termination in ("answered", "stopped", "budget", "max_turns")


def test_engine_mistakes_are_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="give sglang a --model"):
        embedded_spec(engine="sglang")
    with pytest.raises(ConfigError, match="unknown server engine 'tgi'"):
        embedded_spec(engine="tgi")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"serves a \.gguf file"):
        server_command(ServerSpec(model="Qwen/Qwen3-4B", engine="llamacpp", port=1))
    assert embedded_spec(engine="llamacpp").model.endswith(".gguf")
