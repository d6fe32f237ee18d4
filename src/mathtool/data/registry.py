"""The dataset registry on disk: `<home>/datasets/<name>/<split>.parquet` plus a manifest per dataset.

`load_problems` accepts a registered name, a known name (registered on first use) or a file path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mathtool.data.problem import Problem
from mathtool.data.sources import (
    FILE_SUFFIXES,
    KNOWN_DATASETS,
    mirror_dir,
    read_examples,
    read_file,
    read_hub,
    read_mirror,
)
from mathtool.errors import DatasetError
from mathtool.paths import atomic_write, atomic_write_text, check_writable, mathtool_home, write_errors

log = logging.getLogger(__name__)

DEFAULT_DATASETS = ("aime2024", "deepscaler")
MANIFEST = "manifest.json"
ENTRY_KEYS = frozenset({"split", "origin", "rows", "sha256", "registered_at"})
HOME_FIX = "set MATHTOOL_HOME to a writable directory"


def datasets_dir() -> Path:
    return mathtool_home() / "datasets"


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
            "examples": [json.dumps([asdict(e) for e in p.examples], ensure_ascii=False) for p in problems],
        }
    )
    pq.write_table(table, path)


def _content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(name: str, problems: list[Problem], split: str, origin: str) -> dict[str, Any]:
    """Store `problems` as dataset `name`/`split`; returns the manifest entry."""
    directory = datasets_dir() / name
    parquet = directory / f"{split}.parquet"
    with write_errors(directory, HOME_FIX):
        atomic_write(parquet, lambda tmp: _write_parquet(problems, tmp))
        entry = {
            "split": split,
            "origin": origin,
            "rows": len(problems),
            "sha256": _content_hash(parquet),
            "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        manifest = _manifest_to_update(name)
        manifest["name"] = name
        manifest.setdefault("splits", {})[split] = entry
        atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
    log.info("registered %s/%s: %d rows from %s", name, split, len(problems), origin)
    return entry


def _manifest_to_update(name: str) -> dict[str, Any]:
    """The manifest that a new split joins; a broken one is started afresh (its other splits are forgotten)."""
    try:
        return read_manifest(name)
    except DatasetError as e:
        log.warning("%s; writing a new one", e)
        return {}


def _prepare_hint(name: str) -> str:
    if name in KNOWN_DATASETS:
        return f"run `mathtool prepare {name}` again"
    return f"run `mathtool prepare` on the file {name} came from again"


def read_manifest(name: str) -> dict[str, Any]:
    """Dataset `name`'s manifest ({} where none is registered); one DatasetError line naming the file where it is
    torn or lacks the keys a manifest has."""
    path = datasets_dir() / name / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} cannot be read ({e}); {_prepare_hint(name)}") from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict) or not isinstance(manifest.get("name"), str) or not all(
        isinstance(entry, dict) and ENTRY_KEYS <= entry.keys() for entry in splits.values()
    ):
        raise DatasetError(f"{path} is not a dataset manifest (it needs name, and {', '.join(sorted(ENTRY_KEYS))} "
                           f"per split); {_prepare_hint(name)}")
    return manifest


def registered() -> list[dict[str, Any]]:
    """Every registered dataset's manifest, by name; a broken one is left out with a warning."""
    root = datasets_dir()
    if not root.is_dir():
        return []
    manifests = []
    for directory in sorted(root.iterdir()):
        try:
            manifest = read_manifest(directory.name)
        except DatasetError as e:
            log.warning("left out: %s", e)
            continue
        if manifest:
            manifests.append(manifest)
    return manifests


def prepare(name: str, source: str | Path | None = None) -> dict[str, Any]:
    """Register a known dataset (from the mirror when given, else the Hub) or a file under its stem. The
    registry is checked to be writable before anything is read or downloaded."""
    check_writable(datasets_dir(), HOME_FIX)
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


def _read_registered(name: str, split: str) -> list[Problem]:
    import pyarrow.parquet as pq

    parquet = datasets_dir() / name / f"{split}.parquet"
    try:
        rows = pq.read_table(parquet).to_pylist()
        return [Problem(r["id"], r["problem"], r["answer"], r["source"], json.loads(r["extra"]),
                        read_examples(r.get("examples"), f"{parquet}, id {r['id']}")) for r in rows]
    except Exception as e:  # pyarrow raises several types for a torn file; a wrong one lacks columns
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DatasetError(f"{parquet} cannot be read ({reason}); {_prepare_hint(name)}") from None


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
        return _read_registered(dataset, split)
    if spec is None:
        raise DatasetError(_unknown_message(dataset))
    prepare(dataset, source)
    return _read_registered(dataset, spec.split)


def _unknown_message(name: str) -> str:
    known = ", ".join(sorted(KNOWN_DATASETS))
    return f"unknown dataset {name!r}: use one of {known}, a registered name, or a .jsonl/.parquet/.csv file"
