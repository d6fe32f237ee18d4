"""Evaluation settings: defaults, an optional config file (YAML or JSON), then command-line flags."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mathtool.agent.parsers import TOOL_FORMATS
from mathtool.errors import ConfigError


@dataclass(frozen=True)
class EvalSettings:
    dataset: str = "aime2024"
    source: str | None = None  # mirror directory for known datasets
    model: str | None = None  # served model name; default: the embedded model
    tokenizer: str | None = None  # Hugging Face id or folder for the chat template; default: the model
    base_url: list[str] = field(default_factory=list)  # empty: start the embedded server
    n_samples: int = 4
    n_parallel_agents: int = 64
    temperature: float = 0.6
    top_p: float = 0.95
    max_response_length: int = 16384
    max_prompt_length: int = 2048
    max_turns: int = 5
    tool_format: str | None = None  # hermes or markdown; default: from the chat template
    chat_template: str | None = None  # qwen3, qwen3-training or a Jinja file; default: the tokenizer's own
    thinking: bool | None = None  # the template's enable_thinking; default: the template's default
    limit: int | None = None  # only the first N problems
    output: str | None = None  # run directory; default runs/<dataset>-<time>
    resume: bool = False
    request_timeout_s: float = 600.0
    tool_timeout_s: float = 10.0
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# The embedded model is small and slow on a CPU: fewer tokens, fewer agents than the GPU defaults.
EMBEDDED_DEFAULTS = {"max_response_length": 768, "n_parallel_agents": 32}


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({e})") from None
    except Exception as e:  # yaml.YAMLError, which is no ValueError
        first = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting names to values")
    return data


def resolve(config_file: Path | None, flags: dict[str, Any]) -> tuple[EvalSettings, list[str]]:
    """Defaults < embedded defaults (when no server is given) < config file < flags given.

    Returns the settings and a note for each embedded default that was applied.
    """
    known = {f.name for f in fields(EvalSettings)}
    from_file = read_config_file(config_file) if config_file else {}
    unknown = sorted((set(from_file) | set(flags)) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = {**from_file, **{k: v for k, v in flags.items() if v is not None}}
    if isinstance(chosen.get("base_url"), str):
        chosen["base_url"] = [chosen["base_url"]]
    notes = []
    if not chosen.get("base_url"):
        for key, value in EMBEDDED_DEFAULTS.items():
            if key not in chosen:
                chosen[key] = value
                notes.append(f"{key}={value}")
    settings = replace(EvalSettings(), **chosen)
    check_types(settings)
    _validate(settings)
    return settings, notes


def _validate(s: EvalSettings) -> None:
    if s.tool_format is not None and s.tool_format not in TOOL_FORMATS:
        raise ConfigError(f"--tool-format must be one of {', '.join(TOOL_FORMATS)}, not {s.tool_format!r}")
    for name in ("n_samples", "n_parallel_agents", "max_response_length", "max_prompt_length", "max_turns"):
        if int(getattr(s, name)) < 1:
            raise ConfigError(f"{name} must be at least 1")
    if s.limit is not None and s.limit < 1:
        raise ConfigError("--limit must be at least 1")
    if not 0.0 <= s.temperature <= 5.0 or not 0.0 < s.top_p <= 1.0:
        raise ConfigError("temperature must be in [0, 5] and top_p in (0, 1]")


def check_types(settings: Any) -> None:
    """Each value of a settings dataclass fits its field (as a config file may give anything): ints for
    ints, numbers for floats, true/false for booleans, strings for strings, a list of strings for lists."""
    for f in fields(settings):
        _check_type(f.name, getattr(settings, f.name), str(f.type))


def _check_type(name: str, value: Any, annotation: str) -> None:
    base = annotation.replace(" | None", "")
    if value is None:
        if "None" not in annotation:
            raise ConfigError(f"{name} must not be empty")
        return
    kinds = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "list[str]": "a list of strings"}
    expected = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list[str]": (list,)}[base]
    ok = isinstance(value, expected) and not (isinstance(value, bool) and base != "bool")
    if ok and base == "float":
        ok = math.isfinite(value)
    if ok and base == "list[str]":
        ok = all(isinstance(item, str) for item in value)
    if not ok:
        raise ConfigError(f"{name} must be {kinds[base]}, not {value!r}")
