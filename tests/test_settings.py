"""Bad settings from a config file are one line naming the key, for eval as for train (one validation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mathtool.engine.settings import resolve
from mathtool.errors import ConfigError


@pytest.mark.parametrize(("text", "message"), [
    ('n_samples: "abc"', "n_samples must be an integer"),
    ("n_samples: [1, 2]", "n_samples must be an integer"),
    ("n_samples: 2.7", "n_samples must be an integer"),
    ("n_samples: 1e400", "n_samples must be an integer"),
    ('temperature: "hot"', "temperature must be a number"),
    ("temperature: .inf", "temperature must be a number"),
    ("top_p: null", "top_p must not be empty"),
    ('limit: "x"', "limit must be an integer"),
    ("base_url: 5", "base_url must be a list of strings"),
    ("base_url: [5]", "base_url must be a list of strings"),
    ("dataset: [1]", "dataset must be a string"),
    ('resume: "no"', "resume must be true or false"),
    ("thinking: maybe", "thinking must be true or false"),
    ("a: [", "not valid YAML"),
])
def test_bad_eval_config_values_are_one_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        resolve(path, {})


def test_the_cli_shows_it_as_one_line_for_eval_and_train(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: [\n")
    for command in (["eval", "--config", str(path)], ["train", "--config", str(path)]):
        result = subprocess.run([sys.executable, "-m", "mathtool.cli", *command], capture_output=True, text=True,
                                timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "not valid YAML" in lines[0], result.stderr


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathtool.cli", "eval", *args], capture_output=True, text=True,
                          timeout=120)


def test_output_mistakes_are_refused_before_the_embedded_server_starts(tmp_path: Path, shared_data: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("MATHTOOL_HOME", str(tmp_path / "home"))  # the dataset registers here, not in ~/.cache

    run = tmp_path / "run"
    run.mkdir()
    (run / "trajectories.jsonl").write_text('{"problem_id": "p", "sample": 0}\n')
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for output, message in ((run, "already holds a run"), (a_file, "is a file")):
        started = time.monotonic()
        result = eval_cli("--dataset", "aime2024", "--source", str(shared_data), "--output", str(output))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert time.monotonic() - started < 60  # no vLLM server was started (that takes minutes)


def test_an_empty_run_directory_is_not_a_run(tmp_path: Path) -> None:
    from mathtool.run_record import check_output

    (tmp_path / "trajectories.jsonl").write_text("")  # a run that failed before its first trajectory
    check_output(tmp_path, resume=False)
    (tmp_path / "trajectories.jsonl").write_text('{"problem_id": "p", "sample": 0}\n')
    with pytest.raises(ConfigError, match="already holds a run"):
        check_output(tmp_path, resume=False)


@pytest.mark.parametrize(("text", "message"), [
    ('{"dataset": "toy", "n_sa', "is not valid JSON (Unterminated string starting at: line 1 column 20)"),
    ("[1, 2]", "is not a JSON object"),
])
def test_a_broken_run_config_is_one_line_naming_it_before_the_server_starts(tmp_path: Path, text: str,
                                                                           message: str) -> None:
    import time

    dataset = tmp_path / "toy.jsonl"
    dataset.write_text('{"problem": "What is 1+1?", "answer": "2"}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "trajectories.jsonl").write_text('{"problem_id": "p", "sample": 0}\n')
    (run / "config.json").write_text(text)  # a run killed while an older mathtool wrote it in place
    started = time.monotonic()
    result = eval_cli("--dataset", str(dataset), "--output", str(run), "--resume")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == f"error: {run / 'config.json'} {message}; repair or delete it"
    assert time.monotonic() - started < 60  # no vLLM server was started (that takes minutes)
