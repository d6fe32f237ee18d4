"""Model servers: launch vLLM / SGLang / llama.cpp as a subprocess; the embedded default model."""

from mathtool.serve.embedded import ensure_embedded_model
from mathtool.serve.launch import (
    ServerProcess,
    ServerSpec,
    embedded_spec,
    model_spec,
    running_server,
    serve_forever,
    start_server,
)

__all__ = [
    "ServerProcess",
    "ServerSpec",
    "embedded_spec",
    "ensure_embedded_model",
    "model_spec",
    "running_server",
    "serve_forever",
    "start_server",
]
