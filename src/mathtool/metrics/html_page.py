"""The self-contained HTML report: inline CSS, base64 plots, every trajectory as an expandable conversation.

All text that came from a model, a dataset or a config goes through `html.escape`: model output is
untrusted and must never become live markup. The page's one script (sortable tables, expand/collapse
all) is allowed by its hash in the page's Content-Security-Policy, so no other script could run.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from typing import Any

from mathtool.agent.prompts import MESSAGES_PER_EXAMPLE
from mathtool.metrics.summary import (
    ProblemRow,
    format_value,
    group_by_problem,
    score_names,
    summary_rows,
)
from mathtool.metrics.uncertainty import RESAMPLES, SEED
from mathtool.run_record import record_is_correct

SECRET_KEY_PARTS = ("api_key", "apikey", "secret", "password", "authorization")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: .2rem; } .run-info { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { display: block; max-width: 100%; margin: .5rem 0 1rem; }
details { margin: .3rem 0; } details.trajectory > summary { cursor: pointer; padding: .2rem; }
details.examples { margin-left: 1rem; } details.examples > summary { cursor: pointer; color: #666; font-size: .85rem; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #cf222e; font-weight: bold; }
.msg { border-left: 4px solid #ccc; margin: .4rem 0 .4rem 1rem; padding: .2rem .6rem; }
.msg .role { font-size: .75rem; text-transform: uppercase; color: #666; }
.msg pre { white-space: pre-wrap; word-break: break-word; margin: .2rem 0; font-size: .85rem; }
.msg.system { border-color: #999; background: #fafafa; } .msg.user { border-color: #4c72b0; }
.msg.assistant { border-color: #55a868; }
.msg.tool { border-color: #8250df; background: #1e1e2e; color: #e0e0e0; }
.msg.tool .role { color: #c0a8ff; }
.error { color: #cf222e; white-space: pre-wrap; }
.note { color: #555; font-size: .85rem; max-width: 60rem; }
td.answer { max-width: 14rem; overflow-wrap: anywhere; } tr > td:first-child { white-space: nowrap; }
.histograms { display: flex; flex-wrap: wrap; gap: 1rem; } .histograms img.plot { max-width: calc(50% - .5rem); }
table.sortable th { cursor: pointer; user-select: none; } table.sortable th:hover { background: #e6e6e6; }
button { margin: 0 .4rem .4rem 0; }
"""

# Sortable tables (click a header; again to reverse) and expand/collapse-all buttons. It ends by marking
# the page, so a headless browser can tell that it ran to the end.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("tr:first-child th").forEach(function (header, column) {
    header.addEventListener("click", function () {
      var rows = Array.from(table.querySelectorAll("tr")).slice(1);
      var up = header.dataset.order !== "up";
      header.dataset.order = up ? "up" : "down";
      function key(row) {
        var text = row.children[column].textContent;
        var number = parseFloat(text);
        return isNaN(number) ? text : number;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
        return up ? order : -order;
      });
      rows.forEach(function (row) { table.appendChild(row); });
    });
  });
});
document.querySelectorAll("button[data-details]").forEach(function (button) {
  button.addEventListener("click", function () {
    var open = button.dataset.details === "open";
    document.querySelectorAll("details.trajectory").forEach(function (d) { d.open = open; });
  });
});
document.documentElement.dataset.script = "ran";
"""
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
CSP = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_HASH}'"



def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _content_text(content: Any) -> str:
    """A message's text: a plain string, or the text parts of an OpenAI content list."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def _is_tool_output(message: dict[str, Any], is_first_user: bool) -> bool:
    """Tool results come back as `tool` messages, or as user messages holding an ```output block."""
    if message.get("role") == "tool":
        return True
    return message.get("role") == "user" and not is_first_user and "```output" in _content_text(
        message.get("content"))


def _message_html(message: dict[str, Any], is_first_user: bool) -> str:
    role = str(message.get("role", "?"))
    css, label = ("tool", "tool output") if _is_tool_output(message, is_first_user) else (role, role)
    text = _content_text(message.get("content"))
    if message.get("tool_calls"):
        text += "\n[tool_calls] " + json.dumps(message["tool_calls"], ensure_ascii=False, indent=1)
    css_class = css if css in ("system", "user", "assistant", "tool") else "user"
    return f'<div class="msg {css_class}"><div class="role">{_e(label)}</div><pre>{_e(text)}</pre></div>'


def _conversation_html(messages: list[dict[str, Any]], worked_examples: int = 0) -> str:
    """The messages in order; the worked examples shown before the problem (MESSAGES_PER_EXAMPLE each, after
    the system turn) folded into one closed block."""
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), -1)
    parts = [_message_html(m, i == first_user) for i, m in enumerate(messages)]
    start = 1 if messages and messages[0].get("role") == "system" else 0
    end = start + MESSAGES_PER_EXAMPLE * worked_examples
    if worked_examples <= 0 or end >= len(parts):
        return "\n".join(parts)
    label = f"{worked_examples} worked example{'s' if worked_examples > 1 else ''} shown before the problem"
    folded = f'<details class="examples"><summary>{label}</summary>{"".join(parts[start:end])}</details>'
    return "\n".join([*parts[:start], folded, *parts[end:]])


def _trajectory_html(record: dict[str, Any]) -> str:
    verdict = '<span class="ok">✓ correct</span>' if record_is_correct(record) else '<span class="bad">✗ wrong</span>'
    summary = (
        f"sample {_e(record.get('sample', '?'))} · {verdict} · answer <code>{_e(record.get('extracted_answer'))}"
        f"</code> (truth <code>{_e(record.get('ground_truth', ''))}</code>) · "
        f"{_e(record.get('num_tool_calls', 0))} tool calls · {_e(record.get('num_turns', 0))} turns · "
        f"{_e(record.get('response_tokens', 0))} tokens · {_e(record.get('termination'))}"
    )
    error = f'<div class="error">error: {_e(record["error"])}</div>' if record.get("error") else ""
    conversation = _conversation_html(list(record.get("messages") or []), int(record.get("worked_examples") or 0))
    return f'<details class="trajectory"><summary>{summary}</summary>{error}{conversation}</details>'


def _trajectories_html(trajectories: list[dict[str, Any]]) -> str:
    sections = []
    for index, (pid, records) in enumerate(group_by_problem(trajectories).items()):
        body = "\n".join(_trajectory_html(r) for r in records)
        sections.append(f'<section id="problem-{index}"><h3>Problem {_e(pid)}</h3>\n{body}</section>')
    buttons = ("<button type='button' data-details='open'>expand all</button>"
               "<button type='button' data-details='close'>collapse all</button>")
    return "<h2>Trajectories</h2>\n" + buttons + "\n".join(sections)


def uncertainty_note() -> str:
    return (f"± is the standard error and [low, high] the 95% interval of a bootstrap over problems "
            f"({RESAMPLES} resamples of the run's problems, seed {SEED}): how far the score could move with "
            f"another draw of problems and samples. maj@k: the answer most of k samples gave, answers "
            f"grouped by the grader (ties: the earliest), right if that group's first answer was graded "
            f"right; averaged over k-sample subsets.")


def _scores_html(metrics: dict[str, Any]) -> str:
    head = "<tr><th>metric</th><th>value</th><th>± stderr</th><th>95% interval</th><th>problems</th></tr>"
    body = "".join(_score_row(metrics, name) for name in score_names(metrics))
    return f"<h2>Scores</h2><table>{head}{body}</table><p class='note'>{_e(uncertainty_note())}</p>"


def _score_row(metrics: dict[str, Any], name: str) -> str:
    value, stderr, ci95 = metrics[name], metrics.get(f"{name}_stderr"), metrics.get(f"{name}_ci95")
    interval = f"[{ci95[0]:.4f}, {ci95[1]:.4f}]" if ci95 else "-"
    counted = metrics.get("pass@k_num_problems", {}).get(name.split("@")[1], metrics.get("num_problems"))
    return (f"<tr><th>{_e(name)}</th><td class='num'>{format_value(value)}</td>"
            f"<td class='num'>{format_value(stderr)}</td><td class='num'>{interval}</td>"
            f"<td class='num'>{_e(counted)}</td></tr>")


def _statistics_html(metrics: dict[str, Any]) -> str:
    scores = set(score_names(metrics))
    rows = "".join(f"<tr><th>{_e(name)}</th><td class='num'>{_e(value)}</td></tr>"
                   for name, value in summary_rows(metrics) if name not in scores)
    return f"<h2>Run statistics</h2><table>{rows}</table>"


def _problems_html(rows: list[ProblemRow]) -> str:
    head = ("<tr><th>problem</th><th>n</th><th>correct</th><th>pass@1</th><th>majority answer</th>"
            "<th>agreement</th><th>majority right</th><th>mean tool calls</th><th>mean tokens</th>"
            "<th>ground truth</th></tr>")
    body = "".join(_problem_row(index, row) for index, row in enumerate(rows))
    return (f"<h2>Per-problem results</h2><p class='note'>Click a column to sort. Agreement: the share of "
            f"the problem's samples that gave its majority answer.</p><table class='sortable'>{head}{body}</table>")


def _problem_row(index: int, row: ProblemRow) -> str:
    winner = row.vote.winner
    answer = "-" if winner is None else row.vote.answers[winner]
    verdict = "<span class='ok'>✓</span>" if row.vote.majority_right else "<span class='bad'>✗</span>"
    agreeing = max(row.vote.counts, default=0)
    return (f"<tr><td><a href='#problem-{index}'>{_e(row.problem_id)}</a></td><td class='num'>{row.n}</td>"
            f"<td class='num'>{row.correct}</td><td class='num'>{format_value(row.pass_at_1)}</td>"
            f"<td class='answer'><code>{_e(answer)}</code></td>"
            f"<td class='num'>{agreeing}/{row.n} ({row.vote.agreement:.2f})</td><td>{verdict}</td>"
            f"<td class='num'>{row.mean_tool_calls:.2f}</td><td class='num'>{row.mean_response_tokens:.1f}</td>"
            f"<td class='answer'>{_e(row.ground_truth)}</td></tr>")


def _plots_html(plots: dict[str, str]) -> str:
    """The first plot at full width, the others (histograms) side by side under it."""
    images = [f'<img class="plot" alt="{_e(title)}" src="data:image/png;base64,{data}">'
              for title, data in plots.items()]
    if not images:
        return ""
    return f"<h2>Plots</h2>{images[0]}<div class='histograms'>{''.join(images[1:])}</div>"


def redact(config: dict[str, Any]) -> dict[str, Any]:
    """The config with secret-looking values hidden, so a shared report leaks no credentials."""
    return {key: "***" if any(part in key.lower() for part in SECRET_KEY_PARTS) else value
            for key, value in config.items()}


def _config_html(config: dict[str, Any]) -> str:
    text = json.dumps(redact(config), indent=2, default=str, ensure_ascii=False)
    return f"<details><summary>Resolved config</summary><pre>{_e(text)}</pre></details>"


def run_info(config: dict[str, Any]) -> str:
    """One line naming the run: model, dataset, samples per problem."""
    keys = ("model", "dataset", "n_samples")
    return " · ".join(f"{key}: {config[key]}" for key in keys if config.get(key) is not None)


def page_html(title: str, body: str) -> str:
    """A whole self-contained page: nothing loaded from elsewhere, only the page's own script may run."""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def render_html(title: str, config: dict[str, Any], metrics: dict[str, Any], rows: list[ProblemRow],
                trajectories: list[dict[str, Any]], plots: dict[str, str]) -> str:
    """The report page as one string."""
    body = "\n".join([
        f"<h1>{_e(title)}</h1><p class='run-info'>{_e(run_info(config))}</p>",
        _scores_html(metrics), _config_html(config), _statistics_html(metrics), _plots_html(plots),
        _problems_html(rows), _trajectories_html(trajectories),
    ])
    return page_html(title, body)
