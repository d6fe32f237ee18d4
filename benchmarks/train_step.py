"""Seconds per GRPO step, split into rollout, update and weight sync, for each generation mode in one run.

    python benchmarks/train_step.py [--modes transformers,vllm-colocate] [--steps 3] [--preset cpu-demo]

Each mode trains the same preset with the same seed for --steps steps, one mode after the other, each in a
process of its own (`mathtool.train.train`, as `mathtool train` runs it; never two at once). A mode name
may end in `+is` to turn on TRL's importance sampling correction (`vllm_importance_sampling`), which
recomputes the policy's logprobs of every rollout before the loss.

Per step: `step` and `rollout` are the metrics row's `time_step_s` and `time_rollout_s` (all agent loops,
wall); `sync` is the weight sync into vLLM before the rollout; `update` is the rest of the step. The update
is split further by timers around TRL's methods: `old_logps` (the no-grad pass over the batch for the
importance sampling correction), `loss_fwd` (the loss's forward passes), `backward` (the rest of TRL's
`training_step`: backward), `score` (TRL's `_prepare_inputs` less rollout, sync and old logprobs: rewards,
advantages, padding) and `optim` (the step less all those: gradient clipping, optimizer, callbacks).

Figures are medians over steps 2..N (step 1 also pays for building the backend). Each mode is printed
beside the first (the baseline), with the load average before and after it. The last line is one JSON
object: `step_s_<mode>`, `rollout_s_<mode>`, `update_s_<mode>`, `sync_s_<mode>` (mode names with `-` and
`+` as `_`), the steps measured and the load averages.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

log = logging.getLogger("train_step")

PARTS = ("old_logps", "loss_fwd", "backward", "score", "optim")
TIMINGS_FILE = "timings.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="transformers,vllm-colocate")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--output", type=Path, default=None, help="where the runs go [a temporary folder]")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        child(args.child, args.preset, args.steps, args.output)
        return
    output = args.output or Path(tempfile.mkdtemp(prefix="train-step-"))
    results = {mode: run_mode(mode, args.preset, args.steps, output / mode) for mode in args.modes.split(",")}
    report(results, args.steps)


def run_mode(mode: str, preset: str, steps: int, output: Path) -> dict[str, Any]:
    """One mode's run in a process of its own; its per-step timings and the load averages around it."""
    load_before = os.getloadavg()
    command = [sys.executable, __file__, "--child", mode, "--preset", preset, "--steps", str(steps),
               "--output", str(output)]
    log.info("%s: %s", mode, " ".join(command))
    started = time.perf_counter()
    subprocess.run(command, check=True)
    result = json.loads((output / TIMINGS_FILE).read_text())
    return {**result, "wall_s": time.perf_counter() - started, "load_before": load_before,
            "load_after": os.getloadavg()}


def child(mode: str, preset: str, steps: int, output: Path) -> None:
    """Train `steps` steps in this process with timers around TRL's methods; write the per-step timings."""
    from mathtool.train import train
    from mathtool.train.config import resolve
    from mathtool.train.monitor import METRICS_FILE, read_rows

    name, _, flag = mode.partition("+")
    timers = install_timers()
    overrides = {"generation": name, "max_steps": steps, "save_every": steps, "vllm_importance_sampling": flag == "is"}
    train(resolve(preset, None, overrides), output, resume=False)
    rows = []
    for row in read_rows(output / METRICS_FILE):
        t = timers[row["step"]]
        sync, rollout = t["sync"], row["time_rollout_s"]
        update = row["time_step_s"] - rollout - sync
        score = t["prepare"] - rollout - sync - t["old_logps"]
        backward = t["training_step"] - t["prepare"] - t["compute_loss"]
        rows.append({"step": row["step"], "step_s": row["time_step_s"], "rollout_s": rollout, "sync_s": sync,
                     "update_s": update, "old_logps_s": t["old_logps"], "loss_fwd_s": t["loss_fwd"],
                     "backward_s": backward, "score_s": score,
                     "optim_s": update - t["old_logps"] - t["loss_fwd"] - backward - score,
                     "reward_mean": row["reward_mean"], "token_inexact": row["token_inexact"]})
    (output / TIMINGS_FILE).write_text(json.dumps({"mode": mode, "steps": rows}, indent=2))


def install_timers() -> dict[int, dict[str, float]]:
    """Seconds per step (1-based) spent in TRL's methods and in the weight sync, summed over calls."""
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    from mathtool.llm.vllm_colocate import InPlaceWeightSync

    timers: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    step = [1]

    def timed(cls: type, method: str, key: Callable[[], str], on_trainer: bool = True) -> None:
        original = getattr(cls, method)

        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if on_trainer:
                step[0] = self.state.global_step + 1
            name = key()  # before the call: whether gradients are on is the caller's choice
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                timers[step[0]][name] += time.perf_counter() - started

        setattr(cls, method, wrapper)

    import torch

    timed(GRPOTrainer, "training_step", lambda: "training_step")
    timed(GRPOTrainer, "_prepare_inputs", lambda: "prepare")
    timed(GRPOTrainer, "compute_loss", lambda: "compute_loss")
    timed(GRPOTrainer, "_get_per_token_logps_and_entropies",
          lambda: "loss_fwd" if torch.is_grad_enabled() else "old_logps")
    timed(InPlaceWeightSync, "__call__", lambda: "sync", on_trainer=False)
    timed(VLLMGeneration, "sync_weights", lambda: "sync", on_trainer=False)
    return timers


def report(results: dict[str, dict[str, Any]], steps: int) -> None:
    measured = list(range(2, steps + 1)) or [1]
    medians = {mode: {key: median(r[key] for r in result["steps"] if r["step"] in measured)
                      for key in ("step_s", "rollout_s", "update_s", "sync_s", *(f"{p}_s" for p in PARTS))}
               for mode, result in results.items()}
    baseline = next(iter(medians))
    print(f"\nmedian of steps {measured[0]}-{measured[-1]} (s); baseline {baseline}")
    header = f"{'mode':<20}{'step':>8}{'rollout':>9}{'update':>8}{'sync':>7}  " + "".join(f"{p:>10}" for p in PARTS)
    print(header + "   vs baseline (step, rollout)    load avg before -> after")
    for mode, m in medians.items():
        base = medians[baseline]
        result = results[mode]
        print(f"{mode:<20}{m['step_s']:>8.1f}{m['rollout_s']:>9.1f}{m['update_s']:>8.1f}{m['sync_s']:>7.2f}  "
              + "".join(f"{m[f'{p}_s']:>10.1f}" for p in PARTS)
              + f"   {base['step_s'] / m['step_s']:.2f}x, {base['rollout_s'] / m['rollout_s']:.2f}x"
              + f"    {_load(result['load_before'])} -> {_load(result['load_after'])}")
        for row in result["steps"]:
            print(f"    step {row['step']}: step {row['step_s']:.1f} rollout {row['rollout_s']:.1f} "
                  f"update {row['update_s']:.1f} sync {row['sync_s']:.2f} reward {row['reward_mean']:.3f} "
                  f"token_inexact {row['token_inexact']}")
    summary: dict[str, Any] = {"steps_measured": measured}
    for mode, m in medians.items():
        key = mode.replace("-", "_").replace("+", "_")
        summary |= {f"{part}_{key}": round(m[part], 2) for part in ("step_s", "rollout_s", "update_s", "sync_s")}
        summary[f"load_{key}"] = [_load(results[mode]["load_before"]), _load(results[mode]["load_after"])]
    print(json.dumps(summary))


def _load(averages: tuple[float, float, float]) -> str:
    return "/".join(f"{a:.1f}" for a in averages)


if __name__ == "__main__":
    main()
