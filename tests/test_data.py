"""The dataset registry and its sources: mirror, files, bad rows, nothing half-registered."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathtool.data import load_problems, prepare, registered
from mathtool.data.problem import Problem, WorkedExample
from mathtool.data.registry import datasets_dir, read_manifest
from mathtool.errors import DatasetError
from mathtool.run_record import dataset_sha256


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MATHTOOL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MATHTOOL_DATA_DIR", raising=False)
    return tmp_path / "home"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_from_mirror_round_trips(shared_data: Path) -> None:
    entry = prepare("aime2024", shared_data)
    assert entry["rows"] == 30 and entry["split"] == "test"
    problems = load_problems("aime2024")
    assert len(problems) == 30
    assert problems[0].id == "2024-AIME-I-1" and problems[0].answer == "204"
    assert all(p.answer.isdigit() and not p.answer.startswith("0") or p.answer == "0" for p in problems)
    assert "url" in problems[0].extra
    [manifest] = registered()
    assert manifest["name"] == "aime2024" and len(manifest["splits"]["test"]["sha256"]) == 64


def test_deepscaler_registers_as_train(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHTOOL_DATA_DIR", str(shared_data))
    problems = load_problems("deepscaler")  # known name, not yet registered: registered on first use
    assert len(problems) == 10850
    assert read_manifest("deepscaler")["splits"]["train"]["rows"] == 10850
    assert any("\\frac" in p.answer for p in problems)


def test_file_formats_and_field_aliases(tmp_path: Path) -> None:
    rows = [{"question": "1+1?", "ground_truth": 2}, {"question": "2+2?", "ground_truth": "004", "id": "b"}]
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["1+1?"], "answer": ["2"], "id": ["x"]}), parquet)
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("problem,answer\n\"3+3?\",6\n")
    from_jsonl = load_problems(str(jsonl))
    assert [(p.id, p.answer) for p in from_jsonl] == [("p-1", "2"), ("b", "4")]
    assert load_problems(str(parquet))[0].id == "x"
    assert load_problems(str(csv_file))[0].answer == "6"


def test_worked_examples_round_trip_through_files_and_the_registry(tmp_path: Path) -> None:
    example = {"question": "7 * 8?", "code": "print(7 * 8)", "output": "56", "answer": "56"}
    path = write_jsonl(tmp_path / "shots.jsonl", [{"problem": "6 * 7?", "answer": "42", "examples": [example]},
                                                  {"problem": "2 + 2?", "answer": "4"}])
    expected = [(WorkedExample(**example),), ()]
    assert [p.examples for p in load_problems(str(path))] == expected
    prepare(str(path))
    registered_copy = load_problems("shots")
    assert [p.examples for p in registered_copy] == expected and "examples" not in registered_copy[0].extra


def test_the_dataset_hash_counts_worked_examples_and_is_unchanged_without_them() -> None:
    plain = [Problem("a", "6 * 7?", "42")]
    as_before = hashlib.sha256(json.dumps(["a", "6 * 7?", "42"]).encode()).hexdigest()  # runs written before
    assert dataset_sha256(plain) == as_before
    shown = [Problem("a", "6 * 7?", "42", examples=(WorkedExample("7 * 8?", "print(7 * 8)", "56", "56"),))]
    other = [Problem("a", "6 * 7?", "42", examples=(WorkedExample("7 * 8?", "print(7 * 8)", "56", "57"),))]
    assert len({dataset_sha256(plain), dataset_sha256(shown), dataset_sha256(other)}) == 3


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"problem": "x", "answer": "1", "examples": [{"question": "q", "code": "c", "output": "o"}]}],
         "row 1: 'examples' must be a list of objects with text fields question, code, output, answer"),
        ([{"problem": "x", "answer": "1", "examples": "not json"}], "row 1: 'examples' must be a list"),
        ([{"problem": "x", "answer": "1"}, {"problem": "y"}], "row 2: empty or missing answer"),
        ([{"problem": "x", "answer": "  "}], "row 1: empty or missing answer"),
        ([{"answer": "1"}], "row 1: no problem text"),
        ([{"id": 1, "problem": "x", "answer": "1"}, {"id": 1, "problem": "y", "answer": "2"}], "duplicate id '1'"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path: Path, rows: list[dict], message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError, match=message) as info:
        prepare(str(path))
    assert str(path) in str(info.value)
    assert not (datasets_dir() / "bad").exists()  # nothing half-registered


def test_bad_json_and_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "torn.jsonl"
    path.write_text('{"problem": "x", "answer": "1"}\n{"problem": \n')
    with pytest.raises(DatasetError, match="row 2: not valid JSON"):
        load_problems(str(path))
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        load_problems("nope")
    with pytest.raises(DatasetError, match="no such file"):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DatasetError, match="unsupported file type"):
        load_problems(str(tmp_path / "x.txt"))


def test_failed_reregister_keeps_the_old_copy(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "mine.jsonl", [{"problem": "x", "answer": "1"}])
    prepare(str(good))
    write_jsonl(good, [{"problem": "x", "answer": "1"}, {"problem": "y", "answer": ""}])
    with pytest.raises(DatasetError):
        prepare(str(good))
    assert len(load_problems("mine")) == 1
    assert not [p for p in (datasets_dir() / "mine").iterdir() if p.name.endswith(".tmp")]


def test_hub_unreachable_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(DatasetError, match="Hub is unreachable.*--source DIR"):
            prepare("amc2023")
    finally:
        monkeypatch.delenv("HF_ENDPOINT")
        importlib.reload(huggingface_hub.constants)


def mathtool(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with this test's MATHTOOL_HOME."""
    return subprocess.run([sys.executable, "-m", "mathtool.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "250"})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("text", "why"), [
    ('{"name": "mine", "splits": {"test": {"spl', "cannot be read (Unterminated string"),  # torn
    ('{"name": "mine"}', "is not a dataset manifest (it needs name, and origin, registered_at, rows"),
    ('{"name": "mine", "splits": {"test": {"rows": 1}}}', "is not a dataset manifest"),
])
def test_a_broken_manifest_is_left_out_of_the_list_and_named(tmp_path: Path, shared_data: Path, text: str,
                                                             why: str) -> None:
    prepare("aime2024", shared_data)
    prepare(str(write_jsonl(tmp_path / "mine.jsonl", [{"problem": "x", "answer": "1"}])))
    manifest = datasets_dir() / "mine" / "manifest.json"
    manifest.write_text(text)
    assert [m["name"] for m in registered()] == ["aime2024"]
    listing = mathtool("datasets")
    assert listing.returncode == 0 and "aime2024" in listing.stdout and "mine" not in listing.stdout
    warning = [line for line in listing.stderr.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and f"left out: {manifest} {why}" in warning[0], listing.stderr
    line = one_error_line(mathtool("eval", "--dataset", "mine"))
    assert line.startswith(f"error: {manifest} {why}")
    assert line.endswith("; run `mathtool prepare` on the file mine came from again")


def test_a_torn_manifest_of_a_known_dataset_is_mended_by_preparing_it_again(shared_data: Path) -> None:
    prepare("aime2024", shared_data)
    manifest = datasets_dir() / "aime2024" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(DatasetError, match=r"manifest.json cannot be read .*; run `mathtool prepare aime2024` again"):
        load_problems("aime2024")
    prepare("aime2024", shared_data)
    assert len(load_problems("aime2024")) == 30


@pytest.mark.parametrize("damage", ["torn", "wrong columns", "missing"])
def test_a_broken_registered_parquet_is_one_line_that_says_prepare_again(shared_data: Path, damage: str) -> None:
    prepare("aime2024", shared_data)
    parquet = datasets_dir() / "aime2024" / "test.parquet"
    if damage == "torn":
        parquet.write_bytes(parquet.read_bytes()[:-100])
    elif damage == "wrong columns":
        pq.write_table(pa.table({"question": ["x"]}), parquet)
    else:
        parquet.unlink()
    line = one_error_line(mathtool("eval", "--dataset", "aime2024"))
    assert line.startswith(f"error: {parquet} cannot be read (")
    assert line.endswith("); run `mathtool prepare aime2024` again")
    prepare("aime2024", shared_data)
    assert len(load_problems("aime2024")) == 30

