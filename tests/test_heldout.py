"""The loop closed: training never sees the held-out arithmetic split, writes it beside its checkpoints, and
`mathtool eval --model CKPT` serves a checkpoint on vLLM and scores it there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mathtool.agent.parsers import HERMES, MARKDOWN
from mathtool.data import load_problems
from mathtool.train.curriculum import MAX_PROBLEMS, arithmetic_problems, heldout_problems, write_heldout


def expression(problem_text: str) -> str:
    return problem_text.rsplit("compute ", 1)[1].split(".")[0]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_training_never_draws_a_held_out_problem(seed: int) -> None:
    training = {expression(p.problem) for p in arithmetic_problems(MAX_PROBLEMS, seed)}  # the whole split
    held_out = {expression(p.problem) for p in heldout_problems(MARKDOWN)}
    assert len(training) == MAX_PROBLEMS and len(held_out) == 100
    assert not training & held_out


def test_the_held_out_file_is_a_dataset_in_the_runs_prompt_format(tmp_path: Path) -> None:
    path = tmp_path / "heldout.jsonl"
    write_heldout(path, HERMES)
    problems = load_problems(str(path))
    assert [p.id for p in problems] == [p.id for p in heldout_problems(HERMES)]
    assert all("<tool_call>" in p.problem for p in problems)
    assert all(p.examples == heldout_problems(HERMES)[0].examples != () for p in problems)  # as in training
    assert all(str(eval(expression(p.problem))) == p.answer for p in problems)  # noqa: S307 (our own digits)


@pytest.mark.server
@pytest.mark.slow
def test_a_trained_checkpoint_is_served_and_scored_on_the_held_out_split(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"max_response_length": 24, "max_turns": 1, "problems_per_step": 2,
                                      "rollouts_per_problem": 2, "micro_batch_size": 2, "generation_batch_size": 4,
                                      "save_every": 1}))
    run = tmp_path / "train"
    trained = subprocess.run([sys.executable, "-m", "mathtool.cli", "train", "--preset", "cpu-demo", "--config",
                              str(config), "--max-steps", "1", "--output", str(run)],
                             capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoint = run / "checkpoint-1"
    assert (checkpoint / "config.json").is_file() and (run / "heldout.jsonl").is_file()

    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "mathtool.cli", "eval", "--model", str(checkpoint), "--dataset",
                             str(run / "heldout.jsonl"), "--limit", "2", "--n-samples", "2", "--max-turns", "1",
                             "--max-response-length", "24", "--output", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Pass@1" in result.stdout
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["model"] == str(checkpoint) and resolved["token_exact"] is True
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["problem_id"] for r in records} == {"heldout-00000", "heldout-00001"}
    assert all(r["termination"] != "error" for r in records), [r.get("error") for r in records]
