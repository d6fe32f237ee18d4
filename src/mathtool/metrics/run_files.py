"""Reading a run directory: `config.json` and `trajectories.jsonl`, the files the engine writes."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from mathtool.errors import ConfigError

log = logging.getLogger(__name__)

TRAJECTORIES_FILE = "trajectories.jsonl"
CONFIG_FILE = "config.json"


class _ProblemLike(Protocol):
    id: str
    problem: str
    answer: str


def dataset_sha256(problems: Iterable[_ProblemLike]) -> str:
    """A content hash of the problems a run evaluated (ids, statements, answers; order ignored), for
    config.json's `dataset_sha256`: two runs with the same hash scored the same problems."""
    rows = sorted(json.dumps([p.id, p.problem, p.answer], ensure_ascii=False) for p in problems)
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def read_trajectory_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a trajectories file; the last record per (problem_id, sample) wins.

    A resumed run appends a redone trajectory after its errored first try, so keeping the last one
    counts each (problem, sample) once. A line that is not valid JSON (a run killed mid-write leaves
    one at the end) is skipped with a warning.
    """
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_line(path, number, line, is_last=number == len(lines))
        if record is not None:
            latest[(str(record["problem_id"]), int(record.get("sample", 0)))] = record
    return list(latest.values())


def _parse_line(path: Path, number: int, line: str, is_last: bool) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        where = "torn last line" if is_last else "unreadable line"
        log.warning("%s:%d: skipped a %s (%d chars)", path, number, where, len(line))
        return None
    if not isinstance(record, dict) or "problem_id" not in record:
        log.warning("%s:%d: skipped a record without problem_id", path, number)
        return None
    return record


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
