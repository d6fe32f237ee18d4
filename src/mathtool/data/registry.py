"""The dataset registry on disk: `<home>/datasets/<name>/<split>.parquet` plus a manifest per dataset.

`load_problems` accepts a registered name, a known name (registered on first use) or a file path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mathtool.data.problem import Problem
from mathtool.data.sources import (
    FILE_SUFFIXES,
    KNOWN_DATASETS,
    mirror_dir,
    read_file,
    read_hub,
    read_mirror,
)
from mathtool.errors import DatasetError
from mathtool.paths import mathtool_home

log = logging.getLogger(__name__)

DEFAULT_DATASETS = ("aime2024", "deepscaler")


def datasets_dir() -> Path:
    return mathtool_home() / "datasets"


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same directory, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_parquet(problems: list[Problem], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": [p.id for p in problems],
            "problem": [p.problem for p in problems],
            "answer": [p.answer for p in problems],
            "source": [p.source for p in problems],
            "extra": [json.dumps(p.extra, ensure_ascii=False, default=str) for p in problems],
        }
    )
    pq.write_table(table, path)


def _content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(name: str, problems: list[Problem], split: str, origin: str) -> dict[str, Any]:
    """Store `problems` as dataset `name`/`split`; returns the manifest entry."""
    directory = datasets_dir() / name
    parquet = directory / f"{split}.parquet"
    _atomic_write(parquet, lambda tmp: _write_parquet(problems, tmp))
    entry = {
        "split": split,
        "origin": origin,
        "rows": len(problems),
        "sha256": _content_hash(parquet),
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    manifest = read_manifest(name)
    manifest["name"] = name
    manifest.setdefault("splits", {})[split] = entry
    text = json.dumps(manifest, indent=2)
    _atomic_write(directory / "manifest.json", lambda tmp: tmp.write_text(text))
    log.info("registered %s/%s: %d rows from %s", name, split, len(problems), origin)
    return entry


def read_manifest(name: str) -> dict[str, Any]:
    path = datasets_dir() / name / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def registered() -> list[dict[str, Any]]:
    """Every registered dataset's manifest, by name."""
    root = datasets_dir()
    if not root.is_dir():
        return []
    return [m for d in sorted(root.iterdir()) if (m := read_manifest(d.name))]


def prepare(name: str, source: str | Path | None = None) -> dict[str, Any]:
    """Register a known dataset (from the mirror when given, else the Hub) or a file under its stem."""
    path = Path(name).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES and path.exists():
        return register(path.stem, read_file(path), "test", str(path.resolve()))
    spec = KNOWN_DATASETS.get(name)
    if spec is None:
        raise DatasetError(_unknown_message(name))
    mirror = mirror_dir(source)
    if mirror is not None:
        problems, origin = read_mirror(name, mirror), str((mirror / f"{name}.jsonl").resolve())
    else:
        problems, origin = read_hub(name, spec), f"hub:{spec.repo_id}"
    return register(name, problems, spec.split, origin)


def _read_registered(parquet: Path) -> list[Problem]:
    import pyarrow.parquet as pq

    rows = pq.read_table(parquet).to_pylist()
    return [Problem(r["id"], r["problem"], r["answer"], r["source"], json.loads(r["extra"])) for r in rows]


def load_problems(dataset: str, split: str | None = None, source: str | Path | None = None) -> list[Problem]:
    """Problems from a file path, a registered dataset, or a known one (registered on first use)."""
    path = Path(dataset).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise DatasetError(f"{path}: no such file")
        return read_file(path)
    spec = KNOWN_DATASETS.get(dataset)
    split = split or (spec.split if spec else None)
    splits = read_manifest(dataset).get("splits", {})
    if split is None and len(splits) == 1:
        split = next(iter(splits))
    if split in splits:
        return _read_registered(datasets_dir() / dataset / f"{split}.parquet")
    if spec is None:
        raise DatasetError(_unknown_message(dataset))
    prepare(dataset, source)
    return _read_registered(datasets_dir() / dataset / f"{spec.split}.parquet")


def _unknown_message(name: str) -> str:
    known = ", ".join(sorted(KNOWN_DATASETS))
    return f"unknown dataset {name!r}: use one of {known}, a registered name, or a .jsonl/.parquet/.csv file"
