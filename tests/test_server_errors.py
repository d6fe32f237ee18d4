"""A model server that answers 200 with something other than the OpenAI shape, or that is gone: one clear line.

The broken server is a tiny local HTTP server answering fixed wrong bodies: it stands for a broken server,
which is the input under test (the real vLLM path is tested in test_serve, test_eval and test_routing).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mathtool.agent.chat_format import ChatFormat
from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.parsers import MARKDOWN
from mathtool.data.problem import Problem
from mathtool.errors import ServerError
from mathtool.llm import OpenAIBackend, SamplingParams
from mathtool.run_record import ERROR
from mathtool.sandbox import PythonSandbox

MODEL_LIST = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "vllm"}]})
HTML = "<!doctype html>\n<html><body><h1>It works!</h1></body></html>"


class BrokenServer:
    """Answers each path with a fixed body and HTTP 200; counts the requests per path."""

    def __init__(self) -> None:
        self.bodies: dict[str, str] = {"/v1/models": MODEL_LIST}
        self.requests: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = server.bodies.get(self.path, "").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.http.server_address[1]}"


@pytest.fixture
def broken_server() -> Iterator[BrokenServer]:
    server = BrokenServer()
    thread = threading.Thread(target=server.http.serve_forever, daemon=True)
    thread.start()
    yield server
    server.http.shutdown()
    server.http.server_close()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "easy.jsonl"
    path.write_text("".join(json.dumps({"id": f"add-{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)})
                            + "\n" for i in range(1, 4)))
    return path


def eval_error(base_url: str, dataset: Path, output: Path) -> str:
    """`mathtool eval` against `base_url`: checks it exits 2 with one `error:` line and no traceback;
    returns that line."""
    result = subprocess.run([sys.executable, "-m", "mathtool.cli", "eval", "--dataset", str(dataset), "--base-url",
                             base_url, "--output", str(output)], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    assert not output.exists(), "the run directory was made before the server was checked"
    return lines[0]


@pytest.mark.parametrize("body, shown", [
    (HTML, "<!doctype html> <html><body><h1>It works!</h1></body></html>"),
    ('[{"id": "m"}]', '[{"id": "m"}]'),
    ('{"data": 5}', '{"data": 5}'),
    ('{"data": [5]}', '{"data": [5]}'),
])
def test_a_model_list_of_the_wrong_shape_stops_the_run_with_one_line(broken_server, dataset, tmp_path, body,
                                                                     shown) -> None:
    broken_server.bodies["/v1/models"] = body
    line = eval_error(broken_server.root + "/v1", dataset, tmp_path / "run")
    assert f"{broken_server.root}/v1/models answered 200 with something other than an OpenAI model list" in line
    assert f"({shown})" in line


def test_a_completion_of_the_wrong_shape_at_the_probe_stops_the_run_with_one_line(broken_server, dataset,
                                                                                 tmp_path) -> None:
    broken_server.bodies["/v1/completions"] = '{"choices": []}'
    line = eval_error(broken_server.root + "/v1", dataset, tmp_path / "run")
    assert f'{broken_server.root}/v1/completions answered 200 with no choices: {{"choices": []}}' in line


@pytest.mark.parametrize("body, problem", [
    ("Internal error", "something other than a JSON object: Internal error"),
    ('{"choices": [null]}', 'a first choice without its text: {"choices": [null]}'),
    ('{"choices": []}', 'no choices: {"choices": []}'),
    ('{"choices": [{"finish_reason": "stop"}]}', 'a first choice without its text: {"choices": [{"finish_reason": '
                                                 '"stop"}]}'),
    ('{"choices": [{"text": "4"}], "usage": 5}', 'a usage that is not an object: {"choices": [{"text": "4"}], '
                                                '"usage": 5}'),
    ("x" * 1000, "something other than a JSON object: " + "x" * 200 + "..."),
])
async def test_a_completion_of_the_wrong_shape_fails_its_request_with_one_line(broken_server, body,
                                                                               problem) -> None:
    broken_server.bodies["/v1/completions"] = body
    async with OpenAIBackend([broken_server.root], "m", supports_token_ids=True) as llm:
        with pytest.raises(ServerError) as caught:
            await llm.complete_tokens([1, 2, 3], SamplingParams(max_tokens=4))
    assert str(caught.value) == f"{broken_server.root}/v1/completions answered 200 with {problem}"
    assert broken_server.requests["/v1/completions"] == 1  # not retried: the server answered, wrongly


@pytest.mark.parametrize("tokens", [
    '"token_ids": ["4"], "logprobs": {"token_logprobs": [-0.1]}',  # ids that are not integers
    '"token_ids": [true], "logprobs": {"token_logprobs": [-0.1]}',
    '"token_ids": [19], "logprobs": {"token_logprobs": [null]}',  # a logprob that is no number
    '"token_ids": [19], "logprobs": [-0.1]',  # logprobs not an object
    '"token_ids": [19, 20], "logprobs": {"token_logprobs": [-0.1]}',  # not one per id
    '"token_ids": 19, "logprobs": {"token_logprobs": -0.1}',
])
async def test_token_ids_or_logprobs_of_the_wrong_shape_fail_the_request_with_one_line(broken_server,
                                                                                      tokens) -> None:
    broken_server.bodies["/v1/completions"] = f'{{"choices": [{{"text": "4", "finish_reason": "stop", {tokens}}}]}}'
    async with OpenAIBackend([broken_server.root], "m", supports_token_ids=True) as llm:
        with pytest.raises(ServerError) as caught:
            await llm.complete_tokens([1, 2, 3], SamplingParams(max_tokens=4))
    assert str(caught.value) == ("the server returned no token ids, or not one numeric logprob per integer id; "
                                 "serve the model with vLLM, or use the chat path")


@pytest.mark.parametrize(("body", "problem"), [
    ('{"choices": [{"message": "4", "finish_reason": "stop"}]}', "a first choice without its message"),
    ('{"choices": [{"message": {"content": 4}, "finish_reason": "stop"}]}', "a message whose content is not text"),
])
async def test_a_chat_completion_of_the_wrong_shape_is_recorded_in_the_trajectory(broken_server, body,
                                                                                  problem) -> None:
    broken_server.bodies["/v1/chat/completions"] = body
    config = AgentConfig(chat=ChatFormat(MARKDOWN), max_turns=2, max_response_length=64)
    async with OpenAIBackend([broken_server.root], "m") as llm, PythonSandbox(timeout_s=5) as sandbox:
        traj = await run_agent(Problem("add", "What is 2 + 2?", "4"), 0, llm, sandbox, config)
    assert traj.termination == ERROR
    assert traj.error == f"{broken_server.root}/v1/chat/completions answered 200 with {problem}: {body}"


def dead_url() -> str:
    """A URL on which nothing listens (connections are refused, as after a server died)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/v1"


async def test_requests_to_a_gone_server_fail_at_once_not_after_every_retry() -> None:
    """64 trajectories' requests to a server that is gone: each fails after one health check, not after
    five attempts with backoff (0.25-0.5 + 0.5-1 + 1-2 + 2-4 s before)."""
    url = dead_url()
    async with OpenAIBackend([url], "m", supports_token_ids=True) as llm:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *[llm.route(i).complete_tokens([1, 2, 3], SamplingParams(max_tokens=4)) for i in range(64)],
            return_exceptions=True)
        took = time.monotonic() - started
        later = time.monotonic()
        with pytest.raises(ServerError):  # a new request fails at once too
            await llm.complete_tokens([1, 2, 3], SamplingParams(max_tokens=4))
        took_later = time.monotonic() - later
    assert all(isinstance(outcome, ServerError) for outcome in outcomes)
    message = str(outcomes[0])
    assert message.startswith(f"the model server is gone: {url.removesuffix('/v1')} does not answer /v1/models")
    assert "\n" not in message
    assert took < 1.5 and took_later < 0.1, (took, took_later)
