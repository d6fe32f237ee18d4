"""GRPO training on TRL, with the agent loop as the rollout: `train()` is what `mathtool train` calls."""

from typing import Any

from mathtool.train.config import PRESETS, TrainConfig

__all__ = ["PRESETS", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    """`train` loads torch and TRL: only when it is used, so that `mathtool --help` reads TrainConfig fast."""
    if name == "train":
        from mathtool.train.trainer import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
