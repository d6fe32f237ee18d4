"""GRPO training on TRL, with the agent loop as the rollout: `train()` is what `mathtool train` calls."""

from mathtool.train.config import PRESETS, TrainConfig
from mathtool.train.trainer import train

__all__ = ["PRESETS", "TrainConfig", "train"]
