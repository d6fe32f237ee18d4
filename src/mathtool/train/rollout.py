"""The bridge to TRL: a `rollout_func` that runs our agent loop and hands TRL its tokens.

TRL 1.16 calls `rollout_func(prompts, trainer)` once per generation batch with this process's prompts;
its sampler has already repeated each prompt `num_generations` times, next to each other, so one
trajectory is run per entry, in order. The return value holds, per trajectory:

- `prompt_ids`: the first prompt as rendered with the chat template;
- `completion_ids`: everything after it, model turns and tool outputs, exactly as the model saw them;
- `logprobs`: the sampled tokens' logprobs under the rollout temperature (0.0 on non-model tokens);
- `env_mask`: 1 on model-generated tokens, 0 on tool output and template tokens (TRL's loss mask);
- `correct`, `answered`, `num_tool_calls`: passed on to the reward functions (`mathtool.train.rewards`).

Nothing is re-tokenized: the ids come from the generator through `Trajectory`. A trajectory cut by the
token budget or the context, one that failed, or one whose tokens are not exactly what the model saw
(`token_exact` False) can be kept out of the loss by zeroing its mask; it still counts in its group's
reward baseline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mathtool.agent import trajectory as T
from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.trajectory import Trajectory
from mathtool.data.problem import Problem
from mathtool.errors import ConfigError, DatasetError
from mathtool.llm.base import LLMBackend
from mathtool.train.rewards import RewardFn, total_reward
from mathtool.train.runtime import AgentRuntime

log = logging.getLogger(__name__)

TRUNCATED = (T.BUDGET, T.CONTEXT, T.ERROR)  # ended without the model finishing its turn
REWARD_FIELDS = ("correct", "answered", "num_tool_calls")


@dataclass(frozen=True)
class MaskPolicy:
    truncated: bool = True  # zero the mask of trajectories ending in TRUNCATED
    inexact: bool = True  # zero the mask of trajectories with token_exact False

    def keeps(self, traj: Trajectory) -> bool:
        return not (self.truncated and traj.termination in TRUNCATED or self.inexact and not traj.token_exact)


@dataclass
class RolloutStats:
    """What one rollout call produced, for the metrics row of its step (all processes)."""

    wall_s: float
    trajectories: list[dict[str, Any]] = field(default_factory=list)  # one summary per trajectory


def trl_sequences(traj: Trajectory, keep: bool, eos_id: int) -> tuple[list[int], list[int], list[float], list[int]]:
    """(prompt_ids, completion_ids, logprobs, env_mask) of one trajectory, as TRL takes them.

    TRL needs at least one completion token: an empty completion (an error before the first model
    call, or a prompt over max_prompt_length) becomes a single masked EOS.
    """
    if traj.prompt_ids is None or traj.completion_ids is None:
        raise ConfigError(f"trajectory {traj.problem_id}/{traj.sample} has no token ids; "
                          "training needs a generation backend that returns them")
    completion, mask = list(traj.completion_ids), list(traj.completion_mask or [])
    logprobs = list(traj.logprobs or [0.0] * len(completion))
    if not completion:
        completion, mask, logprobs = [eos_id], [0], [0.0]
    if not keep:
        mask = [0] * len(completion)
    return list(traj.prompt_ids), completion, logprobs, mask


def reward_fields(trajs: Sequence[Trajectory]) -> dict[str, list[Any]]:
    return {
        "correct": [t.reward for t in trajs],
        "answered": [float(t.termination == T.ANSWERED) for t in trajs],
        "num_tool_calls": [t.num_tool_calls for t in trajs],
    }


def to_trl(trajs: Sequence[Trajectory], masks: MaskPolicy, eos_id: int) -> dict[str, list[Any]]:
    """The rollout_func return value for these trajectories, in order."""
    out: dict[str, list[Any]] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": []}
    for traj in trajs:
        prompt, completion, logprobs, mask = trl_sequences(traj, masks.keeps(traj), eos_id)
        out["prompt_ids"].append(prompt)
        out["completion_ids"].append(completion)
        out["logprobs"].append(logprobs)
        out["env_mask"].append(mask)
    return {**out, **reward_fields(trajs)}


def summarize(traj: Trajectory, reward: float, kept: bool) -> dict[str, Any]:
    """The per-trajectory numbers a metrics row is made of."""
    return {
        "problem_id": traj.problem_id,
        "reward": reward,
        "correct": traj.reward,
        "answered": float(traj.termination == T.ANSWERED),
        "tool_calls": traj.num_tool_calls,
        "response_tokens": traj.response_tokens,
        "termination": traj.termination,
        "token_exact": traj.token_exact,
        "kept": kept,
        **{f"{k}_s": v for k, v in traj.timings.items()},
    }


class AgentRollout:
    """`rollout_func` for `GRPOTrainer`: one `run_agent` per prompt entry, on the runtime's event loop.

    `make_backend(trainer)` builds the generation backend at the first call (it may need the trainer's
    model or its vLLM engine) and is kept for the run. `stats` collects one `RolloutStats` per call
    until the metrics callback takes them.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        runtime: AgentRuntime,
        agent_config: AgentConfig,
        make_backend: Callable[[Any], LLMBackend],
        rewards: tuple[list[RewardFn], list[float]],
        masks: MaskPolicy = MaskPolicy(),
        n_parallel: int = 64,
    ) -> None:
        self.by_text = {p.problem: p for p in problems}
        self.runtime, self.agent_config = runtime, agent_config
        self.make_backend, self.rewards, self.masks, self.n_parallel = make_backend, rewards, masks, n_parallel
        self.backend: LLMBackend | None = None
        self.stats: list[RolloutStats] = []
        if agent_config.chat is None:
            raise ConfigError("training needs the token-exact path: an AgentConfig with a ChatFormat")
        self.eos_id = agent_config.chat.eos_token_id

    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, list[Any]]:
        if self.backend is None:
            self.backend = self.make_backend(trainer)
        jobs = self.jobs(prompts)
        started = time.perf_counter()
        trajs = self.runtime.run(self.run_all(jobs, self.backend))
        wall = time.perf_counter() - started
        out = to_trl(trajs, self.masks, self.eos_id)
        rewards = total_reward({k: out[k] for k in REWARD_FIELDS}, *self.rewards)
        summaries = [summarize(t, r, self.masks.keeps(t)) for t, r in zip(trajs, rewards, strict=True)]
        self.stats.append(RolloutStats(wall, gather_rows(getattr(trainer, "accelerator", None), summaries)))
        log.info("rollout: %d trajectories in %.1f s, reward mean %.3f", len(trajs), wall,
                 sum(rewards) / max(len(rewards), 1))
        return out

    def jobs(self, prompts: list[str]) -> list[tuple[Problem, int]]:
        """(problem, sample index) for each prompt entry; the index counts repeats of the same prompt."""
        seen: Counter[str] = Counter()
        jobs = []
        for text in prompts:
            problem = self.by_text.get(text)
            if problem is None:
                raise DatasetError(f"the trainer passed a prompt that is not in the training set: {text[:80]!r}")
            jobs.append((problem, seen[text]))
            seen[text] += 1
        return jobs

    async def run_all(self, jobs: list[tuple[Problem, int]], backend: LLMBackend) -> list[Trajectory]:
        limit = asyncio.Semaphore(self.n_parallel)

        async def one(problem: Problem, sample: int) -> Trajectory:
            async with limit:
                return await run_agent(problem, sample, backend, self.runtime.sandbox, self.agent_config)

        return list(await asyncio.gather(*(one(p, s) for p, s in jobs)))

    def close(self) -> None:
        """Release the backend's connections or worker thread."""
        if self.backend is None:
            return
        if hasattr(self.backend, "aclose"):
            self.runtime.run(self.backend.aclose())
        elif hasattr(self.backend, "close"):
            self.backend.close()
        self.backend = None

    def take_stats(self) -> RolloutStats | None:
        """The rollouts since the last call merged into one (None if there were none)."""
        if not self.stats:
            return None
        merged = RolloutStats(sum(s.wall_s for s in self.stats), [t for s in self.stats for t in s.trajectories])
        self.stats.clear()
        return merged


def gather_rows(accelerator: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's rows on every process (a no-op with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return list(gather_object(rows))
