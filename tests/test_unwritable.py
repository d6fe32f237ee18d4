"""Places that cannot be written are refused in one line before any slow work, and a write that fails midway
(a full disk) is one line too, naming the path and the fix.

The filesystems here are real: each command runs in its own user and mount namespace (`unshare -Urm`), where
a directory is bind-mounted read-only or a small tmpfs is filled up. chmod would prove nothing: these tests
may run as root, whom permission bits do not stop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_compare import two_runs

from mathtool.errors import ConfigError
from mathtool.paths import atomic_write_text, check_writable

READ_ONLY = 'mount --bind "$D" "$D" && mount -o remount,bind,ro "$D"'
# A 256 KiB tmpfs over $D holding a copy of $SRC (if given); FULL fills it: new empty files still fit, data not.
SMALL = 'mount -t tmpfs -o size=256k none "$D" && { [ -z "$SRC" ] || cp -a "$SRC/." "$D/"; }'
FULL = f'{SMALL} && {{ dd if=/dev/zero of="$D/.fill" bs=4k 2>/dev/null; true; }}'
FAST_S = 60  # a vLLM server or a model load takes minutes on 2 cores; a refusal takes a few seconds


def in_namespace(setup: str, directory: Path, argv: list[str], source: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `argv` after `setup` (a shell line over $D = directory, $SRC = source) in a new mount namespace."""
    script = f'{setup} || exit 97; exec "$@"'
    variables = {**os.environ, **(env or {}), "D": str(directory), "SRC": str(source or ""), "COLUMNS": "200"}
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", *argv], capture_output=True, text=True,
                            timeout=300, env=variables)
    assert result.returncode != 97, f"the namespace setup failed: {result.stderr}"
    return result


def mathtool_in(setup: str, directory: Path, *args: str, source: Path | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return in_namespace(setup, directory, [sys.executable, "-m", "mathtool.cli", *args], source, env)


@pytest.fixture(scope="module")
def mounts_work(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip where this machine cannot make a read-only bind mount in a user namespace (no unshare, or user
    namespaces switched off)."""
    directory = tmp_path_factory.mktemp("probe")
    try:
        result = subprocess.run(["unshare", "-Urm", "sh", "-c", f'{READ_ONLY} && ! touch "$D/x" 2>/dev/null'],
                                capture_output=True, text=True, timeout=30, env={**os.environ, "D": str(directory)})
    except FileNotFoundError:
        pytest.skip("no `unshare` here: cannot make a read-only filesystem to test against")
    if result.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount in a user namespace here: {result.stderr.strip()}")


needs_mounts = pytest.mark.usefixtures("mounts_work")


def one_error_line(result: subprocess.CompletedProcess, *parts: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and all(part in lines[0] for part in parts), lines[0]
    return lines[0]


def toy_dataset(tmp_path: Path) -> Path:
    path = tmp_path / "toy.jsonl"
    path.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    return path


@needs_mounts
def test_eval_output_on_a_read_only_filesystem_is_refused_before_the_server(tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    started = time.monotonic()
    result = mathtool_in(READ_ONLY, read_only, "eval", "--dataset", str(toy_dataset(tmp_path)),
                         "--output", str(read_only / "run"))
    one_error_line(result, f"cannot write {read_only / 'run'}: it is on a read-only filesystem", "--output")
    assert time.monotonic() - started < FAST_S


@needs_mounts
def test_eval_resume_in_a_read_only_run_directory_is_refused(tmp_path: Path) -> None:
    run, _ = two_runs(tmp_path)
    result = mathtool_in(READ_ONLY, run, "eval", "--dataset", str(toy_dataset(tmp_path)), "--output", str(run),
                         "--resume")
    one_error_line(result, f"cannot write {run}: it is on a read-only filesystem")


@needs_mounts
def test_train_output_on_a_read_only_filesystem_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    started = time.monotonic()
    result = mathtool_in(READ_ONLY, read_only, "train", "--preset", "cpu-demo", "--output", str(read_only / "t"))
    one_error_line(result, f"cannot write {read_only / 't'}: it is on a read-only filesystem", "--output")
    assert time.monotonic() - started < FAST_S


def test_train_and_compare_refuse_an_output_that_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a, b = two_runs(tmp_path)
    for args in (["train", "--preset", "cpu-demo", "--output", str(a_file)],
                 ["compare", str(a), str(b), "--output", str(a_file)]):
        result = subprocess.run([sys.executable, "-m", "mathtool.cli", *args], capture_output=True, text=True,
                                timeout=120)
        one_error_line(result, f"cannot write {a_file}: it is a file, not a directory")


@needs_mounts
def test_report_into_a_read_only_run_directory_writes_nothing_and_says_so(tmp_path: Path) -> None:
    run, _ = two_runs(tmp_path)
    result = mathtool_in(READ_ONLY, run, "report", str(run))
    one_error_line(result, f"cannot write {run}: it is on a read-only filesystem", "copy the run directory")
    assert not result.stdout.strip()  # refused before the run was read and summarised
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "trajectories.jsonl"]


@needs_mounts
def test_report_onto_a_full_disk_is_one_line_and_leaves_no_half_file(tmp_path: Path) -> None:
    source, _ = two_runs(tmp_path)
    run = tmp_path / "full"
    run.mkdir()
    listing = "import os, sys; print(sorted(os.listdir(sys.argv[1])))"
    result = in_namespace(FULL, run, ["sh", "-c", f'{sys.executable} -m mathtool.cli report "$D"; echo "rc=$?"; '
                                                  f'{sys.executable} -c "{listing}" "$D"'], source)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (f"error: cannot write {run}: no space left on the device; "
                                            "copy the run directory to a writable place and report the copy")
    assert "rc=2" in result.stdout
    assert "['.fill', 'config.json', 'trajectories.jsonl']" in result.stdout  # no report, no temp file


@needs_mounts
def test_compare_output_on_a_read_only_filesystem_is_refused(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    result = mathtool_in(READ_ONLY, read_only, "compare", str(a), str(b), "--output", str(read_only))
    one_error_line(result, f"cannot write {read_only}: it is on a read-only filesystem", "--output")
    assert not result.stdout.strip()  # refused before the comparison


@needs_mounts
def test_prepare_into_a_read_only_home_is_refused_before_reading(tmp_path: Path, shared_data: Path) -> None:
    home = tmp_path / "rohome"
    home.mkdir()
    result = mathtool_in(READ_ONLY, home, "prepare", "aime2024", "--source", str(shared_data),
                         env={"MATHTOOL_HOME": str(home)})
    one_error_line(result, f"cannot write {home / 'datasets'}: it is on a read-only filesystem",
                   "set MATHTOOL_HOME to a writable directory")


@needs_mounts
def test_trajectories_onto_a_full_disk_are_one_line_that_says_resume(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    code = ("from pathlib import Path; import sys\n"
            "from mathtool.run_record import RunDir\n"
            "from mathtool.errors import MathtoolError\n"
            "run = RunDir(Path(sys.argv[1]) / 'run', {'dataset': 'toy'}, resume=False)\n"
            "try:\n"
            "    (Path(sys.argv[1]) / 'fill').write_bytes(bytes(1_000_000))\n"
            "except OSError:\n"
            "    pass\n"
            "for step in (lambda: run.append({'problem_id': 'p', 'sample': 0}), run.close):\n"
            "    try:\n"
            "        step()\n"
            "    except MathtoolError as e:\n"
            "        print(e)\n")
    result = in_namespace(SMALL, small, [sys.executable, "-c", code, str(small)])
    line = (f"cannot write {small / 'run' / 'trajectories.jsonl'}: no space left on the device; "
            "make room or fix the directory, then rerun with --resume")
    assert result.stdout.splitlines() == [line, line], result  # the append, then the close (the line still buffered)
    assert "Traceback" not in result.stderr


def test_check_writable_creates_nothing_and_refuses_a_file(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "deeper", "pick another")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=f"cannot write {tmp_path / 'f' / 'run'}: {tmp_path / 'f'} is a file"):
        check_writable(tmp_path / "f" / "run", "pick another")


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


@needs_mounts
def test_serving_the_embedded_model_from_a_read_only_home_is_one_line(tmp_path: Path) -> None:
    """The first use converts the model into MATHTOOL_HOME: a home that cannot take it is named, with the fix."""
    home = tmp_path / "rohome"
    home.mkdir()
    started = time.monotonic()
    result = mathtool_in(READ_ONLY, home, "serve", "--port", "0", env={"MATHTOOL_HOME": str(home)})
    one_error_line(result, f"cannot write {home / 'models'}: it is on a read-only filesystem",
                   "set MATHTOOL_HOME to a writable directory")
    assert time.monotonic() - started < FAST_S
