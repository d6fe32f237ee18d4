"""Many run_agent() calls at once: a pool of workers, live progress, the run directory, resume."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.trajectory import Trajectory
from mathtool.data.problem import Problem
from mathtool.errors import ServerError
from mathtool.llm.base import LLMBackend
from mathtool.run_record import ERROR, RunDir
from mathtool.sandbox.base import Sandbox

log = logging.getLogger(__name__)


@dataclass
class _Stats:
    """What the progress line shows."""

    done: int = 0
    correct: int = 0
    tokens: int = 0
    tool_calls: int = 0
    errors_in_a_row: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, traj: Trajectory) -> None:
        self.done += 1
        self.correct += traj.correct
        self.tokens += traj.response_tokens
        self.tool_calls += traj.num_tool_calls
        self.errors_in_a_row = self.errors_in_a_row + 1 if traj.termination == ERROR else 0

    def line(self) -> str:
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        pass1 = self.correct / self.done if self.done else 0.0
        return f"pass@1 {pass1:.3f} | {rate:,.0f} tok/s | {self.tool_calls} tool calls"


def pending_jobs(problems: list[Problem], n_samples: int, finished: set[tuple[str, int]]) -> list[tuple[Problem, int]]:
    return [(p, s) for p in problems for s in range(n_samples) if (p.id, s) not in finished]


async def run_many(
    jobs: list[tuple[Problem, int]],
    llm: LLMBackend,
    sandbox: Sandbox,
    agent_config: AgentConfig,
    n_parallel: int,
    on_done: Callable[[Trajectory, _Stats], None],
    max_errors_in_a_row: int = 8,
    resume_hint: str = "rerun with --resume",
) -> _Stats:
    """Run `jobs` with `n_parallel` in flight, calling `on_done` as each finishes.

    A failed trajectory is passed on with its error. After `max_errors_in_a_row` failures in a row the
    server is taken to be gone: the run stops with a one-line ServerError ending in `resume_hint`.
    """
    queue: asyncio.Queue[tuple[Problem, int]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    stats = _Stats()

    async def worker() -> None:
        while True:
            try:
                problem, sample = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            traj = await run_agent(problem, sample, llm, sandbox, agent_config)
            stats.add(traj)
            on_done(traj, stats)
            if stats.errors_in_a_row >= max_errors_in_a_row:
                raise ServerError(f"{stats.errors_in_a_row} trajectories failed in a row (last: {traj.error}); "
                                  f"check the server, then {resume_hint}")

    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(n_parallel, len(jobs))))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return stats


async def run_pending(
    problems: list[Problem],
    n_samples: int,
    run_dir: RunDir,
    llm: LLMBackend,
    sandbox: Sandbox,
    agent_config: AgentConfig,
    n_parallel: int,
) -> _Stats:
    """Run every (problem, sample) not yet in `run_dir`, appending each trajectory as it finishes."""
    jobs = pending_jobs(problems, n_samples, run_dir.finished())
    total = len(problems) * n_samples
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns) as progress:
        bar = progress.add_task("eval", total=total, completed=total - len(jobs), info="")

        def on_done(traj: Trajectory, stats: _Stats) -> None:
            run_dir.append(traj.to_json())
            progress.update(bar, advance=1, info=stats.line())

        return await run_many(jobs, llm, sandbox, agent_config, n_parallel, on_done,
                              resume_hint=f"rerun with --resume --output {run_dir.path}")
