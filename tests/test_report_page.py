"""The report as a person opens it: headless Chromium loads report.html, its script runs to the end with no
console error or uncaught exception, and the page shows the numbers of metrics.json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest
from test_metrics import with_a_vote, write_run

from mathtool.metrics import compute_metrics, write_report
from mathtool.run_record import RunDir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: scripts/setup.sh test installs it")
CONSOLE_LINE = re.compile(r":CONSOLE[:(]\d*\)?\] (.*)")  # every console message and uncaught exception


def load_in_chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """(the DOM once the page's scripts have run, the page's console messages)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, [m.group(1) for m in map(CONSOLE_LINE.search, result.stderr.splitlines()) if m]


def test_console_errors_are_caught(tmp_path: Path) -> None:
    """The check below can fail: a page whose script throws is reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>throw new Error('boom');</script></body></html>")
    _, console = load_in_chromium(page, tmp_path / "profile")
    assert any("Uncaught Error: boom" in line for line in console), console


def test_report_loads_without_script_errors_and_shows_metrics_json(tmp_path: Path) -> None:
    records = with_a_vote()
    run_dir = write_run(tmp_path / "run", records)
    run = RunDir(run_dir, json.loads((run_dir / "config.json").read_text()), resume=True)
    run.write_metrics(compute_metrics(records, 4))  # what `mathtool eval` leaves beside the trajectories
    run.close()
    _, html_path = write_report(run_dir)

    dom, console = load_in_chromium(html_path, tmp_path / "profile")
    assert console == []
    assert 'data-script="ran"' in dom  # the page's own script ran to its last line (the CSP let it)
    text = unescape(re.sub(r"<[^>]+>", " ", dom))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"):
        low, high = metrics[f"{name}_ci95"]
        shown = f"{name} {metrics[name]:.4f} {metrics[f'{name}_stderr']:.4f} [{low:.4f}, {high:.4f}]"
        assert shown in " ".join(text.split()), name
    assert "half" in text and "2/4 (0.50)" in text  # the per-problem table, with its agreement column
