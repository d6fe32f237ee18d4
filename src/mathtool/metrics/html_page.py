"""The self-contained HTML report: inline CSS, base64 plots, every trajectory as an expandable conversation.

All text that came from a model, a dataset or a config goes through `html.escape`: model output is
untrusted and must never become live markup.
"""

from __future__ import annotations

import html
import json
from typing import Any

from mathtool.metrics.summary import ProblemRow, format_value, group_by_problem, is_correct, summary_rows

SECRET_KEY_PARTS = ("api_key", "apikey", "secret", "password", "authorization")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: .2rem; } .run-info { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { display: block; max-width: 100%; margin: .5rem 0 1rem; }
details { margin: .3rem 0; } details.trajectory > summary { cursor: pointer; padding: .2rem; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #cf222e; font-weight: bold; }
.msg { border-left: 4px solid #ccc; margin: .4rem 0 .4rem 1rem; padding: .2rem .6rem; }
.msg .role { font-size: .75rem; text-transform: uppercase; color: #666; }
.msg pre { white-space: pre-wrap; word-break: break-word; margin: .2rem 0; font-size: .85rem; }
.msg.system { border-color: #999; background: #fafafa; } .msg.user { border-color: #4c72b0; }
.msg.assistant { border-color: #55a868; }
.msg.tool { border-color: #8250df; background: #1e1e2e; color: #e0e0e0; }
.msg.tool .role { color: #c0a8ff; }
.error { color: #cf222e; white-space: pre-wrap; }
"""


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


def _conversation_html(messages: list[dict[str, Any]]) -> str:
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), -1)
    return "\n".join(_message_html(m, i == first_user) for i, m in enumerate(messages))


def _trajectory_html(record: dict[str, Any]) -> str:
    verdict = '<span class="ok">✓ correct</span>' if is_correct(record) else '<span class="bad">✗ wrong</span>'
    summary = (
        f"sample {_e(record.get('sample', '?'))} · {verdict} · answer <code>{_e(record.get('extracted_answer'))}"
        f"</code> (truth <code>{_e(record.get('ground_truth', ''))}</code>) · "
        f"{_e(record.get('num_tool_calls', 0))} tool calls · {_e(record.get('num_turns', 0))} turns · "
        f"{_e(record.get('response_tokens', 0))} tokens · {_e(record.get('termination'))}"
    )
    error = f'<div class="error">error: {_e(record["error"])}</div>' if record.get("error") else ""
    conversation = _conversation_html(list(record.get("messages") or []))
    return f'<details class="trajectory"><summary>{summary}</summary>{error}{conversation}</details>'


def _trajectories_html(trajectories: list[dict[str, Any]]) -> str:
    sections = []
    for index, (pid, records) in enumerate(group_by_problem(trajectories).items()):
        body = "\n".join(_trajectory_html(r) for r in records)
        sections.append(f'<section id="problem-{index}"><h3>Problem {_e(pid)}</h3>\n{body}</section>')
    return "<h2>Trajectories</h2>\n" + "\n".join(sections)


def _metrics_html(metrics: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(name)}</th><td class='num'>{_e(value)}</td></tr>"
                   for name, value in summary_rows(metrics))
    return f"<h2>Summary</h2><table>{rows}</table>"


def _problems_html(rows: list[ProblemRow]) -> str:
    head = ("<tr><th>problem</th><th>n</th><th>correct</th><th>pass@1</th><th>mean tool calls</th>"
            "<th>mean tokens</th><th>ground truth</th></tr>")
    body = "".join(
        f"<tr><td><a href='#problem-{i}'>{_e(row.problem_id)}</a></td><td class='num'>{row.n}</td>"
        f"<td class='num'>{row.correct}</td><td class='num'>{format_value(row.pass_at_1)}</td>"
        f"<td class='num'>{row.mean_tool_calls:.2f}</td><td class='num'>{row.mean_response_tokens:.1f}</td>"
        f"<td>{_e(row.ground_truth)}</td></tr>"
        for i, row in enumerate(rows)
    )
    return f"<h2>Per-problem results</h2><table>{head}{body}</table>"


def _plots_html(plots: dict[str, str]) -> str:
    images = "".join(f'<img class="plot" alt="{_e(title)}" src="data:image/png;base64,{data}">'
                     for title, data in plots.items())
    return f"<h2>Plots</h2>{images}" if plots else ""


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


def render_html(title: str, config: dict[str, Any], metrics: dict[str, Any], rows: list[ProblemRow],
                trajectories: list[dict[str, Any]], plots: dict[str, str]) -> str:
    """The whole page as one string, with nothing loaded from elsewhere."""
    body = "\n".join([
        f"<h1>{_e(title)}</h1><p class='run-info'>{_e(run_info(config))}</p>",
        _config_html(config), _metrics_html(metrics), _plots_html(plots), _problems_html(rows),
        _trajectories_html(trajectories),
    ])
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")
