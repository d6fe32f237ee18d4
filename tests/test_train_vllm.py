"""Training with rollouts from vLLM's CPU build in the training process (`generation: vllm-colocate`).

One GRPO step of the cpu-demo preset (the embedded SmolLM2-135M, tied embeddings), shrunk to 2 problems x 2
rollouts of at most 32 tokens. So that the step has a group whose rewards differ (else its gradient is 0),
the overlong penalty covers the whole budget (a rollout that stops early scores above one cut at 32 tokens)
and dynamic sampling replaces equal-reward groups. vLLM runs float32 here, so its logprobs must be the
policy's own, before the update; after the update and a sync, they must be the updated policy's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from mathtool.agent.setup import agent_setup, load_tokenizer
from mathtool.errors import ConfigError
from mathtool.llm.vllm_colocate import InPlaceWeightSync
from mathtool.train.config import resolve
from mathtool.train.monitor import METRICS_FILE, read_rows, sync_vllm_weights
from mathtool.train.runtime import AgentRuntime
from mathtool.train.trainer import _model_source, build_trainer, check_generation, load_policy, training_problems

TINY = {"generation": "vllm-colocate", "problems_per_step": 2, "rollouts_per_problem": 2, "max_response_length": 32,
        "max_steps": 1, "learning_rate": 1e-4, "overlong_buffer": 32, "dynamic_sampling": True, "save_every": 1}
TOLERANCE = 1e-3  # float32 vLLM against float32 transformers: ~3e-5 measured


def _policy_logprobs(model: Any, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


@pytest.fixture(scope="module")
def step(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One step; what it rolled out, the trainer and the policy as it was before.

    TRL's colocate mode sets RANK, WORLD_SIZE and MASTER_PORT in this process's environment for vLLM, whose
    process group then holds that port until this process exits: the environment is put back afterwards, or
    every later test's `mathtool train` subprocess would inherit it and fail to bind the port (EADDRINUSE)."""
    environment = dict(os.environ)
    try:
        yield _one_step(tmp_path_factory)
    finally:
        os.environ.clear()
        os.environ.update(environment)


def _one_step(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config = resolve("cpu-demo", None, TINY)
    output = tmp_path_factory.mktemp("vllm-step")
    source = str(_model_source(config.model))
    tokenizer = load_tokenizer(source, config.chat_template, required=True)
    agent_config = agent_setup(config, tokenizer, config.context_length)
    model = load_policy(config, source)
    with AgentRuntime(config.tool_timeout_s, config.tool_memory_mb, config.tool_isolation) as runtime:
        trainer = build_trainer(config, model, agent_config, training_problems(config, agent_config.chat.tool_format),
                                [], runtime, output)
        rolled_out: list[dict[str, Any]] = []
        rollout = trainer.rollout_func

        def recording(prompts: list[str], trl_trainer: Any) -> dict[str, Any]:
            rolled_out.append(rollout(prompts, trl_trainer))
            return rolled_out[-1]

        trainer.rollout_func = recording
        try:
            trainer.train()
        finally:
            rollout.close()
    return {"trainer": trainer, "rolled_out": rolled_out, "config": config, "output": output,
            "before": AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)}


@pytest.mark.slow
def test_the_step_trains_on_vllms_token_exact_rollouts_and_their_logprobs(step: dict[str, Any]) -> None:
    trainer, before, temperature = step["trainer"], step["before"], step["config"].temperature
    changed = [name for name, p in trainer.model.named_parameters()
               if not torch.equal(p.detach(), before.get_parameter(name).detach())]
    assert changed, "the step left every weight as it was"
    row = read_rows(step["output"] / METRICS_FILE)[0]
    assert row["token_inexact"] == 0 and row["trajectories"] == 4
    assert row["zero_advantage_groups"] < row["groups"], "no group with a reward signal"
    [out] = step["rolled_out"]
    checked = 0
    for prompt, completion, logprobs, mask in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"],
                                                  out["env_mask"], strict=True):
        assert len(logprobs) == len(completion)
        expected = _policy_logprobs(before, prompt, completion, temperature)
        model_tokens = torch.tensor([i for i, keep in enumerate(mask) if keep])
        if len(model_tokens):
            actual = torch.tensor(logprobs)[model_tokens]
            assert actual.max() < 0 and torch.allclose(actual, expected[model_tokens], atol=TOLERANCE)
            checked += len(model_tokens)
    assert checked > 0, "no model-generated token in the rollouts"


@pytest.mark.slow
def test_vllm_generates_with_the_updated_weights_after_a_sync(step: dict[str, Any]) -> None:
    from vllm import SamplingParams

    trainer, before, temperature = step["trainer"], step["before"], step["config"].temperature
    sync = trainer.vllm_generation.sync_weights
    assert isinstance(sync, InPlaceWeightSync) and len(sync.seconds) == 1  # before the step's rollout
    sync_vllm_weights(trainer)  # what TRL does before the next step's rollout
    assert len(sync.seconds) == 2
    prompt = step["rolled_out"][0]["prompt_ids"][0]
    params = SamplingParams(temperature=temperature, max_tokens=16, logprobs=0, seed=0)
    [result] = trainer.vllm_generation.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    completion = list(result.outputs[0].token_ids)
    from_vllm = torch.tensor([step_lp[token].logprob for step_lp, token in zip(result.outputs[0].logprobs,
                                                                               completion, strict=True)])
    updated = _policy_logprobs(trainer.model, prompt, completion, temperature)
    old = _policy_logprobs(before, prompt, completion, temperature)
    assert (updated - old).abs().max() > 10 * TOLERANCE, "the update barely moved these logprobs: no test"
    assert torch.allclose(from_vllm, updated, atol=TOLERANCE)


def test_vllm_server_on_cpu_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="vllm-server needs a GPU") as error:
        check_generation(resolve("cpu-demo", None, {"generation": "vllm-server"}), on_cpu=True)
    assert "\n" not in str(error.value)
    check_generation(resolve("cpu-demo", None, {"generation": "vllm-server"}), on_cpu=False)
    check_generation(resolve("cpu-demo", None, {"generation": "vllm-colocate"}), on_cpu=True)
