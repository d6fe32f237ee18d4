"""The run directory: `config.json`, `trajectories.jsonl` (append-only), `metrics.json`, reports.

Nothing here is overwritten silently: a directory that already holds trajectories is only reused with
`resume=True`, a torn last line (a run killed mid-write) is cut off with a warning and redone, a resumed
run may not change a setting that changes what a trajectory is (`TRAJECTORY_SETTINGS`), and one that
changes another setting (say n_parallel_agents) says so. `metrics.json` is a summary of all the trajectories,
recomputed at the end of each run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mathtool.agent.trajectory import ERROR
from mathtool.errors import ConfigError
from mathtool.metrics.run_files import CONFIG_FILE, TRAJECTORIES_FILE, read_run_config, read_trajectory_records
from mathtool.paths import atomic_write_text, check_writable, write_errors

log = logging.getLogger(__name__)

METRICS = "metrics.json"
OUTPUT_FIX = "pick another --output"
RESUME_FIX = "make room or fix the directory, then rerun with --resume"
# Settings that change what a trajectory is: resuming with another value would mix two kinds in one run.
TRAJECTORY_SETTINGS = ("dataset", "model", "token_exact", "tool_format", "chat_template", "thinking", "max_turns",
                       "max_response_length", "max_prompt_length", "temperature", "top_p", "seed")


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line that was not completely written (no newline, or not valid JSON)."""
    data = path.read_bytes()
    if not data:
        return
    keep = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    lines = keep.splitlines(keepends=True)
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            keep = keep[: len(keep) - len(lines[-1])]
    if len(keep) != len(data):
        log.warning("%s: dropped a torn last line (%d bytes); it will be redone", path, len(data) - len(keep))
        with path.open("r+b") as f:
            f.truncate(len(keep))


def check_output(path: Path, resume: bool) -> None:
    """Refuse an output directory that cannot take this run, before any slow work: a file, a directory that
    already holds trajectories (without --resume), an unreadable config.json, a place where no file can be
    created. An empty trajectories file (a run that failed before its first trajectory) is not a run."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {path} is a file, not a directory; pick another --output")
    trajectories = path / TRAJECTORIES_FILE
    if trajectories.is_file() and trajectories.stat().st_size > 0 and not resume:
        raise ConfigError(f"{path} already holds a run; add --resume to continue it, or pick another --output")
    read_run_config(path)
    check_writable(path, OUTPUT_FIX)


def check_resume(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume the run in `path` with a value of a TRAJECTORY_SETTINGS key other than the one in its
    config.json (keys missing from either side are not compared). Called with the settings as given before
    any server starts, and again with the resolved ones (model, token-exactness, tool format)."""
    trajectories = path / TRAJECTORIES_FILE
    old = read_run_config(path) if trajectories.is_file() and trajectories.stat().st_size > 0 else None
    if not old:
        return
    changed = [k for k in TRAJECTORY_SETTINGS if k in old and k in settings and old[k] != settings[k]]
    if changed:
        was = ", ".join(f"{k} {old[k]!r} (now {settings[k]!r})" for k in changed)
        raise ConfigError(f"{path} was run with {was}: a resumed run must keep what makes a trajectory; "
                          "resume with the run's settings, or pick another --output")


class RunDir:
    def __init__(self, path: Path, config: dict[str, Any], resume: bool):
        self.path = path
        self.trajectories_path = path / TRAJECTORIES_FILE
        check_output(path, resume)
        old = read_run_config(path)
        with write_errors(path, OUTPUT_FIX):
            path.mkdir(parents=True, exist_ok=True)
            if resume and self.trajectories_path.exists():
                _cut_torn_tail(self.trajectories_path)
                check_resume(path, config)
            self._write_config(old, config)
            self._file = self.trajectories_path.open("a", encoding="utf-8")

    def _write_config(self, old: dict[str, Any] | None, config: dict[str, Any]) -> None:
        """Write config.json; when it replaces one with other settings that do not affect results (say
        n_parallel_agents), say which."""
        text = json.dumps(config, indent=2, default=str)
        if old is not None:
            new = json.loads(text)
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k != "resume")
            if changed:
                log.warning("%s: updated for this run (%s)", self.path / CONFIG_FILE,
                            ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
        atomic_write_text(self.path / CONFIG_FILE, text)

    def records(self) -> list[dict[str, Any]]:
        """Trajectories written so far, the last record per (problem, sample)."""
        return read_trajectory_records(self.trajectories_path) if self.trajectories_path.exists() else []

    def finished(self) -> set[tuple[str, int]]:
        """(problem, sample) pairs already done; errored ones are redone on resume."""
        return {(r["problem_id"], r["sample"]) for r in self.records() if r.get("termination") != ERROR}

    def append(self, record: dict[str, Any]) -> None:
        with write_errors(self.trajectories_path, RESUME_FIX):
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        with write_errors(self.path / METRICS, RESUME_FIX):
            atomic_write_text(self.path / METRICS, json.dumps(metrics, indent=2))

    def close(self) -> None:
        with write_errors(self.trajectories_path, RESUME_FIX):
            self._file.close()
