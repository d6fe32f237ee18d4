"""End to end on real parts: the embedded vLLM server, the sandbox, the grader, the run directory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from mathtool.agent.chat_format import chat_setup
from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.parsers import MARKDOWN
from mathtool.data.problem import Problem
from mathtool.llm import OpenAIBackend, SamplingParams
from mathtool.sandbox import PythonSandbox

pytestmark = [pytest.mark.server, pytest.mark.slow]

TOOL_PROBLEM = Problem(
    "mul",
    "Use Python to compute 123456 * 654321. Write the code in a ```python block, then give the final "
    "answer in \\boxed{}.",
    "80779853376",
)


def mathtool(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathtool.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tokenizer(embedded_server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_server.model_dir)


@pytest.fixture(scope="module")
def tool_trajectories(embedded_server, tokenizer) -> list:
    """Trajectories of the real model on a problem that asks for code; some of them call the tool."""
    _, chat = chat_setup(tokenizer, None, None, MARKDOWN)
    config = AgentConfig(tool_format=MARKDOWN, max_turns=3, max_response_length=400, context_length=4096,
                         sampling=SamplingParams(temperature=0.8, top_p=0.95), chat=chat)

    async def run_all() -> list:
        async with OpenAIBackend([embedded_server.base_url], embedded_server.model, supports_token_ids=True) as llm:
            async with PythonSandbox(timeout_s=5) as sandbox:
                runs = [run_agent(TOOL_PROBLEM, s, llm, sandbox, config) for s in range(24)]
                return await asyncio.gather(*runs)

    return asyncio.run(run_all())


def runs_of(values: list[int], wanted: int) -> list[tuple[int, int]]:
    """[start, end) spans where values == wanted."""
    spans, start = [], None
    for i, v in enumerate([*values, None]):
        if v == wanted and start is None:
            start = i
        elif v != wanted and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_a_real_trajectory_calls_the_tool_and_reads_its_output(tool_trajectories) -> None:
    with_tools = [t for t in tool_trajectories if t.num_tool_calls > 0]
    assert with_tools, "the model never wrote a ```python block in 24 tries"
    for traj in with_tools:
        outputs = [m["content"] for m in traj.messages if m["role"] == "user" and m["content"].startswith("```output")]
        assert len(outputs) >= traj.num_tool_calls > 0
        assert traj.termination in ("answered", "stopped", "budget", "max_turns", "context")
        assert traj.error is None


def test_mask_is_one_exactly_on_model_tokens(tool_trajectories, tokenizer) -> None:
    for traj in [t for t in tool_trajectories if t.num_tool_calls > 0]:
        ids, mask, logprobs = traj.completion_ids, traj.completion_mask, traj.logprobs
        assert traj.token_exact and len(ids) == len(mask) == len(logprobs)
        assistant = [m["content"] for m in traj.messages if m["role"] == "assistant"]
        model_spans = runs_of(mask, 1)
        assert len(model_spans) == len(assistant)
        for (start, end), content in zip(model_spans, assistant, strict=True):
            assert tokenizer.decode(ids[start:end], skip_special_tokens=True) == content
            assert all(lp <= 0.0 for lp in logprobs[start:end])
        env_text = "".join(tokenizer.decode(ids[a:b]) for a, b in runs_of(mask, 0))
        for message in traj.messages[2:]:
            if message["role"] == "user":
                assert message["content"] in env_text  # tool output: all of it, and only with mask 0
        assert all(logprobs[i] == 0.0 for i, m in enumerate(mask) if m == 0)
        assert sum(mask) == traj.response_tokens


class CuttableProxy:
    """A TCP relay in front of the real server; `cut()` drops it like a dying server, `start()` brings it back."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = _free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def cut(self) -> None:
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self.conns = []


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def easy_problems(tmp_path: Path) -> Path:
    rows = [{"id": f"add-{i}", "question": f"What is {i} + {i * 3}?", "answer": str(4 * i)} for i in range(1, 4)]
    path = tmp_path / "easy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_args(url: str, dataset: Path, output: Path) -> list[str]:
    return ["eval", "--dataset", str(dataset), "--base-url", url, "--n-samples", "4", "--n-parallel-agents", "4",
            "--max-response-length", "200", "--output", str(output)]


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {count} lines")


def raw_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_resume_after_kill_loses_nothing_and_duplicates_nothing(embedded_server, easy_problems, tmp_path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mathtool.cli", *eval_args(embedded_server.base_url, easy_problems, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lines(out / "trajectories.jsonl", 3, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done_before = len(raw_records(out / "trajectories.jsonl"))
    assert done_before < 12, "the run finished before it could be killed"
    with (out / "trajectories.jsonl").open("a") as f:
        f.write('{"problem_id": "add-1", "sample": 3, "mess')  # torn last line
    result = mathtool(*eval_args(embedded_server.base_url, easy_problems, out), "--resume")
    failed = [r for r in raw_records(out / "trajectories.jsonl") if r["termination"] == "error"]
    if result.returncode != 0 and failed:
        # A trajectory that failed on its own (recorded with its error) is what --resume is for: say why, go on.
        warnings.warn(f"resumed run recorded failed trajectories: {[r['error'] for r in failed]}", stacklevel=1)
        result = mathtool(*eval_args(embedded_server.base_url, easy_problems, out), "--resume")
    assert result.returncode == 0, (result.stderr, [r["error"] for r in failed])
    records = raw_records(out / "trajectories.jsonl")
    finished = Counter((r["problem_id"], r["sample"]) for r in records if r["termination"] != "error")
    assert len(finished) == 12 and set(finished.values()) == {1}
    assert len(records) == 12 + len(failed)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_trajectories"] == 12 and metrics["num_problems"] == 3
    assert "Pass@1" in result.stdout and "Pass@4" in result.stdout


def test_server_dying_mid_run_is_recorded_then_resumed(embedded_server, easy_problems, tmp_path) -> None:
    proxy = CuttableProxy(int(embedded_server.base_url.rsplit(":", 1)[1].split("/")[0]))
    proxy.start()
    url, out = f"http://127.0.0.1:{proxy.port}/v1", tmp_path / "run"
    command = [sys.executable, "-m", "mathtool.cli", *eval_args(url, easy_problems, out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lines(out / "trajectories.jsonl", 2, process)
    proxy.cut()
    _, stderr = process.communicate(timeout=300)  # ends by itself: no hang
    records = raw_records(out / "trajectories.jsonl")
    errors = [r for r in records if r["termination"] == "error"]
    if len(records) < 12 or errors:
        assert process.returncode != 0
        assert "Traceback" not in stderr and "error" in stderr.lower()
    proxy.start()
    result = mathtool(*eval_args(url, easy_problems, out), "--resume")
    proxy.cut()
    assert result.returncode == 0, result.stderr
    final = {(r["problem_id"], r["sample"]): r for r in raw_records(out / "trajectories.jsonl")}
    assert len(final) == 12 and all(r["termination"] != "error" for r in final.values())
    finished = Counter((r["problem_id"], r["sample"]) for r in raw_records(out / "trajectories.jsonl")
                       if r["termination"] != "error")
    assert set(finished.values()) == {1}


def test_unreachable_base_url_is_one_clear_line(easy_problems, tmp_path) -> None:
    result = mathtool(*eval_args("http://127.0.0.1:9/v1", easy_problems, tmp_path / "run"), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "127.0.0.1:9" in lines[0], result.stderr
