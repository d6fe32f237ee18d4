"""Problems and datasets: the registry on disk and its sources (Hub, mirror directory, files)."""

from mathtool.data.problem import Problem
from mathtool.data.registry import DEFAULT_DATASETS, load_problems, prepare, registered
from mathtool.data.sources import KNOWN_DATASETS

__all__ = ["DEFAULT_DATASETS", "KNOWN_DATASETS", "Problem", "load_problems", "prepare", "registered"]
