"""Training with several processes: two, on CPU (DDP over gloo), launched as a user launches them, and the
checks that a process count fits the settings (qwen3-4b's GPU layouts included, as arithmetic).

The two-process run trains a tiny random Llama with the embedded model's tokenizer: the test is about the
mechanics, not learning, and the embedded model would take minutes a step on two shared cores. Its output
layer is set so that each answer ends after a random number of tokens (about one in six is EOS), and the
reward is the overlong penalty over the whole budget (minus the share of the budget used), so rewards vary
within a group. Of the three training problems, one has a prompt over max_prompt_length: its rollouts end
before any model call, with reward 0, so its group's rewards are all equal. Each step takes all three
problems x 4 rollouts = 12 trajectories, 6 per process: the middle group is split across the processes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mathtool.errors import ConfigError
from mathtool.train.config import TrainConfig, resolve
from mathtool.train.monitor import METRICS_FILE, TRAJECTORIES_FILE, read_rows
from mathtool.train.trainer import check_processes

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "configs" / "accelerate" / "cpu-2-processes.yaml"
PROCESSES, PROBLEMS, ROLLOUTS, BUDGET = 2, 3, 4, 16


def _random_length_model(path: Path) -> Path:
    """A 2-layer random Llama that ends its answers at random: one coordinate of every token embedding is large,
    so the last hidden state is nearly constant along it, and only EOS's output row reads it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mathtool.serve.embedded import ensure_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    eos_odds = 1 / 5  # P(EOS) = 1/6 a token
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = math.log(eos_odds * len(tokenizer)) / math.sqrt(32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_settings(directory: Path) -> Path:
    problems = directory / "problems.jsonl"
    rows = [{"id": "add", "problem": "Use Python to compute 20 + 22.", "answer": "42"},
            {"id": "mul", "problem": "Use Python to compute 6 * 9.", "answer": "54"},
            {"id": "long", "problem": "Compute 1 + 1. " + "This sentence only makes the prompt long. " * 4,
             "answer": "2"}]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = {
        "model": str(_random_length_model(directory / "model")), "dataset": str(problems), "max_turns": 1,
        "max_prompt_length": 100, "max_response_length": BUDGET, "temperature": 1.0,
        "problems_per_step": PROBLEMS, "rollouts_per_problem": ROLLOUTS, "micro_batch_size": 6,
        "learning_rate": 1e-3, "reward_correct": 1.0, "overlong_buffer": BUDGET, "n_parallel_agents": 8,
        "eval_dataset": str(problems), "eval_limit": 2, "save_every": 1, "max_steps": 2,
    }
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _launch(settings: Path, output: Path, *flags: str) -> None:
    """`accelerate launch --config_file configs/accelerate/cpu-2-processes.yaml mathtool train ...`, as a user runs
    it on a machine without a GPU (and on CPU where there is one); the processes import this checkout."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
               "-m", "mathtool.cli", "train", "--config", str(settings), "--output", str(output), *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    if torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the settings file, the output of two steps with two processes)."""
    directory = tmp_path_factory.mktemp("two-processes")
    settings = _write_settings(directory)
    _launch(settings, directory / "run")
    return settings, directory / "run"


def _weight_norm(checkpoint: Path) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return float(sum(p.detach().double().square().sum() for p in model.parameters()).sqrt())


@pytest.mark.slow
def test_each_process_rolls_out_its_share_and_groups_are_scored_whole(run: tuple[Path, Path]) -> None:
    rows = read_rows(run[1] / METRICS_FILE)
    for row in rows:
        # 12 trajectories, 6 from each process, in 3 groups of 4: had a process rolled out every prompt, or the
        # same ones as the other, the counts would differ; had the statistics been taken per process, the
        # group split across the two would count twice.
        assert row["trajectories"] == PROBLEMS * ROLLOUTS and row["groups"] == PROBLEMS
        assert row["trajectories_per_process"] == [PROBLEMS * ROLLOUTS // PROCESSES] * PROCESSES
        assert row["terminations"]["context"] == ROLLOUTS  # the long problem's whole group, and no other
        assert row["reward_std"] > 0 and row["zero_advantage_groups"] >= 1
        # TRL computes advantages over the rewards gathered from both processes, in groups of 4 in order; they
        # are the problems' groups: as many have rewards all equal as the trajectories say.
        assert row["frac_reward_zero_std"] * PROBLEMS == pytest.approx(row["zero_advantage_groups"])
    written = Counter((t["step"], t["process"]) for t in read_rows(run[1] / TRAJECTORIES_FILE))
    assert written == {(row["step"], p): PROBLEMS * ROLLOUTS // PROCESSES for row in rows for p in range(PROCESSES)}


@pytest.mark.slow
def test_processes_hold_the_same_weights_and_the_checkpoint_is_them(run: tuple[Path, Path]) -> None:
    rows = read_rows(run[1] / METRICS_FILE)
    norms = [row["weight_norm_per_process"] for row in rows]
    assert all(len(n) == PROCESSES and len(set(n)) == 1 for n in norms), norms  # bit for bit
    assert norms[0][0] != norms[1][0]  # and a step changes them
    for row in rows:
        assert _weight_norm(run[1] / f"checkpoint-{row['step']}") == pytest.approx(row["weight_norm_per_process"][0],
                                                                                   rel=1e-12)


@pytest.mark.slow
def test_only_the_main_process_writes(run: tuple[Path, Path]) -> None:
    output = run[1]
    assert [row["step"] for row in read_rows(output / METRICS_FILE)] == [1, 2]  # one row per step
    assert [p.name for p in sorted((output / "eval").iterdir())] == ["step-000002"]  # the last step's
    records = (output / "eval" / "step-000002" / "trajectories.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["problem_id"] for r in records) == ["add", "mul"]  # one from each process, once
    assert json.loads((output / "eval" / "step-000002" / "metrics.json").read_text())["num_trajectories"] == 2
    for step in (1, 2):
        checkpoint = output / f"checkpoint-{step}"
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
        assert {f"rng_state_{i}.pth" for i in range(PROCESSES)} <= {p.name for p in checkpoint.iterdir()}
    assert (output / "train_config.json").is_file() and (output / "reward_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_continues_across_processes(run: tuple[Path, Path], tmp_path: Path) -> None:
    settings, first = run
    output = tmp_path / "run"
    shutil.copytree(first, output)
    _launch(settings, output, "--resume", "--max-steps", "3")
    rows = read_rows(output / METRICS_FILE)
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[:2] == read_rows(first / METRICS_FILE)
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    norm = rows[2]["weight_norm_per_process"]
    assert len(set(norm)) == 1 and _weight_norm(output / "checkpoint-3") == pytest.approx(norm[0], rel=1e-12)


# The process count against the settings, checked before any model loads (no GPU needed: arithmetic).

def _accelerate_processes(name: str) -> int:
    return yaml.safe_load((REPO / "configs" / "accelerate" / name).read_text())["num_processes"]


def test_the_qwen3_4b_layouts_divide_as_trl_needs() -> None:
    colocate = resolve("qwen3-4b", None, None)
    check_processes(colocate, _accelerate_processes("qwen3-4b-8gpu.yaml"), gpus=8)
    server = resolve("qwen3-4b", REPO / "configs" / "qwen3-4b-server.yaml", None)
    assert server.generation == "vllm-server"
    check_processes(server, _accelerate_processes("qwen3-4b-4gpu-server.yaml"), gpus=None)  # gpu_ids set apart
    check_processes(server, 4, gpus=8)
    check_processes(changed(server, dynamic_sampling=True), 4, gpus=8)
    cpu_demo = resolve("cpu-demo", None, None)
    check_processes(changed(cpu_demo, dynamic_sampling=True), _accelerate_processes("cpu-2-processes.yaml"), None)


@pytest.mark.parametrize(
    ("changes", "processes", "gpus", "match"),
    [({}, 7, None, r"\(256\) must be a multiple of micro_batch_size x processes \(2 x 7\)"),
     ({"dynamic_sampling": True, "problems_per_step": 12}, 8, None, "multiple of the number of processes"),
     ({"generation": "vllm-server"}, 8, 8, "needs a GPU for `trl vllm-serve`"),
     ({"generation": "vllm-server", "vllm_server_url": "http://localhost:8000"}, 8, 8, "8 processes on 8 GPUs"),
     ({}, 8, 4, "vllm-colocate runs a vLLM engine in each process")],
)
def test_a_process_count_that_does_not_fit_is_one_line(changes: dict[str, Any], processes: int, gpus: int | None,
                                                       match: str) -> None:
    config = changed(resolve("qwen3-4b", None, None), **changes)
    with pytest.raises(ConfigError, match=match) as error:
        check_processes(config, processes, gpus)
    assert "\n" not in str(error.value)


def test_a_server_elsewhere_or_no_gpu_is_not_counted() -> None:
    server = changed(TrainConfig(), generation="vllm-server", problems_per_step=8, rollouts_per_problem=8)
    check_processes(changed(server, vllm_server_url="http://gpu-box-2:8000"), 8, gpus=8)  # another machine
    check_processes(server, 8, gpus=None)  # CPU, or CUDA_VISIBLE_DEVICES set the training GPUs apart


def changed(config: TrainConfig, **changes: Any) -> TrainConfig:
    return TrainConfig.from_values({**config.to_json(), **changes})
