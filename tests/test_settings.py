"""Settings: one model per command gives the config-file keys, the flags, their help and their checks;
bad settings are one line naming the key, for eval as for train (one validation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from mathtool.cli import app
from mathtool.engine.settings import EMBEDDED_DEFAULTS, EvalSettings, Settings, flag_fields, resolve
from mathtool.errors import ConfigError
from mathtool.train.config import TrainConfig
from mathtool.train.config import resolve as resolve_train


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathtool.cli", "eval", *args], capture_output=True, text=True,
                          timeout=120)


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


@pytest.mark.parametrize(("text", "message"), [
    ("max_steps: 2.7", "max_steps must be an integer, not 2.7"),
    ('bf16: "no"', "bf16 must be true or false, not 'no'"),
    ("learning_rate: 1e-6", "learning_rate must be a number, not '1e-6' (YAML reads 1e-6 as text: write 1.0e-6)"),
    ("rollouts_per_problem: 1", "rollouts_per_problem must be at least 2, not 1"),
    ("temperature: 0", "temperature must be above 0.0, not 0"),
    ("tool_format: json", "tool_format must be one of hermes, markdown, not 'json'"),
])
def test_bad_train_config_values_are_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        resolve_train("cpu-demo", path, None)
    assert str(error.value) == message


def test_eval_precedence_defaults_embedded_file_flags(tmp_path: Path) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text("n_samples: 8\nmax_response_length: 100\ntemperature: 1\n")
    settings, notes = resolve(path, {"n_samples": 2, "seed": None})
    assert (settings.n_samples, settings.max_response_length, settings.temperature) == (2, 100, 1.0)
    assert settings.n_parallel_agents == EMBEDDED_DEFAULTS["n_parallel_agents"]  # no server given
    assert notes == [f"n_parallel_agents={EMBEDDED_DEFAULTS['n_parallel_agents']}"]
    served, notes = resolve(None, {"base_url": ["http://h:1/v1"]})
    assert notes == [] and served.n_parallel_agents == EvalSettings().n_parallel_agents == 64


def test_train_precedence_preset_file_flags(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("max_steps: 7\nmax_turns: 1\n")
    assert resolve_train("cpu-demo", None).max_steps == 30
    from_file = resolve_train("cpu-demo", path)
    assert (from_file.max_steps, from_file.max_turns, from_file.max_response_length) == (7, 1, 128)
    assert resolve_train("cpu-demo", path, {"max_steps": 3, "thinking": False}).max_steps == 3


@pytest.mark.parametrize(("command", "model"), [("eval", EvalSettings), ("train", TrainConfig)])
def test_each_flag_is_its_settings_field(command: str, model: type[Settings]) -> None:
    """Name, help and shown default come from the field; settings that are no flags make none."""
    click_command = typer.main.get_command(app).commands[command]
    options = {param.name: param for param in click_command.params}
    flags = flag_fields(model)
    for name, (field, _) in flags.items():
        option = options[name]
        assert option.opts == [f"--{name.replace('_', '-')}"] and option.default is None
        assert option.help.startswith(field.description.removesuffix("."))
        if isinstance(field.default, int | float) and not isinstance(field.default, bool):
            assert f"(default: {field.default}" in option.help
    assert not (set(model.model_fields) - set(flags)) & set(options)  # e.g. request_timeout_s: config file only
    assert options["thinking"].secondary_opts == ["--no-thinking"]
    assert command != "eval" or (options["resume"].secondary_opts == [] and options["base_url"].multiple)
    assert command != "eval" or "(default: 64; embedded 32)" in options["n_parallel_agents"].help


def test_a_bad_flag_is_one_line_before_any_server() -> None:
    result = eval_cli("--n-samples", "0", "--temperature", "0.5")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: n_samples must be at least 1, not 0"


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "--n-samples", "2.7"], "error: Invalid value for '--n-samples': Input should be a valid integer"),
    (["eval", "--bogus"], "error: No such option: --bogus (see `mathtool eval --help`)"),
    (["evl"], "error: No such command 'evl'. Did you mean 'eval'? (see `mathtool --help`)"),
    (["report"], "error: Missing argument 'run_dir'. (see `mathtool report --help`)"),
])
def test_a_usage_mistake_is_one_line_from_the_console_script(args: list[str], message: str) -> None:
    """The command-line parser's own errors (typer prints a box of several lines) are one line too."""
    result = subprocess.run([str(Path(sys.executable).parent / "mathtool"), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout, result.stderr


def test_the_cli_shows_it_as_one_line_for_eval_and_train(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: [\n")
    for command in (["eval", "--config", str(path)], ["train", "--config", str(path)]):
        result = subprocess.run([sys.executable, "-m", "mathtool.cli", *command], capture_output=True, text=True,
                                timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "not valid YAML" in lines[0], result.stderr


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


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-steps", "0"], "error: max_steps must be at least 1, not 0"),
    (["--generation", "tpu"], "error: generation must be one of transformers, vllm-server, vllm-colocate, not 'tpu'"),
])
def test_a_bad_train_setting_is_refused_before_torch_loads(tmp_path: Path, flags: list[str], message: str) -> None:
    """Loading torch and TRL takes seconds (more on a busy machine): a mistake in the settings is found first."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch was imported before the check')\n")
    src = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run([sys.executable, "-m", "mathtool.cli", "train", "--preset", "cpu-demo", *flags],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{src}"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == message
