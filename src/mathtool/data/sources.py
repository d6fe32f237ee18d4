"""Where problems come from: a file (JSONL, parquet, CSV), a mirror directory, or the Hugging Face Hub.

Every source yields raw rows; `rows_to_problems` validates them into `Problem`s, naming the file and
row of the first bad one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mathtool.data.problem import Problem, WorkedExample
from mathtool.errors import DatasetError

log = logging.getLogger(__name__)

PROBLEM_FIELDS = ("problem", "question", "Problem")
ANSWER_FIELDS = ("answer", "ground_truth", "Answer")
ID_FIELDS = ("id", "unique_id", "problem_idx", "ID")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class HubSpec:
    """A known dataset: its Hub id, the split we use, and what we call that split."""

    repo_id: str
    hub_split: str
    split: str  # "test" for evaluation sets, "train" for training sets
    config: str | None = None


KNOWN_DATASETS: dict[str, HubSpec] = {
    "aime2024": HubSpec("HuggingFaceH4/aime_2024", "train", "test"),
    "deepscaler": HubSpec("agentica-org/DeepScaleR-Preview-Dataset", "train", "train"),
    "aime2025": HubSpec("MathArena/aime_2025", "train", "test"),
    "amc2023": HubSpec("math-ai/amc23", "test", "test"),
    "math500": HubSpec("HuggingFaceH4/MATH-500", "test", "test"),
}


def ground_truth_text(value: Any) -> str:
    """Ground truth as a string; integers (AIME's included, even zero-padded) as plain digits."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if text.isdigit():
        text = str(int(text))
    return text


def _first(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    return None


def read_examples(value: Any, where: str) -> tuple[WorkedExample, ...]:
    """A row's `examples`: a list (or its JSON text, as the registry stores it) of objects with the text
    fields of `WorkedExample`."""
    if value is None:
        return ()
    names = list(WorkedExample.__dataclass_fields__)
    wrong = DatasetError(f"{where}: 'examples' must be a list of objects with text fields {', '.join(names)}")
    try:
        items = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        raise wrong from None
    if not isinstance(items, list) or not all(
        isinstance(item, dict) and all(isinstance(item.get(name), str) for name in names) for item in items
    ):
        raise wrong
    return tuple(WorkedExample(*(item[name] for name in names)) for item in items)


def rows_to_problems(rows: Iterable[dict[str, Any]], origin: str, source: str) -> list[Problem]:
    """Validate rows: a problem text, a non-empty answer, unique ids. Errors name `origin` and the row."""
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    used = set(PROBLEM_FIELDS + ANSWER_FIELDS + ID_FIELDS + ("source", "examples"))
    for number, row in enumerate(rows, start=1):
        where = f"{origin}, row {number}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object with fields, got {type(row).__name__}")
        text = _first(row, PROBLEM_FIELDS)
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: no problem text (need a non-empty 'problem' or 'question' field)")
        answer = ground_truth_text(_first(row, ANSWER_FIELDS))
        if not answer:
            raise DatasetError(f"{where}: empty or missing answer (need 'answer' or 'ground_truth')")
        raw_id = _first(row, ID_FIELDS)
        pid = str(raw_id) if raw_id is not None and str(raw_id).strip() else f"{Path(origin).stem}-{number}"
        if pid in seen:
            raise DatasetError(f"{where}: duplicate id {pid!r} (first seen in row {seen[pid]})")
        seen[pid] = number
        extra = {k: v for k, v in row.items() if k not in used}
        problems.append(Problem(pid, text, answer, str(row.get("source") or source), extra,
                                read_examples(row.get("examples"), where)))
    if not problems:
        raise DatasetError(f"{origin}: no rows")
    return problems


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}, row {number}: not valid JSON ({e.msg})") from None
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of objects")
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


def read_file(path: Path) -> list[Problem]:
    """Problems from a JSONL, JSON, parquet or CSV file."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
    try:
        rows = reader(path)
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    return rows_to_problems(rows, str(path), source=str(path))


def mirror_dir(explicit: str | Path | None = None) -> Path | None:
    """The mirror directory: an explicit --source, else MATHTOOL_DATA_DIR, else none."""
    chosen = explicit or os.environ.get("MATHTOOL_DATA_DIR")
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DatasetError(f"mirror directory {path} does not exist (set by --source or MATHTOOL_DATA_DIR)")
    return path


def read_mirror(name: str, directory: Path) -> list[Problem]:
    path = directory / f"{name}.jsonl"
    if not path.is_file():
        raise DatasetError(f"mirror {directory} has no {name}.jsonl")
    return read_file(path)


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """A quick TCP check, so that an offline machine fails at once instead of after minutes of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # the datasets cache answers; no network wanted
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def read_hub(name: str, spec: HubSpec) -> list[Problem]:
    """The real dataset from the Hugging Face Hub, through the `datasets` library."""
    import datasets

    offline_hint = "Offline? Point to a mirror of <name>.jsonl files with --source DIR or MATHTOOL_DATA_DIR."
    if not _hub_reachable():
        raise DatasetError(f"cannot load {name}: the Hugging Face Hub is unreachable. {offline_hint}")
    log.info("downloading %s from the Hub (%s, split %s)", name, spec.repo_id, spec.hub_split)
    try:
        ds = datasets.load_dataset(spec.repo_id, spec.config, split=spec.hub_split)
    except Exception as e:  # offline, gated, renamed: all end the same way for the user
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DatasetError(
            f"cannot load {name} from the Hugging Face Hub ({spec.repo_id}): {reason}. {offline_hint}"
        ) from None
    return rows_to_problems(ds, f"hub:{spec.repo_id}", source=spec.repo_id)
