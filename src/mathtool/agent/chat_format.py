"""How the agent's conversation is written: the tool format, thinking, and (on the token-exact path) the
tokenizer and chat template that render it as token ids on the client.

`--chat-template NAME|FILE` replaces the tokenizer's own template. The names `qwen3` and `qwen3-training`
are the templates TRL ships inside its installed package (`trl/chat_templates/qwen3.jinja` and the
prefix-preserving `qwen3_training.jinja`), read from there at run time.

One rule picks the tool-call format, in evaluation and training alike: Hermes `<tool_call>` JSON when
the chat template renders the tool's definition into the prompt (Qwen3), else ```` ```python ```` blocks.

The token record (`agent.loop`) finds the tokens the environment adds after a model turn by rendering the
conversation without and with the tool results; that needs a template that renders earlier turns the same
whatever follows them (prefix-preserving). Qwen3's own template is not: it renders an empty think block
on the last assistant turn and drops it once a tool message follows. For such a template the record is
rendered with the prefix-preserving variant that TRL ships (`trl.chat_template_utils`), which renders the
first prompt and the tool turns exactly as the original does.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathtool.agent.parsers import HERMES, MARKDOWN
from mathtool.agent.prompts import tool_result_message
from mathtool.errors import ConfigError
from mathtool.sandbox.tool import PYTHON_TOOL

log = logging.getLogger(__name__)

NAMED_TEMPLATES = {"qwen3": "qwen3.jinja", "qwen3-training": "qwen3_training.jinja"}
_TRL_HINT = "the named chat templates come from TRL's package: pip install 'mathtool[train]'"


def chat_template_path(name_or_file: str) -> Path:
    """The Jinja file of a named template (from the installed TRL package) or of a path."""
    if name_or_file in NAMED_TEMPLATES:
        spec = importlib.util.find_spec("trl")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"chat template {name_or_file!r}: TRL is not installed; {_TRL_HINT}")
        path = Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / NAMED_TEMPLATES[name_or_file]
        if not path.is_file():
            raise ConfigError(f"chat template {name_or_file!r}: {path} is missing from the installed TRL")
        return path
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        names = ", ".join(NAMED_TEMPLATES)
        raise ConfigError(f"chat template {name_or_file!r} is neither a known name ({names}) nor a file")
    return path


def read_chat_template(name_or_file: str) -> str:
    path = chat_template_path(name_or_file)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read chat template {path}: {e}") from None


def renders_tools(template: str) -> bool:
    """Whether `template` puts the tools' definitions into the prompt (the one tool-format rule)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        rendered, _ = render_jinja_template([messages], tools=[PYTHON_TOOL], chat_template=template,
                                            add_generation_prompt=True)
    except Exception as e:  # a template that cannot render tools does not know them
        log.debug("the chat template failed to render tools: %s", e)
        return False
    return PYTHON_TOOL["function"]["description"] in rendered[0]


def choose_tool_format(template: str | None, override: str | None = None) -> str:
    """`override` if given; else Hermes when the chat template renders tools, else markdown."""
    if override:
        return override
    return HERMES if template and renders_tools(template) else MARKDOWN


@dataclass(frozen=True)
class ChatFormat:
    """How the agent's conversation is written, on either path: the tool-call format and the chat template's
    `enable_thinking` (None: its default).

    With a `tokenizer` the conversation is rendered here, as token ids (the token-exact path): `template` is
    the chat template, and `record_template` the prefix-preserving one the token record derives the
    environment's tokens with (see the module docstring; `template` when that is already prefix-preserving).
    Without one (the chat path) the server renders with its own template.
    """

    tool_format: str = MARKDOWN
    thinking: bool | None = None
    tokenizer: Any = None
    template: str = ""
    record_template: str = ""

    @property
    def on_client(self) -> bool:
        """Whether the conversation is rendered here, as token ids (the token-exact path)."""
        return self.tokenizer is not None

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def render(self, messages: list[dict], generation_prompt: bool = True, record: bool = False) -> list[int]:
        """The conversation as token ids; `record=True` renders with the prefix-preserving variant."""
        if self.tokenizer is None:
            raise ValueError("a ChatFormat without a tokenizer renders nothing: the server renders (the chat path)")
        return _render_ids(self.tokenizer, messages, self.record_template if record else self.template,
                           self.tool_format, generation_prompt, self.thinking)


def template_of(tokenizer: Any, chat_template: str | None) -> str | None:
    """The template text in use: `chat_template` (a name or file) if given, else the tokenizer's own."""
    if chat_template:
        return read_chat_template(chat_template)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # a template shipped as named variants
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def make_chat_format(tokenizer: Any, template: str, tool_format: str, thinking: bool | None) -> ChatFormat:
    record_template = _record_template(tokenizer, template, tool_format, thinking)
    return ChatFormat(tool_format, thinking, tokenizer, template, record_template)


def _render_ids(tokenizer: Any, messages: list[dict], template: str, tool_format: str, generation_prompt: bool,
                thinking: bool | None) -> list[int]:
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    out = tokenizer.apply_chat_template(messages, tools=[PYTHON_TOOL] if tool_format == HERMES else None,
                                        chat_template=template, add_generation_prompt=generation_prompt,
                                        tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _probe_conversation(tool_format: str) -> tuple[list[dict], list[dict]]:
    """A first prompt, and the same conversation after a model turn without a think block and a tool result."""
    first = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    return first, [*first, {"role": "assistant", "content": "a"}, tool_result_message("r", tool_format)]


def is_prefix_preserving(tokenizer: Any, template: str, tool_format: str, thinking: bool | None) -> bool:
    """Whether adding a tool result after a model turn leaves that turn's rendering unchanged."""
    _, after = _probe_conversation(tool_format)
    through = _render_ids(tokenizer, after[:-1], template, tool_format, False, thinking)
    extended = _render_ids(tokenizer, after, template, tool_format, True, thinking)
    return extended[: len(through)] == through


def _record_template(tokenizer: Any, template: str, tool_format: str, thinking: bool | None) -> str:
    """`template` if prefix-preserving; else TRL's training variant of it, when TRL has one that renders
    the first prompt and the tool turns the same; else `template` (its trajectories will resync)."""
    if is_prefix_preserving(tokenizer, template, tool_format, thinking):
        return template
    variant = _trl_training_variant(tokenizer, template)
    first, after = _probe_conversation(tool_format)

    def same(messages: list[dict], generation_prompt: bool) -> bool:
        args = (tool_format, generation_prompt, thinking)
        return _render_ids(tokenizer, messages, template, *args) == _render_ids(tokenizer, messages, variant, *args)

    if variant and is_prefix_preserving(tokenizer, variant, tool_format, thinking) and same(first, True):
        log.info("the chat template is not prefix-preserving; the token record renders with TRL's training variant")
        return variant
    log.warning("the chat template is not prefix-preserving and TRL has no training variant of it: multi-turn "
                "trajectories will not be token-exact (counted as num_inexact, masked in training)")
    return template


def _trl_training_variant(tokenizer: Any, template: str) -> str | None:
    try:
        from trl.chat_template_utils import get_training_chat_template
    except ImportError:
        return None
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = template
        return get_training_chat_template(tokenizer)
    except Exception as e:  # TRL does not know this template
        log.debug("no TRL training variant: %s", e)
        return None
    finally:
        tokenizer.chat_template = original


def chat_setup(tokenizer: Any, chat_template: str | None, thinking: bool | None,
               tool_format: str | None) -> ChatFormat:
    """The ChatFormat: the tool format by the one rule (`choose_tool_format`) and `thinking`; rendered on the
    client with `tokenizer` (and `chat_template`, a name or file, in place of its own) when there is one,
    else by the server (the chat path, where the server applies its own template)."""
    if tokenizer is None:
        template = read_chat_template(chat_template) if chat_template else None
        return ChatFormat(choose_tool_format(template, tool_format), thinking)
    template = template_of(tokenizer, chat_template)
    if template is None:
        raise ConfigError("the model's tokenizer has no chat template; pass --chat-template NAME|FILE")
    return make_chat_format(tokenizer, template, choose_tool_format(template, tool_format), thinking)
