"""--resume keeps what makes a trajectory: a changed setting is refused by name, before any server starts
where the flags already tell, and once the server has told the rest (model, token-exactness)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

UNREACHABLE = "http://127.0.0.1:9/v1"  # nothing listens there: reaching the server would fail differently


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathtool.cli", "eval", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def problems(tmp_path: Path) -> Path:
    path = tmp_path / "easy.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(3)))
    return path


def a_run(tmp_path: Path, problems: Path) -> Path:
    """A run directory as an earlier eval left it: its config.json and one trajectory."""
    run = tmp_path / "run"
    run.mkdir()
    config = {"dataset": str(problems), "model": "m", "token_exact": True, "tool_format": "markdown",
              "chat_template": None, "thinking": None, "max_turns": 5, "max_response_length": 768,
              "max_prompt_length": 2048, "temperature": 0.6, "top_p": 0.95, "seed": None, "n_samples": 4}
    (run / "config.json").write_text(json.dumps(config))
    (run / "trajectories.jsonl").write_text(json.dumps({"problem_id": "p0", "sample": 0, "termination": "answer"})
                                            + "\n")
    return run


@pytest.mark.parametrize(("flags", "setting"), [
    (["--temperature", "1.0"], "temperature 0.6 (now 1.0)"),
    (["--top-p", "0.5"], "top_p 0.95 (now 0.5)"),
    (["--max-turns", "2"], "max_turns 5 (now 2)"),
    (["--chat-template", "qwen3"], "chat_template None (now 'qwen3')"),
    (["--no-thinking"], "thinking None (now False)"),
    (["--seed", "3"], "seed None (now 3)"),
    (["--model", "other"], "model 'm' (now 'other')"),
])
def test_a_changed_setting_is_refused_by_name_before_the_server(tmp_path: Path, problems: Path, flags: list[str],
                                                                 setting: str) -> None:
    run = a_run(tmp_path, problems)
    before = (run / "trajectories.jsonl").read_text()
    started = time.monotonic()
    result = eval_cli("--dataset", str(problems), "--base-url", UNREACHABLE, "--output", str(run), "--resume",
                      "--max-response-length", "768", *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and setting in lines[0] and "127.0.0.1:9" not in lines[0], lines[0]
    assert (run / "trajectories.jsonl").read_text() == before
    assert time.monotonic() - started < 60


def test_settings_that_do_not_change_a_trajectory_may_change(tmp_path: Path, problems: Path) -> None:
    run = a_run(tmp_path, problems)
    result = eval_cli("--dataset", str(problems), "--base-url", UNREACHABLE, "--output", str(run), "--resume",
                      "--max-response-length", "768", "--n-samples", "8", "--n-parallel-agents", "2")
    assert result.returncode == 2 and "127.0.0.1:9" in result.stderr  # got as far as the server


@pytest.mark.server
@pytest.mark.slow
def test_a_token_exact_run_is_not_resumed_on_the_chat_path(embedded_server, tmp_path: Path, problems: Path) -> None:
    run = tmp_path / "run"
    common = ["--dataset", str(problems), "--base-url", embedded_server.base_url, "--output", str(run),
              "--limit", "1", "--n-samples", "1", "--max-response-length", "48", "--max-turns", "1"]
    first = eval_cli(*common, "--tokenizer", str(embedded_server.model_dir))
    assert first.returncode == 0, first.stderr
    assert json.loads((run / "config.json").read_text())["token_exact"] is True
    before = (run / "trajectories.jsonl").read_text()

    resumed = eval_cli(*common, "--resume", "--n-samples", "2")  # no tokenizer: the chat path
    lines = resumed.stderr.strip().splitlines()
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    assert any("chat completions" in line and "--tokenizer" in line for line in lines), resumed.stderr
    assert lines[-1].startswith("error:") and "token_exact True (now False)" in lines[-1], lines[-1]
    assert (run / "trajectories.jsonl").read_text() == before
    assert json.loads((run / "config.json").read_text())["token_exact"] is True
