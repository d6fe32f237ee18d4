"""`train()`: GRPO on TRL's GRPOTrainer, with our agent loop as its rollout function.

The output directory holds `train_config.json`, `metrics.jsonl`, `reward_curve.png`, `eval/step-N/`
and `checkpoint-N/` folders (Hugging Face format: loadable by transformers, servable by vLLM, plus
optimizer and trainer state for `--resume`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mathtool.agent.loop import AgentConfig
from mathtool.agent.prompts import initial_messages
from mathtool.agent.setup import agent_setup, load_tokenizer
from mathtool.data.problem import Problem
from mathtool.errors import ConfigError, DatasetError
from mathtool.paths import OUTPUT_FIX, atomic_write_text, check_writable, write_errors
from mathtool.train.config import ARITHMETIC, EMBEDDED_MODEL, TrainConfig
from mathtool.train.curriculum import arithmetic_problems, write_heldout
from mathtool.train.generation import attach_weight_sync, backend_factory, colocated_engine_settings
from mathtool.train.monitor import (
    CURVE_FILE,
    METRICS_FILE,
    TRAJECTORIES_FILE,
    TrainingMonitor,
    keep_rows_until,
    plot_reward_curve,
    read_rows,
)
from mathtool.train.periodic_eval import PeriodicEval
from mathtool.train.rewards import overlong_penalty, reward_functions
from mathtool.train.rollout import AgentRollout, DynamicSampling, MaskPolicy
from mathtool.train.runtime import AgentRuntime

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
HELDOUT_FILE = "heldout.jsonl"  # the curriculum's held-out problems, for `mathtool eval --dataset`


def train(config: TrainConfig, output: Path, resume: bool) -> Path | None:
    """Train with GRPO until `max_steps`; returns the last checkpoint's folder on the main process, None on the
    others. `config` comes from `config.resolve()` (preset, config file and flags, validated).

    Raises ConfigError (model not found, a process count that does not fit, an output directory that already
    holds checkpoints without `resume`) and DatasetError (missing or empty dataset).
    """
    processes = distributed_state().num_processes
    check_processes(config, processes, gpus_for_training())
    check_generation(config, _on_cpu())
    _warn_single_cpu_launch(processes)
    output = Path(output).expanduser()
    checkpoint = resume_checkpoint(output, resume)
    check_writable(output, OUTPUT_FIX)  # before the model loads
    source = str(_model_source(config.model))
    agent_config = agent_setup(config, load_tokenizer(source, config.chat_template, required=True),
                               config.context_length)
    problems = training_problems(config, agent_config.chat.tool_format)
    check_prompt_lengths(problems, agent_config)
    model = load_policy(config, source)
    eval_problems = evaluation_problems(config)
    if _is_main_process():
        with write_errors(output, OUTPUT_FIX):
            atomic_write_text(output / CONFIG_FILE, json.dumps(config.to_json(), indent=2))
            for rows in (METRICS_FILE, TRAJECTORIES_FILE):  # steps after the checkpoint are about to be redone
                keep_rows_until(output / rows, _checkpoint_step(checkpoint))
            if config.dataset == ARITHMETIC:
                write_heldout(output / HELDOUT_FILE, agent_config.chat.tool_format)
    with AgentRuntime(config.tool_timeout_s, config.tool_memory_mb, config.tool_isolation) as runtime:
        trainer = build_trainer(config, model, agent_config, problems, eval_problems, runtime, output)
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except Exception as e:
            if not _disk_full(e):
                raise
            last = _last_checkpoint(output)
            since = f"{last.name}" if last is not None else "step 0 (no checkpoint was complete)"
            raise ConfigError(f"cannot write {output}: no space left on the device; free some space (or copy the "
                              f"folder elsewhere), then run the same command with --resume: it continues from "
                              f"{since}") from None
        finally:
            trainer.rollout_func.close()
    if _is_main_process():
        plot_reward_curve(read_rows(output / METRICS_FILE), output / CURVE_FILE)
    distributed_state().wait_for_everyone()  # the main process has written the last checkpoint
    last = _last_checkpoint(output)
    if last is None:
        raise ConfigError(f"training saved no checkpoint under {output}")
    return last if _is_main_process() else None


def build_trainer(
    config: TrainConfig,
    model: Any,
    agent_config: AgentConfig,
    problems: list[Problem],
    eval_problems: list[Problem],
    runtime: AgentRuntime,
    output: Path,
) -> Any:
    """A GRPOTrainer whose rollouts are our agent loops, with the metrics/eval callback attached."""
    from datasets import Dataset
    from trl import GRPOTrainer

    tokenizer = agent_config.chat.tokenizer  # training always renders on the client (load_tokenizer required it)
    overlong = None
    if config.overlong_buffer:
        overlong = (overlong_penalty(config.max_response_length, config.overlong_buffer), config.overlong_penalty)
    functions, weights = reward_functions(config.reward_correct, config.reward_format, config.reward_tool, overlong)
    masks = MaskPolicy(config.mask_truncated, config.mask_inexact, config.mask_void_turns)
    rollout = AgentRollout(problems, runtime, agent_config, backend_factory(config, tokenizer, runtime),
                           (functions, weights), masks, config.n_parallel_agents, dynamic_sampling(config))
    with warnings.catch_warnings(), colocated_engine_settings(config):  # rollout_func: experimental in TRL 1.16
        warnings.filterwarnings("ignore", message="You are using 'rollout_func'")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=functions,
            args=grpo_args(config, output, weights),
            train_dataset=Dataset.from_list([{"prompt": p.problem} for p in problems]),
            processing_class=tokenizer,
            rollout_func=rollout,
        )
    attach_weight_sync(config, trainer)
    periodic_eval = None
    if eval_problems:
        periodic_eval = PeriodicEval(eval_problems, config.eval_samples, runtime, agent_config,
                                     config.n_parallel_agents, output)
    trainer.add_callback(TrainingMonitor(output, rollout, periodic_eval, config.eval_every, trainer))
    return trainer


def grpo_args(config: TrainConfig, output: Path, reward_weights: list[float]) -> Any:
    from trl import GRPOConfig

    use_vllm = config.generation != "transformers"
    return GRPOConfig(
        output_dir=str(output),
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        use_cpu=_on_cpu(),
        ddp_find_unused_parameters=False,  # a causal LM uses every weight: no extra pass over the graph
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=accumulation_steps(config),
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=config.bf16,
        num_generations=config.rollouts_per_problem,
        temperature=config.temperature,
        top_p=config.top_p,
        max_completion_length=config.max_response_length,
        epsilon=config.epsilon,
        epsilon_high=config.epsilon_high,
        beta=config.beta,
        loss_type=config.loss_type,
        mask_truncated_completions=False,  # the rollout masks by how each trajectory ended
        reward_weights=reward_weights,
        use_vllm=use_vllm,
        vllm_mode="server" if config.generation == "vllm-server" else "colocate",
        vllm_server_base_url=config.vllm_server_url,
        vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        vllm_importance_sampling_correction=config.vllm_importance_sampling,
        vllm_max_model_length=config.context_length if use_vllm else None,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        report_to=[],
    )


def accumulation_steps(config: TrainConfig) -> int:
    """Micro-batches per optimizer step, so that each step trains on one full generation batch."""
    per_pass = config.micro_batch_size * distributed_state().num_processes
    return config.problems_per_step * config.rollouts_per_problem // per_pass


def dynamic_sampling(config: TrainConfig) -> DynamicSampling | None:
    """The dynamic sampling settings, if on (`check_processes` has made sure each process holds whole groups)."""
    if not config.dynamic_sampling:
        return None
    return DynamicSampling(config.rollouts_per_problem, config.dynamic_sampling_max_rounds, config.seed)


def check_processes(config: TrainConfig, processes: int, gpus: int | None) -> None:
    """Refuse, in one line before any model loads, a process count that the settings cannot run on.

    Each step's trajectories (problems_per_step x rollouts_per_problem, TRL's generation batch) are split
    evenly across the processes, in micro-batches: they must divide by micro_batch_size x processes. Dynamic
    sampling refills groups within a process, so each process must hold whole groups. `gpus` is the number
    of GPUs the training processes share, None where unknown or set apart already (CUDA_VISIBLE_DEVICES):
    a vLLM server on this machine needs one that no training process uses, and vllm-colocate needs one per
    process.
    """
    per_step = config.problems_per_step * config.rollouts_per_problem
    per_pass = config.micro_batch_size * processes
    if per_step % per_pass:
        raise ConfigError(f"problems_per_step x rollouts_per_problem ({per_step}) must be a multiple of "
                          f"micro_batch_size x processes ({config.micro_batch_size} x {processes})")
    if config.dynamic_sampling and config.problems_per_step % processes:
        raise ConfigError(f"dynamic_sampling needs problems_per_step ({config.problems_per_step}) to be a multiple "
                          f"of the number of processes ({processes}), so that each holds whole groups")
    if not gpus:
        return
    if config.generation == "vllm-server" and _server_is_local(config.vllm_server_url) and processes >= gpus:
        raise ConfigError(f"generation vllm-server needs a GPU for `trl vllm-serve` that no training process uses: "
                          f"{processes} processes on {gpus} GPUs; launch fewer (configs/accelerate/"
                          f"qwen3-4b-4gpu-server.yaml) and serve on the others")
    if config.generation == "vllm-colocate" and processes > gpus:
        raise ConfigError(f"generation vllm-colocate runs a vLLM engine in each process, on its own GPU: "
                          f"{processes} processes on {gpus} GPUs")


def check_generation(config: TrainConfig, on_cpu: bool) -> None:
    """Refuse, in one line, a generation mode that cannot run on CPU."""
    if config.generation == "vllm-server" and on_cpu:
        raise ConfigError("generation vllm-server needs a GPU: TRL pushes the weights to `trl vllm-serve` over "
                          "NCCL; on CPU use vllm-colocate (configs/cpu-demo-vllm.yaml)")


def gpus_for_training() -> int | None:
    """The GPUs the training processes share, or None: none here, or CUDA_VISIBLE_DEVICES chose them already
    (the user has set some apart, for a server, say)."""
    import torch

    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None or not torch.cuda.is_available():
        return None
    return torch.cuda.device_count()


def _server_is_local(url: str | None) -> bool:
    host = urlparse(url).hostname if url else "localhost"  # TRL's default: this machine
    return host in ("localhost", "127.0.0.1", "0.0.0.0", "::1")


def load_policy(config: TrainConfig, source: str) -> Any:
    """The model to train (from `source`, a folder or Hub id), in Hugging Face format, ready to train and save."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, config.dtype))
    except (OSError, ValueError) as e:  # missing folder, unknown or unreachable Hub id, malformed name
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load model {config.model!r}: {first_line}") from None
    # A model dequantised from GGUF keeps a quantizer marker that makes training and save_pretrained refuse.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _model_source(name: str) -> Path | str:
    if name == EMBEDDED_MODEL:
        from mathtool.serve.embedded import ensure_embedded_model

        return ensure_embedded_model()
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.is_dir():
        raise ConfigError(f"model folder {name} does not exist")
    return path if path.is_dir() else name


def training_problems(config: TrainConfig, tool_format: str) -> list[Problem]:
    if config.dataset == ARITHMETIC:
        problems = arithmetic_problems(config.curriculum_size, config.seed, tool_format)
    else:
        from mathtool.data import load_problems

        problems = load_problems(config.dataset, source=config.dataset_source)
    problems = _unique_texts(problems)[: config.dataset_limit]
    if len(problems) < config.problems_per_step:
        raise DatasetError(f"dataset {config.dataset!r} has {len(problems)} problems; a step needs "
                           f"{config.problems_per_step}")
    return problems


def evaluation_problems(config: TrainConfig) -> list[Problem]:
    if not config.eval_dataset:
        return []
    from mathtool.data import load_problems

    problems = load_problems(config.eval_dataset, source=config.dataset_source)[: config.eval_limit]
    if not problems:
        raise DatasetError(f"evaluation dataset {config.eval_dataset!r} has no problems")
    return problems


def _unique_texts(problems: list[Problem]) -> list[Problem]:
    """One problem per statement: the rollout finds a prompt's problem by its text."""
    seen: dict[str, Problem] = {}
    for p in problems:
        seen.setdefault(p.problem, p)
    if len(seen) < len(problems):
        log.info("dropped %d problems whose statement repeats an earlier one", len(problems) - len(seen))
    return list(seen.values())


PROMPTS_CHECKED = 64  # training prompts rendered at start to compare with max_prompt_length


def check_prompt_lengths(problems: list[Problem], agent_config: AgentConfig) -> None:
    """Render the first training prompts: refuse a run none of whose prompts fit max_prompt_length (every
    trajectory would end `context` with no loss), warn when some do not."""
    limit, chat = agent_config.max_prompt_length, agent_config.chat
    lengths = [len(chat.render(initial_messages(p, chat.tool_format))) for p in problems[:PROMPTS_CHECKED]]
    over = sum(n > limit for n in lengths)
    if lengths and over == len(lengths):
        raise ConfigError(f"the first {len(lengths)} training prompts are {min(lengths)}-{max(lengths)} tokens, all "
                          f"over max_prompt_length {limit}: no trajectory could train; raise max_prompt_length")
    if over:
        log.warning("%d of the first %d training prompts are over max_prompt_length %d (up to %d tokens): their "
                    "trajectories end `context` and get no loss", over, len(lengths), limit, max(lengths))


def resume_checkpoint(output: Path, resume: bool) -> str | None:
    """The checkpoint to continue from; refuses to start over on top of an earlier run (its checkpoints, or
    the rows of steps it did before its first checkpoint)."""
    earlier = _checkpoint_folders(output) or (output / METRICS_FILE).exists()
    if earlier and not resume:
        raise ConfigError(f"{output} already holds a training run; add --resume to continue it, or {OUTPUT_FIX}")
    last = _last_checkpoint(output)
    if resume and last is None:
        log.warning("no checkpoint under %s to resume from; starting at step 0", output)
    return str(last) if last is not None else None


def _checkpoint_folders(output: Path) -> dict[int, Path]:
    """checkpoint-N folders by step N."""
    if not output.is_dir():
        return {}
    folders = (p for p in output.glob("checkpoint-*") if p.is_dir())
    return {int(p.name.removeprefix("checkpoint-")): p for p in folders if p.name.removeprefix("checkpoint-").isdigit()}


def _last_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint: transformers writes trainer_state.json last, so a folder without it was
    cut short (a crash or a full disk during the save) and is passed over."""
    folders = _checkpoint_folders(output)
    for step in sorted(folders, reverse=True):
        if (folders[step] / "trainer_state.json").is_file():
            return folders[step]
        log.warning("passing over %s: its save was cut short (no trainer_state.json)", folders[step])
    return None


def _disk_full(error: BaseException) -> bool:
    """Whether `error` (or one it came from) is a write that found no space: an OSError, or the text of
    safetensors' or torch.save's own errors, which do not keep the errno."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in ("No space left on device", "Disk quota exceeded", "file write failed")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def distributed_state() -> Any:
    """accelerate's view of this run's processes. `accelerate launch` starts several local processes only as
    for GPUs (through torchrun), without telling them to use the CPU; where there is no GPU, this does, so
    that they train together over gloo (`grpo_args` tells the trainer the same)."""
    from accelerate import PartialState

    return PartialState(cpu=_on_cpu())


def _on_cpu() -> bool:
    import torch
    from accelerate.utils import parse_flag_from_env

    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def _warn_single_cpu_launch(processes: int) -> None:
    """`accelerate launch --cpu --num_processes N` starts one process (N need mpirun); it leaves MASTER_PORT set."""
    if processes == 1 and _on_cpu() and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        log.warning("accelerate started a single process; for several on CPU, launch with "
                    "--config_file configs/accelerate/cpu-2-processes.yaml (or --multi_gpu --num_processes N)")


def _is_main_process() -> bool:
    return distributed_state().is_main_process


def _checkpoint_step(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0
