"""The bridge to TRL: a `rollout_func` that runs our agent loop and hands TRL its tokens.

TRL 1.16 calls `rollout_func(prompts, trainer)` once per generation batch with this process's prompts;
its sampler has already repeated each prompt `num_generations` times, next to each other, so one
trajectory is run per entry, in order. The return value holds, per trajectory:

- `prompt_ids`: the first prompt as rendered with the chat template;
- `completion_ids`: everything after it, model turns and tool outputs, exactly as the model saw them;
- `logprobs`: the sampled tokens' logprobs under the rollout temperature (0.0 on non-model tokens);
- `env_mask`: 1 on model-generated tokens, 0 on tool output and template tokens (TRL's loss mask);
- `correct`, `answered`, `num_tool_calls`, `response_tokens`: passed on to the reward functions
  (`mathtool.train.rewards`).

Nothing is re-tokenized: the ids come from the generator through `Trajectory`. A trajectory cut by the
token budget or the context, one that failed, one whose tokens are not exactly what the model saw
(`token_exact` False), or one with a void turn (SimpleTIR: a turn with neither a tool call nor a final
answer) can be kept out of the loss by zeroing its mask; it still counts in its group's reward baseline.
With `DynamicSampling`, groups whose rewards are all equal are replaced by groups of further problems
(DAPO's dynamic sampling; see `AgentRollout.refill` for how it fits TRL's contract).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.trajectory import Trajectory
from mathtool.data.problem import Problem
from mathtool.errors import ConfigError, DatasetError
from mathtool.llm.base import LLMBackend
from mathtool.run_record import ANSWERED, BUDGET, CONTEXT, ERROR
from mathtool.train.rewards import RewardFn, penalized_overlong, total_reward
from mathtool.train.runtime import AgentRuntime

log = logging.getLogger(__name__)

TRUNCATED = (BUDGET, CONTEXT, ERROR)  # ended without the model finishing its turn
SIGNAL_TOLERANCE = 1e-6  # rewards closer than this are equal: their group's advantages are all 0


@dataclass(frozen=True)
class MaskPolicy:
    truncated: bool = True  # zero the mask of trajectories ending in TRUNCATED
    inexact: bool = True  # zero the mask of trajectories with token_exact False
    void_turns: bool = False  # zero the mask of trajectories with a void turn (SimpleTIR)

    def keeps(self, traj: Trajectory) -> bool:
        return not (self.truncated and traj.termination in TRUNCATED or self.inexact and not traj.token_exact
                    or self.void_turns and traj.void_turns > 0)


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO's dynamic sampling: groups of `group_size` whose rewards are all equal are replaced by groups of
    further problems, in at most `max_rounds` extra rounds of generation per rollout call."""

    group_size: int
    max_rounds: int
    seed: int = 0


@dataclass
class RolloutStats:
    """What one rollout call produced, for the metrics row of its step (all processes)."""

    wall_s: float
    trajectories: list[dict[str, Any]] = field(default_factory=list)  # one summary per trajectory
    counts: dict[str, int] = field(default_factory=dict)  # what the training algorithms removed (merge_counts)


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
        "correct": [float(t.correct) for t in trajs],
        "answered": [float(t.termination == ANSWERED) for t in trajs],
        "num_tool_calls": [t.num_tool_calls for t in trajs],
        "response_tokens": [t.response_tokens for t in trajs],
    }


def has_signal(rewards: Sequence[float]) -> bool:
    """Whether a group's rewards differ, so that GRPO's advantages are not all 0."""
    return max(rewards) - min(rewards) > SIGNAL_TOLERANCE


def whole_groups(prompts: Sequence[str], size: int) -> bool:
    """Whether `prompts` are runs of `size` equal prompts (TRL's sampler repeats each prompt in place)."""
    return len(prompts) % size == 0 and all(len(set(prompts[i : i + size])) == 1
                                            for i in range(0, len(prompts), size))


def merge_counts(all_counts: Sequence[dict[str, int]]) -> dict[str, int]:
    """Counts of several processes or calls: summed, except `dynamic_rounds` (the most any one took)."""
    merged: dict[str, int] = {}
    for counts in all_counts:
        for key, value in counts.items():
            merged[key] = max(merged.get(key, 0), value) if key == "dynamic_rounds" else merged.get(key, 0) + value
    return merged


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
    """One trajectory's line of the run's trajectories.jsonl: the numbers a metrics row is made of, its
    conversation and its grade (the token ids are left out: TRL has them)."""
    return {
        "problem_id": traj.problem_id,
        "sample": traj.sample,
        "reward": reward,
        "correct": float(traj.correct),
        "answered": float(traj.termination == ANSWERED),
        "tool_calls": traj.num_tool_calls,
        "response_tokens": traj.response_tokens,
        "termination": traj.termination,
        "token_exact": traj.token_exact,
        "kept": kept,
        **{f"{k}_s": v for k, v in traj.timings.items()},
        "extracted_answer": traj.extracted_answer,
        "ground_truth": traj.ground_truth,
        "error": traj.error,
        "messages": traj.messages,
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
        dynamic: DynamicSampling | None = None,
    ) -> None:
        self.by_text = {p.problem: p for p in problems}
        self.runtime, self.agent_config = runtime, agent_config
        self.make_backend, self.rewards, self.masks, self.n_parallel = make_backend, rewards, masks, n_parallel
        self.dynamic = dynamic
        self.backend: LLMBackend | None = None
        self.stats: list[RolloutStats] = []
        if not agent_config.chat.on_client:
            raise ConfigError("training needs the token-exact path: a ChatFormat with a tokenizer")
        self.eos_id = agent_config.chat.eos_token_id

    def __call__(self, prompts: list[str], trainer: Any) -> dict[str, list[Any]]:
        if self.backend is None:
            self.backend = self.make_backend(trainer)
        jobs = self.jobs(prompts)
        started = time.perf_counter()
        trajs = self.runtime.run(self.run_all(jobs, self.backend))
        counts: dict[str, int] = {}
        if self.dynamic is not None:
            trajs, counts = self.refill(prompts, trajs, _seed(self.dynamic.seed, trainer))
        wall = time.perf_counter() - started
        out = to_trl(trajs, self.masks, self.eos_id)
        rewards = self.total_rewards(trajs)
        counts |= self.removed_counts(trajs)
        accelerator = getattr(trainer, "accelerator", None)
        process = {"process": getattr(accelerator, "process_index", 0)}
        summaries = [summarize(t, r, self.masks.keeps(t)) | process for t, r in zip(trajs, rewards, strict=True)]
        self.stats.append(RolloutStats(wall, gather_rows(accelerator, summaries), gather_counts(accelerator, counts)))
        log.info("rollout: %d trajectories in %.1f s, reward mean %.3f%s", len(trajs), wall,
                 sum(rewards) / max(len(rewards), 1), f", {counts}" if counts else "")
        return out

    def total_rewards(self, trajs: Sequence[Trajectory]) -> list[float]:
        """Each trajectory's reward as TRL computes it from the same fields."""
        return total_reward(reward_fields(trajs), *self.rewards)

    def removed_counts(self, trajs: Sequence[Trajectory]) -> dict[str, int]:
        """What void-turn masking and the overlong penalty did to these trajectories (when they are on)."""
        counts = {}
        if self.masks.void_turns:
            counts["void_masked"] = sum(t.void_turns > 0 for t in trajs)
        overlong = penalized_overlong(reward_fields(trajs), self.rewards[0])
        if overlong is not None:
            counts["overlong_penalized"] = overlong
        return counts

    def refill(self, prompts: list[str], trajs: list[Trajectory], seed: str) -> tuple[list[Trajectory], dict[str, int]]:
        """DAPO's dynamic sampling within TRL's contract, on this process's share of the batch.

        TRL fixes the batch: as many outputs as the prompts it passed, scored group by group in place
        (each run of `group_size` outputs is a group). A group whose rewards are all equal is dropped and
        its slot filled with a group with signal, run on a further problem drawn at random (seeded by the
        seed, the process and the step) from the training problems not in this call. Each round draws as
        many problems as the missing groups need at the signal rate seen so far (at most this call's
        group count) and runs them at once; groups beyond the need are discarded, as DAPO discards them.
        After `max_rounds`, or when no problem is left, the slots still missing keep their equal-reward
        groups (advantage 0: no policy-gradient signal). Where DAPO draws its further prompts from the
        dataloader, these come beside it: TRL's sampler still serves each of them in its own turn. TRL
        trains on the returned ids and scores the returned fields, so a refilled slot is consistent; only
        the prompt text TRL keeps for it (read by its optional completion log, and passed to reward
        functions, which ignore it) is the dropped problem's. Processes refill independently (no
        collective call inside): each must hold whole groups, which `train` checks at start
        (problems_per_step a multiple of the processes) and this call checks again.
        """
        assert self.dynamic is not None and self.backend is not None
        size = self.dynamic.group_size
        if not whole_groups(prompts, size):
            raise ConfigError("dynamic sampling needs whole groups on each process: make problems_per_step "
                              "a multiple of the number of processes")
        groups = [trajs[i : i + size] for i in range(0, len(trajs), size)]
        flat = [i for i, group in enumerate(groups) if not has_signal(self.total_rewards(group))]
        asked = set(prompts)
        pool = [p for text, p in self.by_text.items() if text not in asked]
        random.Random(seed).shuffle(pool)
        found: list[list[Trajectory]] = []
        seen, with_signal, rounds = len(groups), len(groups) - len(flat), 0
        while len(found) < len(flat) and rounds < self.dynamic.max_rounds and pool:
            rounds += 1
            draw = min(math.ceil((len(flat) - len(found)) * seen / max(with_signal, 1)), len(groups), len(pool))
            batch, pool = pool[:draw], pool[draw:]
            new = self.runtime.run(self.run_all([(p, s) for p in batch for s in range(size)], self.backend))
            useful = [g for g in (new[i : i + size] for i in range(0, len(new), size))
                      if has_signal(self.total_rewards(g))]
            found += useful
            seen, with_signal = seen + len(batch), with_signal + len(useful)
        for slot, group in zip(flat, found, strict=False):
            groups[slot] = group
        unfilled = max(len(flat) - len(found), 0)
        dropped = seen - with_signal - unfilled
        counts = {"dynamic_dropped_groups": dropped, "dynamic_dropped_trajectories": dropped * size,
                  "dynamic_refill_groups": seen - len(groups), "dynamic_rounds": rounds,
                  "dynamic_unfilled_groups": unfilled}
        return [t for group in groups for t in group], counts

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
        merged = RolloutStats(sum(s.wall_s for s in self.stats), [t for s in self.stats for t in s.trajectories],
                              merge_counts([s.counts for s in self.stats]))
        self.stats.clear()
        return merged


def gather_rows(accelerator: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's rows on every process (a no-op with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return list(gather_object(rows))


def gather_counts(accelerator: Any, counts: dict[str, int]) -> dict[str, int]:
    """Every process's counts, merged (`merge_counts`), on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return counts
    from accelerate.utils import gather_object

    return merge_counts(list(gather_object([counts])))


def _seed(seed: int, trainer: Any) -> str:
    """The refill draws' seed: the run's, this process's and this step's (the same again on resume)."""
    accelerator = getattr(trainer, "accelerator", None)
    state = getattr(trainer, "state", None)
    return f"{seed}/{getattr(accelerator, 'process_index', 0)}/{getattr(state, 'global_step', 0)}"
