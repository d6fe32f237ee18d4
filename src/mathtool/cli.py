"""The `mathtool` command: thin wrappers that parse flags, call the library, and print.

The flags of `eval` and `train` that are settings come from the settings models' fields (name, type,
help, default), so each is written once: see `settings_flags`. Every user mistake (a MathtoolError) is
printed as one line, with a non-zero exit code.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import typer
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.table import Table

try:  # typer 0.2x carries its own copy of click, whose exceptions its commands raise
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from mathtool.engine.settings import EMBEDDED_DEFAULTS, EvalSettings, Flag, Settings, flag_fields, without_none
from mathtool.errors import MathtoolError
from mathtool.train.config import TrainConfig
from mathtool.train.config import resolve as resolve_train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Math-reasoning agents with a Python tool: prepare data, serve, eval, report.")
console = Console()
err_console = Console(stderr=True)


def one_line_errors(func):
    """Show a MathtoolError as `error: <message>` and exit 2; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MathtoolError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; rerun with --resume to continue where it stopped")
            raise typer.Exit(130) from None

    return wrapper


def settings_flags(model: type[Settings], note: Callable[[str], str] = lambda name: "") -> Callable:
    """Give a command an option for each field of `model` marked `Flag()`, after its own parameters: the
    field's name, type and description, its default shown (with `note(name)` after it). The command gets
    the flags given (not None) as keyword arguments (`**flags`); the settings' resolve() does the rest."""

    def decorate(command: Callable) -> Callable:
        options = [_option(name, field, flag, note(name)) for name, (field, flag) in flag_fields(model).items()]
        own = inspect.signature(command, eval_str=True).parameters.values()
        explicit = [p.replace(kind=p.KEYWORD_ONLY) for p in own if p.kind is not p.VAR_KEYWORD]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            flags = {option.name: kwargs.pop(option.name) for option in options}
            return command(**kwargs, **{name: value for name, value in flags.items() if value is not None})

        wrapper.__signature__ = inspect.Signature([*explicit, *options])  # what typer reads
        return wrapper

    return decorate


def _option(name: str, field: FieldInfo, flag: Flag, note: str) -> inspect.Parameter:
    kind = without_none(field.annotation)
    if get_origin(kind) is Literal:  # the model checks the choice, in its one-line way
        kind = str
    names = () if kind is not bool or flag.negatable else (f"--{name.replace('_', '-')}",)  # bool: --x/--no-x
    default = field.get_default(call_default_factory=True)
    shown = "" if default is None or default is False or default == [] else f" (default: {default}{note})"
    option = typer.Option(*names, help=f"{field.description.removesuffix('.')}{shown}.")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option])


def _embedded_note(name: str) -> str:
    return f"; embedded {EMBEDDED_DEFAULTS[name]}" if name in EMBEDDED_DEFAULTS else ""


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
@one_line_errors
def prepare(
    names: Annotated[list[str] | None, typer.Argument(help="Dataset names or files (default: aime2024 deepscaler).")] = None,
    source: Annotated[Path | None, typer.Option(help="Mirror directory of <name>.jsonl files (else MATHTOOL_DATA_DIR, else the Hub).")] = None,
) -> None:
    """Register datasets in the local registry (parquet under MATHTOOL_HOME)."""
    from mathtool.data import DEFAULT_DATASETS
    from mathtool.data import prepare as prepare_dataset

    for name in names or DEFAULT_DATASETS:
        entry = prepare_dataset(name, source)
        console.print(f"registered [bold]{name}[/] ({entry['split']}): {entry['rows']} rows from {entry['origin']}")


@app.command()
@one_line_errors
def datasets() -> None:
    """List registered datasets."""
    from mathtool.data import registered
    from mathtool.data.registry import datasets_dir

    table = Table("name", "split", "rows", "origin", "sha256", "registered", title=str(datasets_dir()))
    for manifest in registered():
        for split, e in manifest["splits"].items():
            table.add_row(manifest["name"], split, str(e["rows"]), e["origin"], e["sha256"][:12], e["registered_at"])
    if not table.row_count:
        console.print("no datasets registered yet; run `mathtool prepare`")
        return
    console.print(table)


@app.command()
@one_line_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `mathtool eval`.")],
    overwrite: Annotated[bool, typer.Option(help="Replace report.md/html instead of writing report-N.*")] = False,
) -> None:
    """Write report.md and a self-contained report.html for a run; print its summary."""
    from mathtool.metrics import compute_metrics, load_run, summary_table, write_report

    markdown, page = write_report(run_dir, overwrite=overwrite)  # first: it checks that the run dir is writable
    config, trajectories = load_run(run_dir)
    console.print(summary_table(compute_metrics(trajectories, config.get("n_samples") or 1)))
    console.print(f"wrote {markdown} and {page}")


@app.command()
@one_line_errors
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories written by `mathtool eval`.")],
    output: Annotated[Path | None, typer.Option(help="Also write compare.html into this directory.")] = None,
) -> None:
    """Compare runs: pass@k and maj@k with intervals; for two runs, the paired difference and flipped problems."""
    from mathtool.metrics.compare import compare_runs, comparison_lines, comparison_table
    from mathtool.metrics.compare_page import write_comparison
    from mathtool.paths import OUTPUT_FIX, check_writable, write_errors

    if output is not None:
        check_writable(output, OUTPUT_FIX)
    comparison = compare_runs(run_dirs)
    for line in comparison.warnings:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    console.print(comparison_table(comparison))
    for line in comparison_lines(comparison):
        console.print(line, highlight=False, soft_wrap=True)
    if output is not None:
        with write_errors(output, OUTPUT_FIX):
            console.print(f"wrote {write_comparison(comparison, output)}")


@app.command(name="eval")
@one_line_errors
@settings_flags(EvalSettings, note=_embedded_note)
def eval_command(
    config: Annotated[Path | None, typer.Option(help="YAML/JSON file with any of these settings (flags win).")] = None,
    **flags: Any,
) -> None:
    """Evaluate a model with the Python tool on a dataset: Pass@1 and Pass@k."""
    import asyncio

    from mathtool.engine.eval_pipeline import run_eval
    from mathtool.engine.settings import resolve
    from mathtool.metrics import summary_table

    settings, notes = resolve(config, flags)
    if notes:
        console.print(f"embedded model: smaller defaults {', '.join(notes)} (override with flags)")
    metrics, run_dir = asyncio.run(run_eval(settings))
    console.print(summary_table(metrics, title=f"{settings.dataset} ({run_dir})"))
    ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("pass@") and k.split("@")[1].isdigit())
    console.print("  ".join(f"Pass@{k}: {metrics[f'pass@{k}']:.4f}" for k in ks if metrics[f"pass@{k}"] is not None))
    if metrics.get("num_errors"):
        err_console.print(f"error: {metrics['num_errors']} trajectories failed; rerun with --resume --output {run_dir}")
        raise typer.Exit(1)


@app.command()
@one_line_errors
def serve(
    model: Annotated[str | None, typer.Option(help="Hub id or folder (vLLM/SGLang) or .gguf (llama.cpp) [the embedded SmolLM2-135M].")] = None,
    engine: Annotated[str, typer.Option(help="vllm, sglang or llamacpp.")] = "vllm",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 30000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    dtype: Annotated[str | None, typer.Option(help="Weights dtype, vLLM/SGLang [auto; embedded float32].")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length [the model's; embedded 4096].")] = None,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs per model replica.")] = 1,
    data_parallel_size: Annotated[int, typer.Option(help="Model replicas.")] = 1,
    tool_call_parser: Annotated[str | None, typer.Option(help="vLLM/SGLang tool-call parser, e.g. hermes (for clients on the chat path that want server-side tool parsing).")] = None,
    chat_template: Annotated[str | None, typer.Option(help="qwen3, qwen3-training (TRL's copies) or a Jinja file [the model's own].")] = None,
    logprobs_mode: Annotated[str | None, typer.Option(help="vLLM --logprobs-mode; processed_logprobs where logprobs are trained on [vLLM's default].")] = None,
    python: Annotated[str | None, typer.Option(help="Interpreter of the server's environment (SGLang needs its own) [this one].")] = None,
) -> None:
    """Start an OpenAI-compatible model server and keep it running until Ctrl-C."""
    from dataclasses import replace

    from mathtool.serve import embedded_spec, model_spec, serve_forever

    base = embedded_spec(port=port, engine=engine) if model is None else model_spec(model, port=port)
    spec = replace(base, engine=engine, port=port, host=host, dtype=dtype or base.dtype,
                   max_model_len=max_model_len or base.max_model_len, tensor_parallel_size=tensor_parallel_size,
                   data_parallel_size=data_parallel_size, tool_call_parser=tool_call_parser,
                   chat_template=chat_template, vllm_logprobs_mode=logprobs_mode, python=python)
    serve_forever(spec)


@app.command()
@one_line_errors
@settings_flags(TrainConfig, note=lambda name: " unless --preset or --config sets it")
def train(
    preset: Annotated[str | None, typer.Option(help="cpu-demo (SmolLM2-135M on CPU) or qwen3-4b (the seed's GRPO recipe, 8 GPUs).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON training config (see configs/); keys override the preset's.")] = None,
    output: Annotated[Path, typer.Option(help="Output directory: metrics.jsonl, reward curve, checkpoints.")] = Path("runs/train"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output.")] = False,
    **flags: Any,
) -> None:
    """Train the tool agent with GRPO (TRL), using the same agent loop as `eval`."""
    settings = resolve_train(preset, config, flags)  # a bad setting is one line before torch and TRL load

    from mathtool.train import train as run_training

    checkpoint = run_training(settings, output, resume)
    if checkpoint is not None:  # the main process (the others have nothing to add)
        console.print(f"done: last checkpoint {checkpoint}; metrics in {output / 'metrics.jsonl'}")


def run() -> None:
    """The `mathtool` console script: the typer app, with a usage mistake (an unknown command or option, a
    value of the wrong type) shown as one `error:` line naming the help to read, exit code 2."""
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        e.show()  # `mathtool` alone: the help, with click's exit code
        code = e.exit_code
    except click_errors.UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        err_console.print(f"[bold red]error:[/] {e.format_message()}{where}", highlight=False, soft_wrap=True)
        code = 2
    except click_errors.ClickException as e:
        err_console.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
        code = e.exit_code
    except typer.Abort:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
