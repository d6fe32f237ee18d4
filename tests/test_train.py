"""GRPO training: the rollout bridge, the in-process backend, one real step, resume, settings.

The model is a tiny random Llama with the embedded model's tokenizer and chat template, so a training
step takes seconds. Where a test needs a known multi-turn conversation, a scripted backend answers in
place of a model: the agent loop, chat template, sandbox, grader and TRL are all real.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from statistics import fmean
from typing import Any

import pytest
import torch
import yaml
from test_unwritable import SMALL, in_namespace, mounts_work  # noqa: F401 (a fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mathtool.agent.prompts import initial_messages
from mathtool.agent.setup import agent_setup
from mathtool.agent.trajectory import Trajectory
from mathtool.data.problem import Problem
from mathtool.errors import ConfigError
from mathtool.llm.base import Completion, SamplingParams
from mathtool.llm.transformers_backend import TransformersBackend
from mathtool.run_record import ANSWERED, BUDGET, ERROR, STOPPED
from mathtool.train import PRESETS, TrainConfig, train
from mathtool.train.config import resolve
from mathtool.train.monitor import METRICS_FILE, TRAJECTORIES_FILE, read_rows
from mathtool.train.rewards import reward_functions
from mathtool.train.rollout import AgentRollout, MaskPolicy, to_trl
from mathtool.train.runtime import AgentRuntime
from mathtool.train.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = [Problem("add", "Use Python to compute 20 + 22.", "42"),
            Problem("mul", "Use Python to compute 6 * 9.", "54")]


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from mathtool.serve.embedded import ensure_embedded_model

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A 2-layer random Llama with the embedded tokenizer, saved as a Hugging Face folder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runtime() -> Any:
    with AgentRuntime(tool_timeout_s=5, tool_memory_mb=1024) as rt:
        yield rt


class ScriptedBackend:
    """Answers like a model that uses the tool: first a ```python block, then (after the output) a
    boxed answer, right and wrong in turn for each problem, so every group of two has one of each
    whatever order the concurrent trajectories reach the model in."""

    model = "scripted"
    supports_token_ids = True

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.answers_given: Counter[str] = Counter()  # per problem
        self.generated: list[list[int]] = []  # every completion's ids, in order

    async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        prompt = self.tokenizer.decode(prompt_ids)
        expression = "20 + 22" if "20 + 22" in prompt else "6 * 9"
        if prompt.count("<|im_start|>assistant") == 1:  # the first turn
            text = f"Let me compute it.\n```python\nprint({expression})\n```"
        else:
            right = self.answers_given[expression] % 2 == 0
            self.answers_given[expression] += 1
            text = f"The answer is \\boxed{{{eval(expression) if right else 7}}}."
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        self.generated.append(ids)
        return Completion(text=text, finish_reason="stop", token_ids=ids, logprobs=[-0.5] * len(ids))

    async def complete_chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        raise AssertionError("the token path must be used")


def _config(model_dir: Path, **changes: Any) -> TrainConfig:
    base = dict(model=str(model_dir), max_turns=2, max_response_length=64, max_prompt_length=512,
                temperature=1.0, problems_per_step=2, rollouts_per_problem=2, micro_batch_size=4,
                learning_rate=1e-3, reward_format=0.5, max_steps=1, save_every=1, n_parallel_agents=8)
    return TrainConfig(**{**base, **changes})


def _rollout(tokenizer: Any, runtime: Any, backend: Any) -> AgentRollout:
    config = _config(Path("unused"))
    return AgentRollout(PROBLEMS, runtime, agent_setup(config, tokenizer, config.context_length),
                        lambda trainer: backend, reward_functions(1.0, 0.5, 0.0), MaskPolicy(), n_parallel=8)


def test_env_mask_excludes_exactly_the_tool_output(tokenizer: Any, runtime: Any) -> None:
    backend = ScriptedBackend(tokenizer)
    out = _rollout(tokenizer, runtime, backend)([PROBLEMS[0].problem], trainer=None)
    prompt, completion, mask = out["prompt_ids"][0], out["completion_ids"][0], out["env_mask"][0]
    assert out["num_tool_calls"] == [1] and out["correct"] == [1.0]
    # The 1s are exactly the model's two turns, in order; the 0s between them are the tool's turn.
    model_tokens = [t for t, m in zip(completion, mask, strict=True) if m == 1]
    assert model_tokens == backend.generated[0] + backend.generated[1]
    assert completion[: len(backend.generated[0])] == backend.generated[0]
    assert completion[-len(backend.generated[1]) :] == backend.generated[1]
    tool_part = completion[len(backend.generated[0]) : -len(backend.generated[1])]
    assert set(mask[len(backend.generated[0]) : -len(backend.generated[1])]) == {0}
    assert "```output\n42\n```" in tokenizer.decode(tool_part)
    assert "print(" not in tokenizer.decode(tool_part) and "boxed" not in tokenizer.decode(tool_part)
    # Token-exact: the ids are what the chat template renders for the whole conversation.
    trajectory_messages = [{"role": "user", "content": PROBLEMS[0].problem}]
    rendered = tokenizer.apply_chat_template(
        [*_system(tokenizer), *trajectory_messages,
         {"role": "assistant", "content": tokenizer.decode(backend.generated[0][:-1])},
         {"role": "user", "content": "```output\n42\n```"},
         {"role": "assistant", "content": tokenizer.decode(backend.generated[1][:-1])}], tokenize=True)["input_ids"]
    assert rendered[: len(prompt) + len(completion)] == prompt + completion


def _system(tokenizer: Any) -> list[dict[str, str]]:
    from mathtool.agent.prompts import MARKDOWN_SYSTEM

    return [{"role": "system", "content": MARKDOWN_SYSTEM}]


def test_rollout_output_matches_trl_contract(tokenizer: Any, runtime: Any) -> None:
    # TRL's sampler repeats each prompt num_generations times, next to each other.
    prompts = [PROBLEMS[0].problem] * 2 + [PROBLEMS[1].problem] * 2
    rollout = _rollout(tokenizer, runtime, ScriptedBackend(tokenizer))
    out = rollout(prompts, trainer=None)
    assert {"prompt_ids", "completion_ids", "logprobs", "env_mask"} <= set(out)
    assert all(len(values) == len(prompts) for values in out.values())
    for completion, logprobs, mask in zip(out["completion_ids"], out["logprobs"], out["env_mask"], strict=True):
        assert len(completion) == len(logprobs) == len(mask) > 0
        assert set(mask) <= {0, 1} and all(isinstance(t, int) for t in completion)
        assert all(lp == 0.0 for lp, m in zip(logprobs, mask, strict=True) if m == 0)
    assert out["prompt_ids"][0] == out["prompt_ids"][1] != out["prompt_ids"][2]
    assert sorted(out["correct"]) == [0.0, 0.0, 1.0, 1.0]  # one right and one wrong in each group
    stats = rollout.take_stats()
    assert stats is not None and [r["problem_id"] for r in stats.trajectories] == ["add", "add", "mul", "mul"]
    assert [r["reward"] for r in stats.trajectories] == [c + 0.5 for c in out["correct"]]


def test_truncated_and_inexact_trajectories_are_masked() -> None:
    base = Trajectory("p", 0, termination=ANSWERED, prompt_ids=[1, 2], completion_ids=[3, 4, 5],
                      completion_mask=[1, 0, 1], logprobs=[-1.0, 0.0, -1.0])
    cut = replace(base, termination=BUDGET)
    inexact = replace(base, token_exact=False)
    failed = replace(base, termination=ERROR, completion_ids=[], completion_mask=[], logprobs=[])
    out = to_trl([base, cut, inexact, failed], MaskPolicy(truncated=True, inexact=True), eos_id=2)
    assert out["env_mask"] == [[1, 0, 1], [0, 0, 0], [0, 0, 0], [0]]
    assert out["completion_ids"][3] == [2]  # TRL needs one token; a masked EOS
    kept = to_trl([cut, inexact], MaskPolicy(truncated=False, inexact=False), eos_id=2)
    assert kept["env_mask"] == [[1, 0, 1], [1, 0, 1]]


def test_transformers_backend_batches_and_returns_tempered_logprobs(tiny_model_dir: Path, tokenizer: Any) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    backend = TransformersBackend(model, tokenizer)
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in ("Hello there", "Hi")]
    params = [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=n) for n in (12, 5)]

    async def both() -> list[Completion]:
        calls = (backend.complete_tokens(p, s) for p, s in zip(prompts, params, strict=True))
        return list(await asyncio.gather(*calls))

    outs = asyncio.run(both())
    assert backend.batcher.batch_sizes == [2]  # the two concurrent calls shared one generate()
    for prompt, param, out in zip(prompts, params, outs, strict=True):
        assert 0 < len(out.token_ids) <= param.max_tokens and len(out.logprobs) == len(out.token_ids)
        ended = out.token_ids[-1] == tokenizer.eos_token_id
        assert out.finish_reason == ("stop" if ended else "length")
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(expected, torch.tensor(out.logprobs), atol=1e-4)
    backend.close()


def test_one_step_changes_the_weights_and_writes_metrics(tiny_model_dir: Path, tokenizer: Any, runtime: Any,
                                                         tmp_path: Path) -> None:
    config = _config(tiny_model_dir, eval_every=1, eval_samples=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = build_trainer(config, model, agent_setup(config, tokenizer, config.context_length), PROBLEMS,
                            PROBLEMS[:1], runtime, tmp_path)
    backend = ScriptedBackend(tokenizer)
    trainer.rollout_func.make_backend = lambda _trainer: backend
    trainer.train()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed, "one GRPO step left every weight as it was"
    row = read_rows(tmp_path / METRICS_FILE)[0]
    for key in ("step", "reward_mean", "reward_std", "tool_calls_mean", "response_tokens_mean", "loss",
                "time_rollout_s", "time_tools_s", "time_grading_s", "time_update_s", "zero_advantage_groups",
                "eval_pass@1"):
        assert key in row, key
    assert row["step"] == 1 and row["tool_calls_mean"] == 1.0 and row["reward_mean"] == pytest.approx(1.0)
    assert row["zero_advantage_groups"] == 0 and row["groups"] == 2
    assert not {"void_masked", "overlong_penalized", "dynamic_dropped_groups"} & set(row)  # all off by default
    rollouts = read_rows(tmp_path / TRAJECTORIES_FILE)  # what the model said, a line per trajectory
    assert len(rollouts) == row["trajectories"] and {r["step"] for r in rollouts} == {1}
    assert fmean(r["reward"] for r in rollouts) == pytest.approx(row["reward_mean"])
    assert all(r["messages"][-1]["role"] == "assistant" and "\\boxed" in r["messages"][-1]["content"]
               for r in rollouts if r["termination"] == ANSWERED)
    assert (tmp_path / "eval" / "step-000001" / "metrics.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1")  # Hugging Face format
    assert torch.equal(reloaded.model.norm.weight, model.model.norm.weight)


def test_resume_continues_from_the_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "tiny.yaml"
    settings = _config(tiny_model_dir, max_response_length=8, max_turns=1).to_json()
    config_file.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v != getattr(TrainConfig(), k)}))
    output = tmp_path / "run"
    first = train(resolve(None, config_file, {"max_steps": 1}), output=output, resume=False)
    assert first.name == "checkpoint-1"
    first_row = read_rows(output / METRICS_FILE)[0]
    with pytest.raises(ConfigError, match="--resume"):
        train(resolve(None, config_file, {"max_steps": 2}), output=output, resume=False)
    with (output / TRAJECTORIES_FILE).open("a") as f:  # a crash after step 2's rollouts, before its checkpoint
        f.write('{"step": 2, "problem_id": "redone"}\n{"step": 2, "pro')
    last = train(resolve(None, config_file, {"max_steps": 2}), output=output, resume=True)
    assert last.name == "checkpoint-2"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 2
    rows = read_rows(output / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2] and rows[0] == first_row  # step 1 was not redone
    steps = Counter(r["step"] for r in read_rows(output / TRAJECTORIES_FILE))
    assert steps == {1: first_row["trajectories"], 2: rows[1]["trajectories"]}
    assert (output / "reward_curve.png").stat().st_size > 0


def test_prompts_that_cannot_fit_are_refused_before_the_model_loads(tiny_model_dir: Path, tokenizer: Any,
                                                                    tmp_path: Path, caplog: Any) -> None:
    from mathtool.train.trainer import check_prompt_lengths

    config = _config(tiny_model_dir, max_prompt_length=40)
    with pytest.raises(ConfigError, match=r"^the first 64 training prompts are \d+-\d+ tokens, all over "
                                          r"max_prompt_length 40: no trajectory could train; raise max_prompt_length$"):
        train(config, output=tmp_path / "run", resume=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    setup = agent_setup(config, tokenizer, config.context_length)
    long = Problem("long", "Use Python to compute " + "1 + " * 40 + "1.", "41")
    short_length = len(setup.chat.render(initial_messages(PROBLEMS[0], setup.chat.tool_format)))
    check_prompt_lengths([PROBLEMS[0], long], replace(setup, max_prompt_length=short_length))  # one fits: a warning
    assert f"1 of the first 2 training prompts are over max_prompt_length {short_length}" in caplog.text


@pytest.mark.usefixtures("mounts_work")
def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes_from_what_it_wrote(tiny_model_dir: Path,
                                                                                tmp_path: Path) -> None:
    config_file = tmp_path / "tiny.yaml"
    settings = _config(tiny_model_dir, max_response_length=8, max_turns=1).to_json()
    config_file.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v != getattr(TrainConfig(), k)}))
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    # On a 256 KiB filesystem the run's settings and step 1's rows fit, its checkpoint (~19 MB) does not; what
    # the run left there is copied out before the filesystem goes away.
    command = ('python -m mathtool.cli train --config "$CONFIG" --output "$D/run"; code=$?; '
               'cp -a "$D/run" "$KEPT"; exit $code')
    result = in_namespace(SMALL, disk, ["sh", "-c", command], env={"CONFIG": str(config_file), "KEPT": str(kept),
                                                                    "PATH": f"{Path(sys.executable).parent}:"
                                                                            f"{os.environ['PATH']}"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {disk / 'run'}: no space left on the device; free some space (or copy the folder "
        "elsewhere), then run the same command with --resume: it continues from step 0 (no checkpoint was complete)")
    assert [r["step"] for r in read_rows(kept / METRICS_FILE)] == [1]
    assert (kept / "checkpoint-1").is_dir() and not (kept / "checkpoint-1" / "trainer_state.json").exists()
    with pytest.raises(ConfigError, match="already holds a training run; add --resume"):
        train(resolve(None, config_file, None), output=kept, resume=False)
    last = train(resolve(None, config_file, None), output=kept, resume=True)  # past the torn checkpoint-1
    assert last == kept / "checkpoint-1" and (last / "trainer_state.json").is_file()
    assert [r["step"] for r in read_rows(kept / METRICS_FILE)] == [1]  # step 1 redone, its first row dropped
    assert Counter(r["step"] for r in read_rows(kept / TRAJECTORIES_FILE)) == {1: 4}


def test_presets_and_their_yaml_copies_agree() -> None:
    for name, values in PRESETS.items():
        assert yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text()) == values
        resolve(name, None, None)  # every preset is valid


@pytest.mark.parametrize(
    ("preset", "text", "match"),
    [("nope", None, "unknown preset"), (None, "learning_rat: 1", "unknown setting"),
     (None, "max_steps: ten", "max_steps must be an integer"), (None, "generation: tpu", "generation must be one of"),
     (None, None, "give --preset"), (None, "overlong_buffer: 9000", "overlong_buffer must be"),
     (None, "dynamic_sampling_max_rounds: 0", "dynamic_sampling_max_rounds must be")],
)
def test_bad_settings_are_one_line_config_errors(tmp_path: Path, preset: str | None, text: str | None,
                                                 match: str) -> None:
    path = None
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError, match=match) as error:
        resolve(preset, path, None)
    assert "\n" not in str(error.value)


class OutputInventingBackend:
    """A model that writes its code, then makes up the output and an answer from it, like small models do."""

    model = "scripted"
    supports_token_ids = True

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.prompts: list[list[int]] = []
        self.params: list[SamplingParams] = []

    async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        self.prompts.append(prompt_ids)
        self.params.append(params)
        if len(self.prompts) == 1:
            text = "```python\nprint(6 * 9)\n```\n```output\n56\n```\n\\boxed{56}"
        else:
            seen = self.tokenizer.decode(prompt_ids).rsplit("```output\n", 1)[1].split("\n")[0]
            text = f"So it is \\boxed{{{seen}}}."
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return Completion(text=text, finish_reason="stop", token_ids=ids, logprobs=[-0.25] * len(ids))

    async def complete_chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        raise AssertionError("the token path must be used")


def test_a_made_up_output_is_cut_and_the_tool_answers_instead(tokenizer: Any) -> None:
    from mathtool.agent.chat_format import chat_setup
    from mathtool.agent.loop import AgentConfig, run_agent
    from mathtool.sandbox import PythonSandbox

    backend = OutputInventingBackend(tokenizer)

    async def one() -> Trajectory:
        async with PythonSandbox(timeout_s=5) as sandbox:
            chat = chat_setup(tokenizer, None, None, None)
            return await run_agent(PROBLEMS[1], 0, backend, sandbox, AgentConfig(chat=chat, max_turns=2))

    traj = asyncio.run(one())
    assert all(p.stop == ("```output",) for p in backend.params)  # the server may stop there itself
    assistant = [m["content"] for m in traj.messages if m["role"] == "assistant"]
    assert assistant == ["```python\nprint(6 * 9)\n```", "So it is \\boxed{54}."]
    assert traj.messages[3] == {"role": "user", "content": "```output\n54\n```"}
    assert (traj.num_tool_calls, traj.correct, traj.termination, traj.token_exact) == (1, True, ANSWERED, True)
    # the record holds only what the model kept, and extends exactly into the second prompt
    assert traj.prompt_ids + traj.completion_ids[: len(backend.prompts[1]) - len(traj.prompt_ids)] == backend.prompts[1]
    kept = [i for i, m in zip(traj.completion_ids, traj.completion_mask, strict=True) if m == 1]
    assert tokenizer.decode(kept, skip_special_tokens=True) == "".join(assistant)
    assert len(kept) == traj.response_tokens == len(traj.logprobs) - traj.completion_mask.count(0)


def test_evaluation_in_a_vllm_mode_first_syncs_this_steps_weights() -> None:
    """TRL pushes new weights into its vLLM engine only before the next rollout; an evaluation at the end of
    a step must push them itself, or it measures the previous step's policy."""
    from types import SimpleNamespace

    from mathtool.train.monitor import TrainingMonitor

    events: list[str] = []
    engine = SimpleNamespace(sync_weights=lambda: events.append("sync"))
    trainer = SimpleNamespace(use_vllm=True, _last_loaded_step=4, vllm_generation=engine, accelerator=None,
                              state=SimpleNamespace(global_step=5))
    rollout = SimpleNamespace(backend="vllm")
    periodic_eval = lambda step, backend, accelerator: events.append(f"eval {step}") or {}  # noqa: E731
    monitor = TrainingMonitor(Path("unused"), rollout, periodic_eval, eval_every=5, trainer=trainer)
    monitor.on_step_end(None, SimpleNamespace(global_step=5, max_steps=10), None)
    assert events == ["sync", "eval 5"] and trainer._last_loaded_step == 5
    monitor.on_step_end(None, SimpleNamespace(global_step=5, max_steps=10), None)  # already in sync: no push
    assert events == ["sync", "eval 5", "eval 5"]


# The TIR training algorithms: overlong penalty, void-turn masking, dynamic sampling.

ALGORITHM_PROBLEMS = [Problem("add", "Use Python to compute 20 + 22.", "42"),  # always right: equal rewards
                      Problem("neg", "Use Python to compute 3 - 10.", "-7"),  # always wrong: equal rewards
                      Problem("mul", "Use Python to compute 6 * 9.", "54"),  # right and wrong in turn
                      Problem("half", "Use Python to compute 7 * 8.", "56")]  # right and a void turn in turn
BEHAVIOUR = {"20 + 22": "right", "3 - 10": "wrong", "6 * 9": "right/wrong", "7 * 8": "right/void"}


class BehaviourBackend:
    """A model scripted per problem (`BEHAVIOUR`): a ```python block, then after its output a boxed answer,
    right, wrong, or right and wrong in turn; or, in turn, a right answer and a first turn that gives
    neither code nor answer (a void turn). "In turn" counts per problem, so a group of two gets one of each."""

    model = "scripted"
    supports_token_ids = True

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.turns: Counter[tuple[str, int]] = Counter()  # (expression, turn) -> calls so far

    async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        prompt = self.tokenizer.decode(prompt_ids)
        expression = next(e for e in BEHAVIOUR if e in prompt)
        first = prompt.count("<|im_start|>assistant") == 1
        nth = self.turns[expression, first]
        self.turns[expression, first] += 1
        choices = BEHAVIOUR[expression].split("/")
        behaviour = choices[nth % len(choices)]
        if first:
            code = f"Let me compute it.\n```python\nprint({expression})\n```"
            text = "I am not sure." if behaviour == "void" else code
        else:
            text = f"The answer is \\boxed{{{eval(expression) if behaviour != 'wrong' else 7}}}."
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return Completion(text=text, finish_reason="stop", token_ids=ids, logprobs=[-0.5] * len(ids))

    async def complete_chat(self, messages: list[dict], params: SamplingParams) -> Completion:
        raise AssertionError("the token path must be used")


def test_overlong_penalty_is_dapos_soft_punishment() -> None:
    from mathtool.train.rewards import overlong_penalty, penalized_overlong, total_reward
    from mathtool.train.rollout import reward_fields

    # budget 100, buffer 20: no penalty up to 80 tokens, then linear down to -1 at 100
    trajs = [Trajectory("p", i, response_tokens=n) for i, n in enumerate((10, 80, 81, 90, 100))]
    fields = reward_fields(trajs)
    penalty = overlong_penalty(max_length=100, buffer=20)
    assert penalty(**fields) == [0.0, 0.0, -0.05, -0.5, -1.0]
    functions, weights = reward_functions(1.0, 0.0, 0.0, (penalty, 0.5))
    assert [f.__name__ for f in functions] == ["correctness", "overlong"] and weights == [1.0, 0.5]
    assert total_reward(fields, functions, weights) == [0.0, 0.0, -0.025, -0.25, -0.5]
    assert penalized_overlong(fields, functions) == 3
    assert penalized_overlong(fields, reward_functions(1.0, 0.0, 0.0)[0]) is None  # off


def test_void_turns_are_counted_by_the_loop_and_masked(tokenizer: Any) -> None:
    """A turn with neither a runnable tool call nor a final answer is void: the last turn of a stopped
    trajectory, or a turn whose only call is malformed (the model answers after the error message)."""
    from mathtool.agent.chat_format import chat_setup
    from mathtool.agent.loop import AgentConfig, run_agent
    from mathtool.sandbox import PythonSandbox

    class Replies:
        model, supports_token_ids = "scripted", True

        def __init__(self, texts: list[str]) -> None:
            self.texts = texts

        async def complete_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
            text = self.texts.pop(0)
            ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            return Completion(text=text, finish_reason="stop", token_ids=ids, logprobs=[-0.5] * len(ids))

    call = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6 * 9)"}}\n</tool_call>'
    scripts = {"stopped": ["I am not sure."],
               "malformed": ["<tool_call>\n{oops\n</tool_call>", "So \\boxed{54}."],
               "good": [call, "So \\boxed{54}."]}

    async def run_all() -> dict[str, Trajectory]:
        config = AgentConfig(chat=chat_setup(tokenizer, "qwen3", None, None), max_turns=3)
        async with PythonSandbox(timeout_s=5) as sandbox:
            return {name: await run_agent(PROBLEMS[1], 0, Replies(texts), sandbox, config)
                    for name, texts in scripts.items()}

    trajs = asyncio.run(run_all())
    assert {name: (t.termination, t.void_turns, t.correct) for name, t in trajs.items()} == {
        "stopped": (STOPPED, 1, False), "malformed": (ANSWERED, 1, True), "good": (ANSWERED, 0, True)}
    order = [trajs["stopped"], trajs["malformed"], trajs["good"]]
    masked = to_trl(order, MaskPolicy(void_turns=True), eos_id=tokenizer.eos_token_id)["env_mask"]
    assert [set(m) for m in masked] == [{0}, {0}, {0, 1}]
    unmasked = to_trl(order, MaskPolicy(), eos_id=tokenizer.eos_token_id)["env_mask"]  # off: as before
    assert all(1 in m for m in unmasked)


def _algorithm_rollout(tokenizer: Any, runtime: Any, problems: list[Problem], max_rounds: int) -> AgentRollout:
    from mathtool.train.rollout import DynamicSampling

    backend, config = BehaviourBackend(tokenizer), _config(Path("unused"))
    return AgentRollout(problems, runtime, agent_setup(config, tokenizer, config.context_length),
                        lambda trainer: backend, reward_functions(1.0, 0.5, 0.0), MaskPolicy(void_turns=True),
                        n_parallel=8, dynamic=DynamicSampling(group_size=2, max_rounds=max_rounds))


def test_dynamic_sampling_replaces_equal_reward_groups_in_place(tokenizer: Any, runtime: Any) -> None:
    add, neg, mul, half = ALGORITHM_PROBLEMS
    rollout = _algorithm_rollout(tokenizer, runtime, ALGORITHM_PROBLEMS, max_rounds=3)
    out = rollout([add.problem] * 2 + [mul.problem] * 2, trainer=None)
    # "add" (all right) is dropped; one missing group at a signal rate of 1/2 draws both other problems
    # in one round: "half" has signal and takes add's slot, "neg" (all wrong) is dropped too.
    assert all(len(values) == 4 for values in out.values())
    stats = rollout.take_stats()
    assert stats is not None and [r["problem_id"] for r in stats.trajectories] == ["half", "half", "mul", "mul"]
    assert sorted(out["correct"][:2]) == sorted(out["correct"][2:]) == [0.0, 1.0]
    assert out["prompt_ids"][0] != out["prompt_ids"][2] and out["prompt_ids"][0] == out["prompt_ids"][1]
    assert stats.counts == {"dynamic_dropped_groups": 2, "dynamic_dropped_trajectories": 4,
                            "dynamic_refill_groups": 2, "dynamic_rounds": 1, "dynamic_unfilled_groups": 0,
                            "void_masked": 1}
    void = out["num_tool_calls"][:2].index(0)  # half's void trajectory: masked, still in the group
    assert set(out["env_mask"][void]) == {0} and 1 in out["env_mask"][1 - void]


def test_dynamic_sampling_keeps_equal_groups_when_no_problem_is_left(tokenizer: Any, runtime: Any) -> None:
    add, neg, _, _ = ALGORITHM_PROBLEMS
    rollout = _algorithm_rollout(tokenizer, runtime, [add, neg], max_rounds=3)
    out = rollout([add.problem] * 2, trainer=None)
    assert out["correct"] == [1.0, 1.0]  # the batch stays full: add's group, advantage 0
    counts = rollout.take_stats().counts
    assert counts["dynamic_unfilled_groups"] == 1 and counts["dynamic_dropped_groups"] == 1  # neg's group
    assert counts["dynamic_rounds"] == 1 and counts["dynamic_refill_groups"] == 1
    with pytest.raises(ConfigError, match="whole groups"):  # a group split across processes cannot be refilled
        rollout([add.problem, neg.problem], trainer=None)


def test_a_step_with_all_three_algorithms_logs_what_they_removed(tiny_model_dir: Path, tokenizer: Any,
                                                                 runtime: Any, tmp_path: Path) -> None:
    # TRL picks 2 of the 3 problems; whichever it picks, one equal-reward group is replaced by the third
    # problem's group or, that one being equal too, kept; "half" ends up in the batch with its void turn.
    problems = [ALGORITHM_PROBLEMS[i] for i in (0, 1, 3)]
    config = _config(tiny_model_dir, dynamic_sampling=True, dynamic_sampling_max_rounds=2, mask_void_turns=True,
                     overlong_buffer=62)  # penalty from 3 tokens on: every trajectory
    trainer = build_trainer(config, AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            agent_setup(config, tokenizer, config.context_length), problems, [], runtime, tmp_path)
    trainer.rollout_func.make_backend = lambda _trainer: BehaviourBackend(tokenizer)
    trainer.train()
    row = read_rows(tmp_path / METRICS_FILE)[0]
    assert row["trajectories"] == 4 and "loss" in row
    assert (row["dynamic_dropped_groups"], row["dynamic_dropped_trajectories"], row["dynamic_refill_groups"],
            row["dynamic_rounds"], row["dynamic_unfilled_groups"]) == (1, 2, 1, 1, 1)
    assert row["zero_advantage_groups"] == row["dynamic_unfilled_groups"]
    assert row["void_masked"] == 1 and row["masked"] == 1 and row["overlong_penalized"] == 4
