"""Shared fixtures: the read-only data mirror and the embedded vLLM server (started once per session)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from mathtool.serve.launch import embedded_spec, start_server


@dataclass(frozen=True)
class EmbeddedServer:
    base_url: str  # OpenAI-style, ending in /v1
    model: str  # the served model name to send as `model`
    model_dir: Path  # the Hugging Face folder (tokenizer with chat template, weights)
    log_path: Path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only data mirror (../shared/data beside the repo), or $MATHTOOL_TEST_DATA."""
    override = os.environ.get("MATHTOOL_TEST_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """The embedded SmolLM2 model on vLLM's CPU build, on a free port; ~1-2 min to start on 2 cores
    (plus ~45 s the first time, to convert the GGUF into the cache)."""
    # As the reference deployment runs it: Qwen3's chat template and Hermes tool parsing for the chat path,
    # processed logprobs as for a server whose logprobs are trained on.
    spec = replace(embedded_spec(port=0, chat_template="qwen3", logprobs_mode="processed_logprobs"),
                   tool_call_parser="hermes")
    log_path = tmp_path_factory.mktemp("embedded-server") / "vllm.log"
    server = start_server(spec, log_path=log_path)
    try:
        yield EmbeddedServer(server.base_url, spec.model_name, Path(spec.model), log_path)
    finally:
        server.stop()
