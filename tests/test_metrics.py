"""Metrics and report: pass@k against enumeration, metrics on handcrafted runs, and the report files."""

from __future__ import annotations

import itertools
import json
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from mathtool.errors import ConfigError
from mathtool.metrics import (
    compute_metrics,
    load_run,
    pass_at_k,
    pass_k_values,
    per_problem_rows,
    summary_table,
    write_report,
)

EVIL = "<script>alert('pwned')</script>"


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


@pytest.mark.parametrize(("n", "c", "k"), [(200, 3, 50), (1000, 1, 7), (64, 10, 64), (512, 500, 13)])
def test_pass_at_k_large_n_matches_exact_binomials(n: int, c: int, k: int) -> None:
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_k_values() -> None:
    assert pass_k_values(1) == [1]
    assert pass_k_values(4) == [1, 2, 4]
    assert pass_k_values(6) == [1, 2, 4, 6]
    assert pass_k_values(16) == [1, 2, 4, 8, 16]


def traj(pid: str, sample: int, correct: float, tools: int = 0, tokens: int = 10, termination: str = "answered",
         error: str | None = None, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "problem_id": pid, "sample": sample, "correct": correct == 1.0, "num_tool_calls": tools, "num_turns": tools + 1,
        "response_tokens": tokens, "termination": termination, "error": error, "extracted_answer": "42",
        "ground_truth": "42", "messages": messages or [{"role": "user", "content": f"problem {pid}"}],
        "timings": {},
    }


def handcrafted() -> list[dict[str, Any]]:
    """p1: 4 samples, 1 correct; p2: 4 samples, 4 correct; p10: 2 samples (stopped early), 0 correct."""
    return [
        traj("p1", 0, 1.0, tools=2, tokens=100), traj("p1", 1, 0.0, tokens=300), traj("p1", 2, 0.0, tokens=50),
        traj("p1", 3, 0.0, termination="error", error="server died", tokens=0),
        *[traj("p2", s, 1.0, tools=1, tokens=20) for s in range(4)],
        traj("p10", 0, 0.0, tools=3, termination="budget", tokens=1000), traj("p10", 1, 0.0, tokens=30),
    ]


def test_compute_metrics_on_handcrafted_run() -> None:
    m = compute_metrics(handcrafted(), n_samples=4)
    assert m["num_problems"] == 3 and m["num_trajectories"] == 10
    assert m["pass@1"] == pytest.approx((1 / 4 + 1 + 0) / 3)
    assert m["pass@2"] == pytest.approx((1 / 2 + 1 + 0) / 3)  # p1: 1 - C(3,2)/C(4,2) = 1/2
    assert m["pass@4"] == pytest.approx((1 + 1) / 2)  # p10 has only 2 samples: left out of pass@4
    assert m["pass@k_num_problems"] == {"1": 3, "2": 3, "4": 2}
    assert "pass@3" not in m and "pass@8" not in m
    assert m["mean_response_tokens"] == pytest.approx(1560 / 10) and m["max_response_tokens"] == 1000
    assert m["mean_tool_calls"] == pytest.approx(9 / 10)
    assert m["frac_with_tool_calls"] == pytest.approx(6 / 10)
    assert m["termination_counts"] == {"answered": 8, "error": 1, "budget": 1}
    assert m["num_errors"] == 1
    json.dumps(m)  # metrics.json must be plain JSON


def test_compute_metrics_adds_n_samples_when_not_a_power_of_two() -> None:
    records = [traj("a", s, 1.0 if s == 0 else 0.0) for s in range(6)]
    m = compute_metrics(records, n_samples=6)
    assert [k for k in m if k.startswith("pass@") and k[5:].isdigit()] == ["pass@1", "pass@2", "pass@4", "pass@6"]
    assert m["pass@6"] == 1.0 and m["pass@4"] == pytest.approx(4 / 6)


def test_compute_metrics_on_empty_run() -> None:
    m = compute_metrics([], n_samples=4)
    assert m["num_problems"] == 0 and m["pass@1"] is None and m["mean_tool_calls"] is None


def test_per_problem_rows_are_in_natural_order() -> None:
    rows = per_problem_rows(handcrafted())
    assert [r.problem_id for r in rows] == ["p1", "p2", "p10"]
    p1 = rows[0]
    assert (p1.n, p1.correct, p1.pass_at_1, p1.mean_tool_calls, p1.mean_response_tokens) == (4, 1, 0.25, 0.5, 112.5)


def test_summary_table_lists_scores_first_with_their_spread() -> None:
    metrics = compute_metrics(handcrafted(), 4)
    table = summary_table(metrics)
    names = list(table.columns[0].cells)
    assert names[:6] == ["pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"] and "termination: budget" in names
    assert not any(name.endswith(("_stderr", "_ci95")) or name == "uncertainty" for name in names)
    console = Console(record=True, width=120)
    console.print(table)
    text = console.export_text()
    low, high = metrics["pass@1_ci95"]
    assert f"pass@1                │ 0.4167 ± {metrics['pass@1_stderr']:.4f} [{low:.4f}, {high:.4f}]" in text
    assert "1.0000 ± 0.0000 [1.0000, 1.0000] (over 2 of 3 problems)" in text
    assert "bootstrap over problems" in text


def write_run(run_dir: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"n_samples": 4, "dataset": "toy", "model": "m",
                                                     "api_key": "sk-secret"}))
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "trajectories.jsonl").write_text(lines + tail)
    return run_dir


def test_load_run_skips_torn_last_line_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = write_run(tmp_path / "run", handcrafted(), tail='{"problem_id": "p3", "sample": 0, "rew')
    with caplog.at_level(logging.WARNING):
        config, records = load_run(run_dir)
    assert config["n_samples"] == 4 and len(records) == 10
    assert "torn last line" in caplog.text


def test_reader_and_resume_agree_on_a_last_line_without_its_newline(tmp_path: Path) -> None:
    from mathtool.run_record import RunDir

    run_dir = write_run(tmp_path / "run", handcrafted(), tail=json.dumps(traj("p3", 0, 1.0)))  # killed before "\n"
    assert len(load_run(run_dir)[1]) == 10  # not counted: a resume redoes it
    RunDir(run_dir, json.loads((run_dir / "config.json").read_text()), resume=True).close()
    text = (run_dir / "trajectories.jsonl").read_text()
    assert '"p3"' not in text and text.endswith("\n") and len(load_run(run_dir)[1]) == 10


def test_a_run_written_before_correct_was_named_so_still_reports_and_resumes(tmp_path: Path) -> None:
    from mathtool.run_record import RunDir

    old = [{**{k: v for k, v in r.items() if k != "correct"}, "reward": float(r["correct"])} for r in with_a_vote()]
    old_run, new_run = write_run(tmp_path / "old", old), write_run(tmp_path / "new", with_a_vote())
    assert load_run(old_run) == load_run(new_run)
    assert compute_metrics(load_run(old_run)[1], 4)["pass@1"] == compute_metrics(with_a_vote(), 4)["pass@1"] > 0
    assert write_report(old_run)[0].read_text() == write_report(new_run)[0].read_text().replace("new", "old")
    run = RunDir(old_run, json.loads((old_run / "config.json").read_text()), resume=True)
    run.close()
    assert run.records() == load_run(new_run)[1] and len(run.finished()) == len(old) - 1  # the error is redone


def test_load_run_keeps_the_last_record_of_a_redone_sample(tmp_path: Path) -> None:
    records = [*handcrafted(), traj("p1", 3, 1.0)]  # a resumed run redid the errored sample
    _, loaded = load_run(write_run(tmp_path / "run", records))
    assert len(loaded) == 10
    assert compute_metrics(loaded, 4)["num_errors"] == 0


def test_load_run_without_trajectories_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run(tmp_path)


def evil_run() -> list[dict[str, Any]]:
    messages = [
        {"role": "system", "content": "Use python."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": f"{EVIL}\n```python\nprint(6*7)\n```"},
        {"role": "user", "content": "```output\n42\n```"},
        {"role": "assistant", "content": "\\boxed{42}"},
    ]
    return [*handcrafted(), traj("p<b>3</b>", 0, 1.0, tools=1, messages=messages)]


def test_report_is_self_contained_and_escapes_model_text(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", evil_run())
    markdown_path, html_path = write_report(run_dir)
    assert (markdown_path.name, html_path.name) == ("report.md", "report.html")
    page = html_path.read_text()
    assert page.count("<script") == 1  # the page's own, allowed by hash in its Content-Security-Policy
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert page.count('<details class="trajectory">') == 11
    assert page.count('<div class="msg tool">') == 1  # the ```output reply, not the problem statement
    assert page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere
    assert "sk-secret" not in page
    evil_id = "p&lt;b&gt;3&lt;/b&gt;"
    for pid in ("p1", "p2", "p10", evil_id):
        assert f">{pid}</a></td>" in page
    markdown = markdown_path.read_text()
    assert "| p10 | 2 | 0 | 0.0000 |" in markdown and "<b>" not in markdown


def test_worked_examples_are_folded_before_the_problem_in_the_report(tmp_path: Path) -> None:
    from mathtool.agent.parsers import MARKDOWN
    from mathtool.agent.prompts import initial_messages
    from mathtool.data.problem import Problem, WorkedExample

    problem = Problem("p", "What is 6*7?", "42", examples=(WorkedExample("What is 7*8?", "print(7*8)", "56", "56"),))
    messages = [*initial_messages(problem, MARKDOWN), {"role": "assistant", "content": "```python\nprint(6*7)\n```"},
                {"role": "user", "content": "```output\n42\n```"}, {"role": "assistant", "content": "\\boxed{42}"}]
    run_dir = write_run(tmp_path / "run", [traj("p", 0, 1.0, tools=1, messages=messages) | {"worked_examples": 1}])
    _, html_path = write_report(run_dir)
    page = html_path.read_text()
    folded = page.split('<details class="examples"><summary>1 worked example shown before the problem</summary>')[1]
    folded = folded.split("</details>")[0]
    assert "What is 7*8?" in folded and "print(7*8)" in folded and "56" in folded and "What is 6*7?" not in folded
    after = page.split("1 worked example shown before the problem")[1].split("</details>", 1)[1]
    assert "What is 6*7?" in after and "print(6*7)" in after
    assert page.count('<div class="msg tool">') == 2  # the example's output and the run's own


def test_report_never_overwrites_an_existing_report(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", handcrafted())
    (run_dir / "report.md").write_text("my notes")
    markdown_path, html_path = write_report(run_dir)
    assert (markdown_path.name, html_path.name) == ("report-1.md", "report-1.html")
    assert (run_dir / "report.md").read_text() == "my notes"
    assert write_report(run_dir)[0].name == "report-2.md"
    markdown_path, _ = write_report(run_dir, overwrite=True)
    assert markdown_path.name == "report.md" and markdown_path.read_text() != "my notes"


def test_accuracy_plot_takes_problem_ids_literally() -> None:
    from mathtool.metrics.plots import accuracy_plot

    rows = per_problem_rows([traj("a$\\frac{b$", 0, 1.0), traj("p2", 0, 0.0)])  # broken mathtext if parsed
    assert len(accuracy_plot(rows)) > 1000


def test_run_dir_refuses_reuse_without_resume_and_says_what_a_resume_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mathtool.run_record import RunDir

    config = {"dataset": "toy", "model": "m", "n_parallel_agents": 4, "resume": False}
    run = RunDir(tmp_path, config, resume=False)
    run.append(traj("p1", 0, 1.0))
    run.close()
    with pytest.raises(ConfigError, match="add --resume"):
        RunDir(tmp_path, config, resume=False)
    with pytest.raises(ConfigError, match=r"was run with model .m. \(now .other.\)"):
        RunDir(tmp_path, {**config, "model": "other"}, resume=True)
    with caplog.at_level(logging.WARNING):
        RunDir(tmp_path, {**config, "resume": True}, resume=True).close()
    assert not caplog.records  # the same settings: nothing to say
    with caplog.at_level(logging.WARNING):
        run = RunDir(tmp_path, {**config, "n_parallel_agents": 8, "resume": True}, resume=True)
    run.close()
    assert "n_parallel_agents: 4 -> 8" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["n_parallel_agents"] == 8
    assert [r["problem_id"] for r in run.records()] == ["p1"]


def test_bootstrap_on_a_hand_computable_case() -> None:
    from mathtool.metrics.uncertainty import bootstrap

    # Two problems, values 0 and 1: a resampled mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4, so its
    # standard deviation is sqrt(1/8) and its 2.5th and 97.5th percentiles are 0 and 1.
    estimate = bootstrap([0.0, 1.0])
    assert estimate is not None and estimate.mean == 0.5 and estimate.num_problems == 2
    assert estimate.stderr == pytest.approx(math.sqrt(1 / 8), rel=0.05)
    assert estimate.ci95 == (0.0, 1.0)
    constant = bootstrap([0.25] * 7)
    assert constant is not None and constant.stderr == 0.0 and constant.ci95 == (0.25, 0.25)
    assert bootstrap([]) is None


def test_bootstrap_matches_the_binomial_standard_error_and_is_seeded() -> None:
    from mathtool.metrics.uncertainty import bootstrap

    values = [1.0] * 8 + [0.0] * 12  # 20 problems, 8 solved: sd of the mean = sqrt(0.4 * 0.6 / 20)
    estimate = bootstrap(values)
    assert estimate is not None
    assert estimate.stderr == pytest.approx(math.sqrt(0.4 * 0.6 / 20), rel=0.05)
    low, high = estimate.ci95
    assert 0.15 <= low <= 0.25 and 0.55 <= high <= 0.65 and low < 0.4 < high
    assert bootstrap(values) == estimate  # the same values always give the same interval


def test_metrics_json_has_stderr_and_interval_beside_every_score() -> None:
    m = compute_metrics(handcrafted(), n_samples=4)
    for name in ("pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"):
        low, high = m[f"{name}_ci95"]
        assert low <= m[name] <= high and m[f"{name}_stderr"] >= 0, name
    assert m["pass@4_stderr"] == 0.0 and m["pass@4_ci95"] == [1.0, 1.0]  # over p1 and p2, both 1.0
    assert m["uncertainty"]["method"] == "bootstrap over problems"
    assert compute_metrics(handcrafted(), n_samples=4) == m  # seeded: a rerun reports the same interval
    assert json.loads(json.dumps(m)) == m


def answered(pid: str, answers: list[str | None], truth: str, right: set[str]) -> list[dict[str, Any]]:
    """A problem's samples with these final answers; those in `right` graded correct."""
    return [{**traj(pid, s, 1.0 if a in right else 0.0), "extracted_answer": a, "ground_truth": truth}
            for s, a in enumerate(answers)]


def test_majority_vote_groups_equivalent_answers_written_differently() -> None:
    from mathtool.metrics.majority import maj_at_k, vote

    # The right answer is written three ways; without grouping, "3" (twice) would win the vote.
    records = answered("half", ["\\frac{1}{2}", "3", "0.5", "3", "\\dfrac12"], "\\frac12",
                       right={"\\frac{1}{2}", "0.5", "\\dfrac12"})
    row = per_problem_rows(records)[0]
    assert row.vote.groups == (0, 1, 0, 1, 0) and row.vote.answers == ("\\frac{1}{2}", "3")
    assert row.vote.majority_answer == "\\frac{1}{2}" and row.vote.majority_right and row.vote.agreement == 0.6
    assert maj_at_k(row.vote, 5) == 1.0
    assert maj_at_k(row.vote, 1) == 0.6  # one sample: its own answer
    # Of the 10 pairs of samples, 4 vote "3": both are "3" ({1,3}), or a 1-1 tie that "3" came first in
    # ({1,2}, {1,4}, {3,4}).
    assert maj_at_k(row.vote, 2) == pytest.approx(6 / 10)
    m = compute_metrics(records, n_samples=5)
    assert m["maj@4"] == pytest.approx(maj_at_k(vote([(r["extracted_answer"], r["correct"])
                                                          for r in records]), 4))


def test_majority_vote_ties_go_to_the_earliest_answer() -> None:
    from mathtool.metrics.majority import maj_at_k

    first_right = per_problem_rows(answered("t", ["5", "7", "7", "5"], "5", right={"5"}))[0].vote
    first_wrong = per_problem_rows(answered("t", ["7", "5", "5", "7"], "5", right={"5"}))[0].vote
    assert first_right.majority_answer == "5" and maj_at_k(first_right, 4) == 1.0
    assert first_wrong.majority_answer == "7" and maj_at_k(first_wrong, 4) == 0.0
    # k=2: of 6 pairs, the two "5,5" and "7,7" pairs are decided by votes, the 4 mixed ones by order.
    assert maj_at_k(first_right, 2) == pytest.approx(3 / 6)
    assert [maj_at_k(first_right, 2) for _ in range(3)] == [maj_at_k(first_right, 2)] * 3


def test_samples_without_an_answer_do_not_vote() -> None:
    from mathtool.metrics.majority import maj_at_k

    row = per_problem_rows(answered("q", [None, None, "12", None], "12", right={"12"}))[0]
    assert row.vote.majority_answer == "12" and row.vote.agreement == 0.25
    assert maj_at_k(row.vote, 4) == 1.0 and maj_at_k(row.vote, 1) == 0.25
    nobody = per_problem_rows(answered("q", [None, None], "12", right=set()))[0]
    assert nobody.vote.majority_answer is None and maj_at_k(nobody.vote, 2) == 0.0


def test_maj_at_k_samples_subsets_with_a_fixed_seed_when_there_are_many() -> None:
    from mathtool.metrics.majority import MAX_SUBSETS, maj_at_k

    answers = [str(s % 3) for s in range(16)]  # C(16, 8) = 12870 subsets: drawn, not enumerated
    assert math.comb(16, 8) > MAX_SUBSETS
    vote = per_problem_rows(answered("many", answers, "0", right={"0"}))[0].vote
    value = maj_at_k(vote, 8)
    assert 0.3 < value < 0.8 and maj_at_k(vote, 8) == value


def with_a_vote() -> list[dict[str, Any]]:
    """The handcrafted run and a problem whose samples answer 1/2 two ways and 3 twice."""
    half = answered("half", ["\\frac{1}{2}", "3", "0.5", "3"], "1/2", right={"\\frac{1}{2}", "0.5"})
    return [*handcrafted(), *half]


def test_report_shows_intervals_majority_and_agreement(tmp_path: Path) -> None:
    records = with_a_vote()
    run_dir = write_run(tmp_path / "run", records)
    markdown_path, html_path = write_report(run_dir)
    m = compute_metrics(records, 4)
    markdown, page = markdown_path.read_text(), html_path.read_text()
    low, high = m["maj@2_ci95"]
    assert f"| maj@2 | {m['maj@2']:.4f} ± {m['maj@2_stderr']:.4f} [{low:.4f}, {high:.4f}] |" in markdown
    assert "| half | 4 | 2 | 0.5000 | \\frac{1}{2} | 0.50 | yes |" in markdown
    assert "bootstrap over problems" in markdown and "bootstrap over problems" in page
    assert f"<td class='num'>{m['pass@1_stderr']:.4f}</td><td class='num'>[{m['pass@1_ci95'][0]:.4f}," in page
    assert "<code>\\frac{1}{2}</code></td><td class='num'>2/4 (0.50)</td>" in page


@pytest.mark.slow
def test_answers_the_grader_cannot_compare_in_time_cost_one_timeout_each() -> None:
    from mathtool.grading import same_answer
    from mathtool.metrics.majority import GROUPING_TIMEOUT_S, vote

    towers = ["9^{9^{9^{9^{9}}}}", "8^{8^{8^{8^{8}}}}", "7^{7^{7^{7^{7}}}}"]
    assert same_answer(towers[0], towers[1], GROUPING_TIMEOUT_S) is None  # undecided in time
    assert same_answer("5", "5.0") is True
    # towers[1] times out against towers[0]: both retire. towers[2] meets no one to compare with; "5"
    # times out against it: both retire. The second "5" joins by its text; "5.0" meets only retired groups.
    result = vote([(a, False) for a in [*towers, "5", "5", "5.0"]])
    assert result.groups == (0, 1, 2, 3, 3, 4)
