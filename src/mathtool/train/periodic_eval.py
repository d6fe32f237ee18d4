"""Periodic evaluation of the policy on `eval_dataset` during training, through the engine (`run_many`).

Each process runs its share of the (problem, sample) jobs with the rollout's own backend; the first
process writes an evaluation run directory per step (`eval/step-NNNNNN/`) through the run record's RunDir,
with the same files `mathtool eval` writes, so `mathtool report` reads them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from mathtool.agent.loop import AgentConfig
from mathtool.agent.trajectory import Trajectory
from mathtool.data.problem import Problem
from mathtool.engine.runner import run_many
from mathtool.llm.base import LLMBackend
from mathtool.metrics.summary import compute_metrics
from mathtool.run_record import RunDir
from mathtool.train.rollout import gather_rows
from mathtool.train.runtime import AgentRuntime

log = logging.getLogger(__name__)


class PeriodicEval:
    """The policy evaluated on `eval_dataset`, every `eval_every` steps (called by `TrainingMonitor`)."""

    def __init__(
        self,
        problems: list[Problem],
        samples: int,
        runtime: AgentRuntime,
        agent_config: AgentConfig,
        n_parallel: int,
        output: Path,
    ) -> None:
        self.jobs = [(p, s) for p in problems for s in range(samples)]
        self.samples, self.runtime = samples, runtime
        self.agent_config, self.n_parallel, self.output = agent_config, n_parallel, output

    def __call__(self, step: int, backend: LLMBackend, accelerator: Any) -> dict[str, Any]:
        """Evaluate now; returns the metrics (pass@1, ...) on every process."""
        mine = self.jobs[accelerator.process_index :: accelerator.num_processes]
        records: list[dict[str, Any]] = []

        def on_done(traj: Trajectory, _stats: Any) -> None:
            records.append(traj.to_json())

        self.runtime.run(run_many(mine, backend, self.runtime.sandbox, self.agent_config, self.n_parallel, on_done))
        records = gather_rows(accelerator, records)
        metrics = compute_metrics(records, self.samples)
        if accelerator.is_main_process:
            self._write(step, records, metrics)
        log.info("evaluation at step %d: pass@1 %.3f", step, metrics.get("pass@1") or 0.0)
        return metrics

    def _write(self, step: int, records: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        run_dir = self.output / "eval" / f"step-{step:06d}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a step redone after --resume replaces its evaluation
        run = RunDir(run_dir, {"step": step, "n_samples": self.samples}, resume=False)
        try:
            for record in records:
                run.append(record)
            run.write_metrics({**metrics, "step": step})
        finally:
            run.close()
