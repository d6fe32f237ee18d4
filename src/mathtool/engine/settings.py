"""Settings as pydantic models: each field is a config-file key with its type, default, bounds and help.

A field marked `Flag()` is also a command-line flag: `cli.py` builds the option (name, help, shown
default) from the field, so adding a setting is adding one field. Values are checked strictly (no
"2.7" -> 2, no "no" -> False, no infinities), and a bad one is one ConfigError line naming its key.
Evaluation resolves defaults < embedded defaults (no server given) < a config file < flags given.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from mathtool.agent.parsers import TOOL_FORMATS
from mathtool.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """Marks a setting that is also a flag, `--name-with-dashes`; a true/false one gets `--no-name` too,
    unless `negatable=False` (`--resume` only turns something on)."""

    negatable: bool = True


# Settings that evaluation and training share, with their help.
Count = Annotated[int, Field(ge=1)]
ToolFormat = Annotated[Literal[TOOL_FORMATS] | None, Field(  # type: ignore[valid-type]
    description="hermes or markdown (default: hermes when the chat template renders tools).")]
ChatTemplate = Annotated[str | None, Field(
    description="qwen3, qwen3-training (TRL's copies) or a Jinja file (default: the tokenizer's own).")]
Thinking = Annotated[bool | None, Field(
    description="The chat template's enable_thinking (default: the template's default).")]


class Settings(BaseModel):
    """Frozen, strict settings: build them with `from_values` to get one ConfigError line per mistake."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Self:
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            known = ", ".join(sorted(cls.model_fields))
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {known}")
        try:
            return cls(**values)
        except ValidationError as e:
            raise ConfigError(cls._one_line(e.errors()[0], values)) from None

    @classmethod
    def _one_line(cls, error: ErrorDetails, values: Mapping[str, Any]) -> str:
        if error["type"] == "value_error":  # a validator's own message, whole
            return str(error["ctx"]["error"])
        key = str(error["loc"][0])
        value = values.get(key, error["input"])
        if error["type"] in _BOUNDS:
            bound, words = _BOUNDS[error["type"]]
            return f"{key} must be {words} {error['ctx'][bound]}, not {value!r}"
        annotation = without_none(cls.model_fields[key].annotation)
        if get_origin(annotation) is Literal:
            return f"{key} must be one of {', '.join(map(str, get_args(annotation)))}, not {value!r}"
        if value is None:
            return f"{key} must not be empty"
        hint = " (YAML reads 1e-6 as text: write 1.0e-6)" if annotation is float and _is_number_text(value) else ""
        return f"{key} must be {_KINDS.get(annotation, str(annotation))}, not {value!r}{hint}"

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "above"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "below")}
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          list[str]: "a list of strings"}


def without_none(annotation: Any) -> Any:
    """The type a value has when it is given: `X | None` -> X, `Annotated[X, ...]` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            annotation = rest[0]
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _is_number_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def flag_fields(model: type[Settings]) -> dict[str, tuple[FieldInfo, Flag]]:
    """The fields of `model` that are also flags, in order, with their markers."""
    return {name: (field, marker) for name, field in model.model_fields.items()
            for marker in field.metadata if isinstance(marker, Flag)}


class EvalSettings(Settings):
    dataset: Annotated[str, Flag()] = Field(
        "aime2024", description="Dataset name (aime2024, math500, ...) or a .jsonl/.parquet/.csv file.")
    model: Annotated[str | None, Flag()] = Field(
        None, description="Served model name, e.g. Qwen/Qwen3-4B (default: what the server serves).")
    base_url: Annotated[list[str], Flag()] = Field(
        default_factory=list, description="OpenAI-compatible server, e.g. http://host:30000/v1; repeat to spread "
                                          "requests (default: start the embedded model).")
    tokenizer: Annotated[str | None, Flag()] = Field(
        None, description="Tokenizer (Hub id or folder) for the chat template (default: --model).")
    n_samples: Annotated[Count, Flag()] = Field(4, description="Samples per problem.")
    n_parallel_agents: Annotated[Count, Flag()] = Field(64, description="Trajectories in flight.")
    temperature: Annotated[float, Flag()] = Field(0.6, ge=0.0, le=5.0, description="Sampling temperature.")
    top_p: Annotated[float, Flag()] = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_response_length: Annotated[Count, Flag()] = Field(
        16384, description="Model tokens per trajectory, all turns.")
    max_prompt_length: Annotated[Count, Flag()] = Field(2048, description="Tokens of the first prompt.")
    max_turns: Annotated[Count, Flag()] = Field(5, description="Model turns per trajectory.")
    tool_format: Annotated[ToolFormat, Flag()] = None
    chat_template: Annotated[ChatTemplate, Flag()] = None
    thinking: Annotated[Thinking, Flag()] = None
    limit: Annotated[Count | None, Flag()] = Field(None, description="Only the first N problems.")
    output: Annotated[str | None, Flag()] = Field(None, description="Run directory (default: runs/<dataset>-<time>).")
    resume: Annotated[bool, Flag(negatable=False)] = Field(
        False, description="Continue the run in --output: skip finished samples.")
    source: Annotated[str | None, Flag()] = Field(
        None, description="Mirror directory of <name>.jsonl files (offline data).")
    seed: Annotated[int | None, Flag()] = Field(None, description="Sampling seed.")
    request_timeout_s: float = Field(600.0, gt=0.0, description="Seconds a model request may take.")
    tool_timeout_s: float = Field(10.0, gt=0.0, description="Seconds a tool call may run.")


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


def resolve(config_file: Path | None, flags: Mapping[str, Any]) -> tuple[EvalSettings, list[str]]:
    """Defaults < embedded defaults (when no server is given) < config file < flags given (not None).

    Returns the settings and a note for each embedded default that was applied.
    """
    from_file = read_config_file(config_file) if config_file else {}
    chosen = {**from_file, **{k: v for k, v in flags.items() if v is not None}}
    if isinstance(chosen.get("base_url"), str):
        chosen["base_url"] = [chosen["base_url"]]
    notes = []
    if not chosen.get("base_url"):
        for key, value in EMBEDDED_DEFAULTS.items():
            if key not in chosen:
                chosen[key] = value
                notes.append(f"{key}={value}")
    return EvalSettings.from_values(chosen), notes

