"""End to end on real parts: the embedded vLLM server, the sandbox, the grader, the run directory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
from server_proxy import CuttableProxy

from mathtool.agent.chat_format import ChatFormat, chat_setup
from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.parsers import MARKDOWN
from mathtool.data.problem import Problem
from mathtool.llm import OpenAIBackend, SamplingParams
from mathtool.run_record import CONTEXT
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
    config = AgentConfig(chat=chat_setup(tokenizer, None, None, MARKDOWN), max_turns=3, max_response_length=400,
                         context_length=4096, sampling=SamplingParams(temperature=0.8, top_p=0.95))

    async def run_all() -> list:
        async with OpenAIBackend([embedded_server.base_url], embedded_server.model, supports_token_ids=True) as llm:
            async with PythonSandbox(timeout_s=5) as sandbox:
                runs = [run_agent(TOOL_PROBLEM, s, llm, sandbox, config) for s in range(24)]
                return await asyncio.gather(*runs)

    return asyncio.run(run_all())


async def test_a_prompt_past_the_context_on_the_chat_path_ends_as_context(embedded_server) -> None:
    """The chat path cannot count tokens before sending; vLLM's refusal (HTTP 400) ends the trajectory the way
    the token path ends one, not as a failure to redo on resume."""
    problem = Problem("long", "What is 1 + 1? " * 700, "2")  # ~5,600 tokens; the embedded context is 4,096
    config = AgentConfig(chat=ChatFormat(MARKDOWN), max_turns=2, max_response_length=64)
    async with OpenAIBackend([embedded_server.base_url], embedded_server.model) as llm:
        async with PythonSandbox(timeout_s=5) as sandbox:
            traj = await run_agent(problem, 0, llm, sandbox, config)
    assert (traj.termination, traj.error, traj.num_turns) == (CONTEXT, None, 0)


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
    with_tools = [t for t in tool_trajectories if t.num_tool_calls > 0]
    assert with_tools, "no trajectory called the tool: no tool output to check the mask on"
    for traj in with_tools:
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


@pytest.fixture
def easy_problems(tmp_path: Path) -> Path:
    rows = [{"id": f"add-{i}", "question": f"What is {i} + {i * 3}?", "answer": str(4 * i)} for i in range(1, 4)]
    path = tmp_path / "easy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_args(url: str, dataset: Path, output: Path, n_samples: int = 4) -> list[str]:
    return ["eval", "--dataset", str(dataset), "--base-url", url, "--n-samples", str(n_samples),
            "--n-parallel-agents", "4", "--max-response-length", "200", "--output", str(output)]


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


def test_server_dying_mid_run_is_one_line_then_resumed(embedded_server, easy_problems, tmp_path) -> None:
    """The server dies right after the first trajectory is written (23 of 24 left, 4 in flight): the run stops
    soon with one line saying to resume, and the resumed run finishes every trajectory exactly once."""
    proxy = CuttableProxy(int(embedded_server.base_url.rsplit(":", 1)[1].split("/")[0]))
    proxy.start()
    out = tmp_path / "run"
    args = eval_args(proxy.url, easy_problems, out, n_samples=8)
    process = subprocess.Popen([sys.executable, "-m", "mathtool.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for_lines(out / "trajectories.jsonl", 1, process)
    proxy.cut()
    cut_at = time.monotonic()
    _, stderr = process.communicate(timeout=300)  # ends by itself: no hang
    death_to_exit = time.monotonic() - cut_at
    finished = [r for r in raw_records(out / "trajectories.jsonl") if r["termination"] != "error"]
    assert len(finished) < 24  # the run was cut while work remained
    assert process.returncode == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if "chat completions" not in line]  # the start notice
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error:") and f"--resume --output {out}" in lines[0] and "is gone" in lines[0], stderr
    assert death_to_exit < 5, f"{death_to_exit:.1f} s from the server's death to the run's end"  # was ~7 s
    proxy.start()
    result = mathtool(*args, "--resume")
    proxy.cut()
    assert result.returncode == 0, result.stderr
    records = raw_records(out / "trajectories.jsonl")
    final = {(r["problem_id"], r["sample"]): r for r in records}
    assert len(final) == 24 and all(r["termination"] != "error" for r in final.values())
    assert set(Counter((r["problem_id"], r["sample"]) for r in records if r["termination"] != "error").values()) == {1}


def test_unreachable_base_url_is_one_clear_line(easy_problems, tmp_path) -> None:
    result = mathtool(*eval_args("http://127.0.0.1:9/v1", easy_problems, tmp_path / "run"), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "127.0.0.1:9" in lines[0], result.stderr
