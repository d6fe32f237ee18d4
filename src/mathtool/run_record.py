"""The run record: what a run directory holds, its one writer (`RunDir`) and its one reader (`load_run`).

A run directory holds `config.json` (the resolved settings), `trajectories.jsonl` (one trajectory record a
line, appended and flushed as each trajectory ends; `termination` is one of the names below),
`metrics.json` (a summary of all the trajectories, recomputed at the end of each run) and the reports.

Nothing is overwritten silently: a directory that already holds trajectories is only reused with
`resume=True`; a resumed run may not change a setting that changes what a trajectory is
(`TRAJECTORY_SETTINGS`), and one that changes another setting (say n_parallel_agents) says so. A torn last
line (a run killed mid-write: no newline, or not JSON) is cut off with a warning when a run resumes, and
skipped with a warning when a run is read; both ask `_torn_tail`. A resumed run appends a redone trajectory
after its errored first try, so the reader keeps the last record per (problem, sample). The reader also
reads the records of older runs (a field renamed since is renamed as it is read), so runs written before
still report, compare and resume.

This module imports only `errors`, `paths` and `data.problem`: the agent names its terminations from here,
the engine writes through it, the metrics and reports read through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mathtool.data.problem import Problem
from mathtool.errors import ConfigError
from mathtool.paths import OUTPUT_FIX, atomic_write_text, check_writable, write_errors

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TRAJECTORIES_FILE = "trajectories.jsonl"
METRICS_FILE = "metrics.json"

# Why a trajectory ended (a record's `termination`).
ANSWERED = "answered"  # the model ended its turn with a final \boxed{} answer
STOPPED = "stopped"  # the model ended its turn with neither a tool call nor a boxed answer
BUDGET = "budget"  # max_response_length tokens used up
MAX_TURNS = "max_turns"
CONTEXT = "context"  # prompt plus response would exceed the context length
ERROR = "error"  # the server or the loop failed; `error` says why (redone on resume)

# Settings that change what a trajectory is: resuming with another value would mix two kinds in one run.
TRAJECTORY_SETTINGS = ("dataset", "model", "token_exact", "tool_format", "chat_template", "thinking", "max_turns",
                       "max_response_length", "max_prompt_length", "temperature", "top_p", "seed")
RESUME_FIX = "make room or fix the directory, then rerun with --resume"


def record_is_correct(record: dict[str, Any]) -> bool:
    """Whether a trajectory record was graded equal to the ground truth."""
    return bool(record.get("correct"))


def record_failed(record: dict[str, Any]) -> bool:
    """Whether a trajectory record ended in an error (the server or the loop failed)."""
    return bool(record.get("error")) or record.get("termination") == ERROR


def dataset_sha256(problems: Iterable[Problem]) -> str:
    """A content hash of the problems a run evaluated (ids, statements, answers, and worked examples where a
    problem has them; order ignored), for config.json's `dataset_sha256`: two runs with the same hash scored
    the same problems, shown the same way."""
    rows = sorted(json.dumps([p.id, p.problem, p.answer, *([[asdict(e) for e in p.examples]] if p.examples else [])],
                             ensure_ascii=False) for p in problems)
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


# Reading


def _torn_tail(data: bytes) -> int:
    """How many bytes at the end of a trajectories file are a torn last line (a run killed mid-write): a
    last line without its newline, or one that is not JSON. 0 when the last line is whole."""
    whole = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    lines = whole.splitlines(keepends=True)
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            whole = whole[: len(whole) - len(lines[-1])]
    return len(data) - len(whole)


def read_trajectory_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a trajectories file, the last one per (problem_id, sample); a torn last line and any
    other line that is not a JSON record with a problem_id are skipped with a warning."""
    data = path.read_bytes()
    torn = _torn_tail(data)
    if torn:
        log.warning("%s: skipped a torn last line (%d bytes)", path, torn)
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    lines = data[: len(data) - torn].decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        record = _parse_line(path, number, line) if line.strip() else None
        if record is not None:
            latest[(str(record["problem_id"]), int(record.get("sample", 0)))] = _as_written_today(record)
    return list(latest.values())


def _as_written_today(record: dict[str, Any]) -> dict[str, Any]:
    """A record in today's shape: older runs wrote `correct` as `reward` (1.0 when right)."""
    if "reward" in record and "correct" not in record:
        record["correct"] = float(record.pop("reward") or 0.0) >= 1.0
    return record


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        log.warning("%s:%d: skipped an unreadable line (%d chars)", path, number, len(line))
        return None
    if not isinstance(record, dict) or "problem_id" not in record:
        log.warning("%s:%d: skipped a record without problem_id", path, number)
        return None
    return record


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's config.json, or None where it has none; one ConfigError line naming the file where it
    cannot be read or is not a JSON object."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    fix = "repair or delete it"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path} ({e}); {fix}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object; {fix}")
    return config


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(resolved config, trajectory records) of a run directory; a missing config.json reads as {}."""
    run_dir = Path(run_dir)
    trajectories_path = run_dir / TRAJECTORIES_FILE
    if not trajectories_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no {TRAJECTORIES_FILE}")
    config = read_run_config(run_dir)
    if config is None:
        log.warning("%s has no %s; reporting without the run's config", run_dir, CONFIG_FILE)
    return config or {}, read_trajectory_records(trajectories_path)


# Writing


def _holds_a_run(path: Path) -> bool:
    """An empty trajectories file (a run that failed before its first trajectory) is not a run."""
    trajectories = path / TRAJECTORIES_FILE
    return trajectories.is_file() and trajectories.stat().st_size > 0


def check_output(path: Path, resume: bool) -> None:
    """Refuse an output directory that cannot take this run, before any slow work: a file, a directory that
    already holds trajectories (without --resume), an unreadable config.json, a place where no file can be
    created."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {path} is a file, not a directory; {OUTPUT_FIX}")
    if _holds_a_run(path) and not resume:
        raise ConfigError(f"{path} already holds a run; add --resume to continue it, or {OUTPUT_FIX}")
    read_run_config(path)
    check_writable(path, OUTPUT_FIX)


def check_resume(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume the run in `path` with a value of a TRAJECTORY_SETTINGS key other than the one in its
    config.json (keys missing from either side are not compared). Called with the settings as given before
    any server starts; RunDir checks the resolved ones (model, token-exactness, tool format) against the
    config.json it has read already."""
    if _holds_a_run(path):
        _refuse_changes(path, read_run_config(path) or {}, settings)


def _refuse_changes(path: Path, old: dict[str, Any], settings: dict[str, Any]) -> None:
    changed = [k for k in TRAJECTORY_SETTINGS if k in old and k in settings and old[k] != settings[k]]
    if changed:
        was = ", ".join(f"{k} {old[k]!r} (now {settings[k]!r})" for k in changed)
        raise ConfigError(f"{path} was run with {was}: a resumed run must keep what makes a trajectory; "
                          f"resume with the run's settings, or {OUTPUT_FIX}")


def _cut_torn_tail(path: Path) -> None:
    """Drop a torn last line (`_torn_tail`) so that its trajectory is redone and appends start on a new line."""
    data = path.read_bytes()
    torn = _torn_tail(data)
    if torn:
        log.warning("%s: dropped a torn last line (%d bytes); it will be redone", path, torn)
        with path.open("r+b") as f:
            f.truncate(len(data) - torn)


class RunDir:
    """A run directory open for writing: config.json written, trajectories appended as they end."""

    def __init__(self, path: Path, config: dict[str, Any], resume: bool):
        self.path = path
        self.trajectories_path = path / TRAJECTORIES_FILE
        check_output(path, resume)
        old = read_run_config(path)
        with write_errors(path, OUTPUT_FIX):
            path.mkdir(parents=True, exist_ok=True)
            if resume and _holds_a_run(path):
                _cut_torn_tail(self.trajectories_path)
                _refuse_changes(path, old or {}, config)
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
        with write_errors(self.path / METRICS_FILE, RESUME_FIX):
            atomic_write_text(self.path / METRICS_FILE, json.dumps(metrics, indent=2))

    def close(self) -> None:
        with write_errors(self.trajectories_path, RESUME_FIX):
            self._file.close()
