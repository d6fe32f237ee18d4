"""Where mathtool keeps its files: $MATHTOOL_HOME, default ~/.cache/mathtool."""

from __future__ import annotations

import os
from pathlib import Path


def mathtool_home() -> Path:
    return Path(os.environ.get("MATHTOOL_HOME") or Path.home() / ".cache" / "mathtool").expanduser()
