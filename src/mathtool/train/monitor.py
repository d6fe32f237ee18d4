"""Per-step metrics (`metrics.jsonl`), the rollouts (`trajectories.jsonl`), the reward curve
(`reward_curve.png`) and periodic evaluation.

`trajectories.jsonl` gets a line per trajectory trained on, appended after each step by the main process
(every process's, gathered): `step`, `process`, `problem_id`, `sample`, `reward`, the grade, the
termination, `kept` (in the loss), timings and the conversation (`messages`); not the token ids.

One row per optimizer step:
- `reward_mean`, `reward_std` (over all trajectories of the step), `correct_mean`, `answered_mean`,
  `tool_calls_mean`, `response_tokens_mean` (model tokens), `zero_advantage_groups` of `groups`
  (groups whose rewards are all equal teach nothing), `masked` (trajectories kept out of the loss),
  `token_inexact`, `terminations`;
- TRL's `loss`, `grad_norm`, `learning_rate`;
- time: `time_step_s` (wall), `time_rollout_s` (wall, all agent loops), `time_update_s` (the rest:
  logprobs, loss, backward, optimizer), and `time_generation_s`, `time_tools_s`, `time_grading_s`, the
  seconds the trajectories spent in each, summed over trajectories (they overlap one another);
- `eval_pass@1` (and the other eval metrics) on evaluation steps;
- with several processes in mind: `trajectories_per_process` (how many of the step's trajectories each
  process rolled out: its share of TRL's generation batch), TRL's `frac_reward_zero_std` (the fraction of
  the groups TRL computed advantages over, after gathering every process's rewards, whose rewards are all
  equal: `zero_advantage_groups / groups` when TRL's groups are the problems' whole groups), and
  `weight_norm_per_process` (the L2 norm of the policy's weights on each process after the step, in float64:
  the same on every process under data parallelism, and the norm of the checkpoint saved at that step;
  absent under FSDP and DeepSpeed, whose processes hold shards);
- what the training algorithms removed, when they are on (all processes): `void_masked` (trajectories
  kept out of the loss for a void turn), `overlong_penalized` (trajectories the overlong penalty
  lowered), and for dynamic sampling `dynamic_dropped_groups` / `dynamic_dropped_trajectories` (equal-reward
  groups generated and not trained on), `dynamic_refill_groups` (groups generated to replace them),
  `dynamic_rounds` (extra generation rounds, the most of any process) and `dynamic_unfilled_groups`
  (equal-reward groups left in the batch when the rounds or the problems ran out).

With dynamic sampling the trajectory statistics describe the batch trained on, after the refill.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any

from transformers import TrainerCallback

from mathtool.paths import atomic_write_text
from mathtool.train.periodic_eval import PeriodicEval
from mathtool.train.rollout import AgentRollout, RolloutStats, gather_rows

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRAJECTORIES_FILE = "trajectories.jsonl"  # every rollout of every step, appended
CURVE_FILE = "reward_curve.png"


def rollout_metrics(stats: RolloutStats) -> dict[str, Any]:
    rows = stats.trajectories
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        groups[row["problem_id"]].append(row["reward"])

    def mean(key: str) -> float:
        return fmean(float(r[key]) for r in rows) if rows else 0.0

    def total(key: str) -> float:
        return round(sum(r.get(key, 0.0) for r in rows), 3)

    return {
        "reward_mean": mean("reward"),
        "reward_std": pstdev([r["reward"] for r in rows]) if rows else 0.0,
        "correct_mean": mean("correct"),
        "answered_mean": mean("answered"),
        "tool_calls_mean": mean("tool_calls"),
        "response_tokens_mean": mean("response_tokens"),
        "trajectories": len(rows),
        "groups": len(groups),
        "zero_advantage_groups": sum(len(set(g)) == 1 for g in groups.values()),
        "masked": sum(not r["kept"] for r in rows),
        "token_inexact": sum(not r["token_exact"] for r in rows),
        "terminations": dict(Counter(r["termination"] for r in rows)),
        "time_rollout_s": round(stats.wall_s, 3),
        "time_generation_s": total("generation_s"),
        "time_tools_s": total("tools_s"),
        "time_grading_s": total("grading_s"),
        "trajectories_per_process": _per_process(rows),
        **stats.counts,
    }


def _per_process(rows: list[dict[str, Any]]) -> list[int]:
    counts = Counter(r["process"] for r in rows)
    return [counts[i] for i in range(max(counts, default=-1) + 1)]


class TrainingMonitor(TrainerCallback):
    """Writes a metrics row per step, redraws the reward curve, runs the held-out evaluation when due."""

    def __init__(self, output: Path, rollout: AgentRollout, periodic_eval: PeriodicEval | None, eval_every: int,
                 trainer: Any) -> None:
        self.output, self.rollout, self.periodic_eval, self.eval_every = output, rollout, periodic_eval, eval_every
        self.trainer = trainer
        self._step_started = time.perf_counter()
        self._step_wall = 0.0
        self._eval: dict[str, Any] = {}

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_wall = time.perf_counter() - self._step_started
        step = state.global_step
        due = self.eval_every and step % self.eval_every == 0 or step >= state.max_steps
        if self.periodic_eval is not None and due and self.rollout.backend is not None:
            sync_vllm_weights(self.trainer)  # evaluate the policy of this step, not the last one
            metrics = self.periodic_eval(step, self.rollout.backend, self.trainer.accelerator)
            self._eval = {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        stats = self.rollout.take_stats()
        if not logs or "loss" not in logs or stats is None:
            return
        row = {"step": state.global_step, **rollout_metrics(stats)}
        row.update({k: logs[k] for k in ("loss", "grad_norm", "learning_rate", "frac_reward_zero_std") if k in logs})
        norms = weight_norms(self.trainer)
        if norms is not None:
            row["weight_norm_per_process"] = norms
        row["time_step_s"] = round(self._step_wall, 3)
        row["time_update_s"] = round(max(self._step_wall - stats.wall_s, 0.0), 3)
        row.update(self._eval)
        self._eval = {}
        if state.is_world_process_zero:
            append_rows(self.output / TRAJECTORIES_FILE, [{"step": row["step"], **t} for t in stats.trajectories])
            append_rows(self.output / METRICS_FILE, [row])
            plot_reward_curve(read_rows(self.output / METRICS_FILE), self.output / CURVE_FILE)
            log.info("step %d: reward %.3f, %.0f s", row["step"], row["reward_mean"], row["time_step_s"])


def sync_vllm_weights(trainer: Any) -> None:
    """Push the policy's current weights into TRL's vLLM engine or server, as TRL does itself only before
    the next rollout (on every process: the sync is collective)."""
    step = trainer.state.global_step
    if getattr(trainer, "use_vllm", False) and trainer._last_loaded_step != step:
        trainer.vllm_generation.sync_weights()
        trainer._last_loaded_step = step


def weight_norms(trainer: Any) -> list[float] | None:
    """The L2 norm of the policy's weights on each process, in float64, on every process (a collective call).
    None under FSDP and DeepSpeed, where each process holds a shard."""
    import torch
    from accelerate import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    with torch.no_grad():
        squares = [chunk.double().square().sum() for p in trainer.model.parameters()
                   for chunk in p.detach().reshape(-1).split(1 << 24)]  # in pieces: no float64 copy of a whole matrix
        norm = float(torch.stack(squares).sum().sqrt())
    return gather_rows(accelerator, [norm])


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_rows_until(path: Path, step: int) -> None:
    """On resume: drop the rows of steps after the checkpoint, which are about to be redone (and a line
    torn by a crash); the rest are kept as written."""
    if not path.exists():
        return

    def before(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if before(line)]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_reward_curve(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["reward_mean"] for r in rows], color="#bbbbbb", label="reward (step)")
    ax.plot(steps, _running_mean([r["reward_mean"] for r in rows], 5), color="#4c72b0", label="reward (5-step mean)")
    for key, color in (("correct_mean", "#55a868"), ("answered_mean", "#dd8452"), ("tool_calls_mean", "#8172b3")):
        label = f"{key.removesuffix('_mean').replace('_', ' ')} (5-step mean)"
        ax.plot(steps, _running_mean([r[key] for r in rows], 5), color=color, linewidth=1, label=label)
    evals = [r for r in rows if "eval_pass@1" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_pass@1"] for r in evals], "o-", color="#c44e52",
                label="eval pass@1")
    ax.set(title="GRPO training", xlabel="step", ylabel="mean per trajectory")
    ax.legend(loc="best", fontsize=8)
    figure.savefig(path, dpi=100)


def _running_mean(values: list[float], window: int) -> list[float]:
    return [fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
