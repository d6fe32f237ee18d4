"""`mathtool compare`: paired differences and flipped problems on handcrafted runs, then on real evals
(the embedded vLLM server) with the warnings for settings that change what the scores mean."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_metrics import answered

from mathtool.metrics.compare import compare_runs, config_warnings, score_run

CONFIG = {"dataset": "toy", "model": "m", "tool_format": "markdown", "max_response_length": 256, "n_samples": 2,
          "temperature": 0.6, "top_p": 0.95}


def mathtool(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathtool.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def write_run(path: Path, records: list[dict[str, Any]], **config: Any) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, **config}))
    (path / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def two_runs(tmp_path: Path, **second_config: Any) -> list[Path]:
    """Two samples a problem. p1, p2: alike; p3: right in the second run only; p4: its majority right in the
    first only (the second's 1-1 tie goes to the earlier, wrong answer); p5: only the first ran it."""
    first = [*answered("p1", ["1", "1"], "1", {"1"}), *answered("p2", ["5", "6"], "2", set()),
             *answered("p3", ["9", "8"], "3", set()), *answered("p4", ["4", "4"], "4", {"4"}),
             *answered("p5", ["5", "5"], "5", {"5"})]
    second = [*answered("p1", ["1", "2"], "1", {"1"}), *answered("p2", ["5", "6"], "2", set()),
              *answered("p3", ["3", "3"], "3", {"3"}), *answered("p4", ["7", "4"], "4", {"4"})]
    return [write_run(tmp_path / "a", first), write_run(tmp_path / "b", second, **second_config)]


def test_paired_difference_and_flips_on_handcrafted_runs(tmp_path: Path) -> None:
    comparison = compare_runs(two_runs(tmp_path))
    assert comparison.common == ["p1", "p2", "p3", "p4"]
    # pass@1, first run: 1, 0, 0, 1; second: 1/2, 0, 1, 1/2; differences -1/2, 0, 1, -1/2 (p5 left out).
    difference = comparison.differences["pass@1"]
    assert difference is not None and difference.num_problems == 4
    assert difference.mean == pytest.approx(0.0) and difference.stderr > 0
    assert difference.ci95[0] < 0 < difference.ci95[1]
    # maj@2 per problem: first 1, 0, 0, 1; second 1, 0, 1, 0.
    assert comparison.differences["maj@2"].mean == pytest.approx(0.0)  # type: ignore[union-attr]
    assert comparison.gained == ["p3"] and comparison.lost == ["p4"]
    assert comparison.warnings == ["runs differ in their problems (a: 5, b: 4; 4 in common)"]


def test_warnings_name_each_setting_that_changes_what_scores_mean(tmp_path: Path) -> None:
    a, b = two_runs(tmp_path, temperature=1.0, chat_template="{{ messages }}", dataset_sha256="abc")
    warnings = config_warnings([score_run(a, "a"), score_run(b, "b")])
    # chat_template and dataset_sha256 are recorded by newer runs only: compared when both record them.
    assert warnings == ["runs differ in temperature (a: 0.6, b: 1.0)",
                        "runs differ in their problems (a: 5, b: 4; 4 in common)"]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**config, "chat_template": template, "dataset_sha256": "abd"}))
    warnings = config_warnings([score_run(a, "a"), score_run(b, "b")])
    digest = hashlib.sha256(template.encode()).hexdigest()[:12]
    assert warnings[:3] == ["runs differ in dataset_sha256 (a: abd, b: abc)",
                            f"runs differ in chat_template (a: sha256:{digest}, b: {{{{ messages }}}})",
                            "runs differ in temperature (a: 0.6, b: 1.0)"]


def test_compare_needs_two_runs_and_says_so_in_one_line(tmp_path: Path) -> None:
    a, _ = two_runs(tmp_path)
    result = mathtool("compare", str(a))
    assert result.returncode == 2 and result.stderr.strip() == "error: compare needs at least two run directories"


@pytest.fixture(scope="module")
def real_runs(embedded_server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny real evals (2 problems x 2 samples) of the embedded model: a; b with a longer budget and another
    temperature; c as a but on the first problem only."""
    base = tmp_path_factory.mktemp("compare-runs")
    dataset = base / "easy.jsonl"
    dataset.write_text("".join(json.dumps({"id": f"add-{i}", "question": f"What is {i} + {3 * i}?",
                                           "answer": str(4 * i)}) + "\n" for i in (1, 2)))
    common = ["eval", "--dataset", str(dataset), "--base-url", embedded_server.base_url, "--n-samples", "2",
              "--n-parallel-agents", "4", "--tool-format", "markdown"]
    flags = {"a": ["--max-response-length", "64", "--seed", "1"],
             "b": ["--max-response-length", "96", "--temperature", "1.0", "--seed", "2"],
             "c": ["--max-response-length", "64", "--seed", "1", "--limit", "1"]}
    for name, extra in flags.items():
        result = mathtool(*common, *extra, "--output", str(base / name))
        assert result.returncode == 0, result.stderr[-3000:]
    return {name: base / name for name in flags}


def metrics_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def score_cell(metrics: dict[str, Any], name: str) -> str:
    return f"{metrics[name]:.4f} ± {metrics[f'{name}_stderr']:.4f}"


@pytest.mark.server
@pytest.mark.slow
def test_compare_two_real_runs_warns_about_their_settings(real_runs: dict[str, Path], tmp_path: Path) -> None:
    result = mathtool("compare", str(real_runs["a"]), str(real_runs["b"]), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["warning: runs differ in max_response_length (a: 64, b: 96)",
                                          "warning: runs differ in temperature (a: 0.6, b: 1.0)"]
    a, b = metrics_of(real_runs["a"]), metrics_of(real_runs["b"])
    page = (tmp_path / "out" / "compare.html").read_text()
    for name in ("pass@1", "pass@2", "maj@1", "maj@2"):
        for metrics in (a, b):
            assert score_cell(metrics, name) in result.stdout and score_cell(metrics, name) in page, name
        # Both ran the same two problems, so the mean of the paired differences is b's score minus a's.
        assert f"{b[name] - a[name]:+.4f} ±" in result.stdout, name
    assert "difference (paired)" in result.stdout
    assert "difference: b - a, problem by problem over the 2 problems both runs ran" in result.stdout
    assert "right in b only (majority vote):" in result.stdout and "runs differ in temperature" in page


@pytest.mark.server
@pytest.mark.slow
def test_compare_warns_when_the_problems_differ(real_runs: dict[str, Path]) -> None:
    hashes = [json.loads((real_runs[n] / "config.json").read_text())["dataset_sha256"] for n in ("a", "c")]
    assert hashes[0] != hashes[1] and all(len(h) == 64 for h in hashes)
    result = mathtool("compare", str(real_runs["a"]), str(real_runs["c"]))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: runs differ in dataset_sha256 (a: {hashes[0][:12]}, c: {hashes[1][:12]})",
        "warning: runs differ in their problems (a: 2, c: 1; 1 in common)",
    ]
    assert "over the 1 problems both runs ran" in result.stdout


@pytest.mark.server
@pytest.mark.slow
def test_report_of_a_real_run_shows_metrics_json_and_is_the_same_when_rerun(real_runs: dict[str, Path]) -> None:
    runs = [mathtool("report", str(real_runs["a"])) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout.split("wrote")[0] == runs[1].stdout.split("wrote")[0]  # a seeded bootstrap
    metrics = metrics_of(real_runs["a"])
    low, high = metrics["pass@1_ci95"]
    assert f"{score_cell(metrics, 'pass@1')} [{low:.4f}, {high:.4f}]" in runs[0].stdout
    page = (real_runs["a"] / "report.html").read_text()
    value, stderr = metrics["maj@2"], metrics["maj@2_stderr"]
    assert f"<th>maj@2</th><td class='num'>{value:.4f}</td><td class='num'>{stderr:.4f}</td>" in page
