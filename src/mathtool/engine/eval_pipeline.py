"""`mathtool eval`: settings -> problems -> (embedded) server -> backend -> engine -> metrics."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mathtool.agent.setup import agent_setup, load_tokenizer
from mathtool.data import load_problems
from mathtool.engine.runner import run_pending
from mathtool.engine.settings import EvalSettings
from mathtool.llm.openai_backend import OpenAIBackend
from mathtool.metrics import compute_metrics
from mathtool.run_record import RunDir, check_output, check_resume, dataset_sha256
from mathtool.sandbox import PythonSandbox

log = logging.getLogger(__name__)


@contextlib.contextmanager
def model_server(settings: EvalSettings) -> Iterator[tuple[list[str], str | None, str | None]]:
    """The servers to use: the ones given; else vLLM started for the run, serving --model (a Hub id or a
    folder, e.g. a training checkpoint) or the embedded model on its CPU build, with the run's chat template
    (so that its chat path speaks the same format).

    Yields (base URLs, model name, tokenizer source).
    """
    if settings.base_url:
        yield settings.base_url, settings.model, settings.tokenizer or settings.model
        return
    from mathtool.serve import embedded_spec, model_spec, running_server

    if settings.model:
        spec = model_spec(settings.model, chat_template=settings.chat_template)
    else:
        spec = embedded_spec(chat_template=settings.chat_template)
    log.warning("no --base-url: starting %s on vLLM for this run; this takes a few minutes", spec.model_name)
    with running_server(spec) as url:
        yield [url], spec.model_name, settings.tokenizer or spec.model


def _why_chat_path(llm: OpenAIBackend, tokenizer_source: str | None) -> str:
    if not llm.supports_token_ids:
        return f"{llm.model} is not served by vLLM, the one server that takes and returns token ids"
    if not tokenizer_source:
        return "the tokenizer is unknown: pass --tokenizer ID|DIR, or --model, for a token-exact run"
    return f"the tokenizer of {tokenizer_source} could not be loaded"


def default_output(settings: EvalSettings) -> Path:
    name = Path(settings.dataset).stem if Path(settings.dataset).suffix else settings.dataset
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


async def run_eval(settings: EvalSettings) -> tuple[dict[str, Any], Path]:
    """Run an evaluation to the end (or resume one); returns (metrics, run directory)."""
    problems = load_problems(settings.dataset, source=settings.source)[: settings.limit]
    output = Path(settings.output) if settings.output else default_output(settings)
    check_output(output, settings.resume)  # before any server starts
    if settings.resume:
        given = {k: v for k, v in settings.to_json().items() if not (k in ("model", "tool_format") and v is None)}
        check_resume(output, given)
    with model_server(settings) as (urls, model, tokenizer_source):
        async with await OpenAIBackend.connect(urls, model, request_timeout_s=settings.request_timeout_s) as llm:
            tokenizer = load_tokenizer(tokenizer_source, settings.chat_template) if llm.supports_token_ids else None
            agent_config = agent_setup(settings, tokenizer, llm.max_model_len, seed=settings.seed)
            chat = agent_config.chat
            if not chat.on_client:
                log.warning("using the server's chat completions: trajectories hold text, not token ids (%s)",
                            _why_chat_path(llm, tokenizer_source))
            resolved = {**settings.to_json(), "model": llm.model, "base_url": urls, "tool_format": chat.tool_format,
                        "output": str(output), "token_exact": chat.on_client,
                        "context_length": llm.max_model_len, "num_problems": len(problems),
                        "dataset_sha256": dataset_sha256(problems)}
            run_dir = RunDir(output, resolved, resume=settings.resume)
            try:
                async with PythonSandbox(timeout_s=settings.tool_timeout_s) as sandbox:
                    await run_pending(problems, settings.n_samples, run_dir, llm, sandbox, agent_config,
                                      settings.n_parallel_agents)
            finally:
                run_dir.close()
    ids = {p.id for p in problems}
    trajectories = [t for t in run_dir.records() if t["problem_id"] in ids]
    metrics = compute_metrics(trajectories, settings.n_samples)
    run_dir.write_metrics(metrics)
    return metrics, output
