"""The reference workload's path on the embedded model: Qwen3's template, Hermes tool calls, the logprobs
training relies on, the GPU server commands. The session's embedded vLLM server runs as the reference
deployment does (`--chat-template qwen3 --tool-call-parser hermes --logprobs-mode processed_logprobs`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mathtool.agent.chat_format import ChatFormat, chat_setup, chat_template_path
from mathtool.agent.loop import AgentConfig, run_agent
from mathtool.agent.parsers import HERMES, parse_hermes
from mathtool.agent.prompts import initial_messages
from mathtool.data.problem import Problem
from mathtool.llm import OpenAIBackend, SamplingParams
from mathtool.run_record import MAX_TURNS
from mathtool.sandbox import PythonSandbox
from mathtool.serve import ServerSpec, embedded_spec
from mathtool.serve.launch import server_command

REPO = Path(__file__).resolve().parents[1]
PROBLEM = Problem("mul", "Compute 6 * 7 with the python tool.", "42")
CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'


def mathtool(*args: str, module: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mathtool.cli"] if module else [str(Path(sys.executable).parent / "mathtool")]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("module", [True, False], ids=["python -m mathtool.cli", "console script"])
@pytest.mark.parametrize("command", ["prepare", "datasets", "eval", "serve", "report", "train"])
def test_every_command_has_help_both_ways(command: str, module: bool) -> None:
    result = mathtool(command, "--help", module=module, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and command in result.stdout


def test_server_commands_carry_the_template_and_only_asked_for_logprobs() -> None:
    qwen3 = str(chat_template_path("qwen3"))
    embedded = server_command(embedded_spec(port=1, chat_template="qwen3"))
    assert embedded[embedded.index("--chat-template") + 1] == qwen3
    assert "--logprobs-mode" not in embedded  # evaluation does not pay for processed logprobs
    trained = server_command(embedded_spec(port=1, logprobs_mode="processed_logprobs"))
    assert trained[trained.index("--logprobs-mode") + 1] == "processed_logprobs"
    gpu = server_command(ServerSpec("Qwen/Qwen3-4B", port=1, python=sys.executable, chat_template="qwen3",
                                    tool_call_parser="hermes"))
    assert gpu[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "Qwen/Qwen3-4B"]  # `vllm serve`
    assert gpu[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]


def test_sglang_in_an_environment_without_it_is_one_clear_line(tmp_path: Path) -> None:
    from mathtool.errors import ServerError

    with pytest.raises(ServerError, match="SGLang needs its own environment"):
        server_command(ServerSpec("Qwen/Qwen3-4B", engine="sglang", port=1, python=sys.executable))


@pytest.mark.server
async def test_the_chat_path_reads_the_calls_the_server_parsed(embedded_server) -> None:
    """With tools sent, vLLM's Hermes parser turns the model's <tool_call> text into message.tool_calls; the
    loop runs them and answers each with a tool message carrying its id, which the server renders back
    through Qwen3's template. SmolLM2 rarely writes a call by itself, so its first turn is held to one by
    vLLM's structured outputs (a regex): everything after the sampling is the real server path."""
    config = AgentConfig(chat=ChatFormat(HERMES), max_turns=2, max_response_length=200,  # no tokenizer: the chat path
                         sampling=SamplingParams(temperature=0.0, max_tokens=100))
    regex = "".join("\\" + char if char in "\\()*{}[].+?|^$" else char for char in CALL).replace("\n", "\\n")
    forced = {"structured_outputs": {"regex": regex}}
    async with await OpenAIBackend.connect([embedded_server.base_url], extra_body=forced) as llm:
        async with PythonSandbox(timeout_s=5) as sandbox:
            traj = await run_agent(PROBLEM, 0, llm, sandbox, config)
    assert traj.error is None, traj.error
    first = traj.messages[2]
    assert first["role"] == "assistant" and "<tool_call>" not in first["content"]  # the server took the call out
    assert [call["function"]["name"] for call in first["tool_calls"]] == ["python"]
    assert json.loads(first["tool_calls"][0]["function"]["arguments"]) == {"code": "print(6 * 7)"}
    result = traj.messages[3]
    assert result == {"role": "tool", "content": "42", "tool_call_id": first["tool_calls"][0]["id"]}
    # the second (last) turn is held to a call too: parsed by the server, not run, the turn limit reached
    assert traj.messages[4]["tool_calls"] and traj.num_tool_calls == 1 and traj.termination == MAX_TURNS
    assert traj.prompt_ids is None  # the chat path: no token record


@pytest.mark.server
async def test_server_logprobs_match_the_trainers_recomputation(embedded_server) -> None:
    """vLLM's processed logprobs of sampled tokens against TRL's own computation on the same tokens
    (log-softmax of logits / temperature, over the whole vocabulary). Every sampling field is sent: with
    top_k=5 (what a model's generation_config may set when the client leaves it out) they disagree."""
    from trl.trainer.utils import selective_log_softmax

    tokenizer = AutoTokenizer.from_pretrained(embedded_server.model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_server.model_dir, dtype=torch.float32).eval()
    chat = chat_setup(tokenizer, "qwen3", None, None)
    prompt = chat.render(initial_messages(PROBLEM, HERMES))
    temperature = 0.7

    async def sample(top_k: int) -> tuple[list[int], list[float]]:
        async with await OpenAIBackend.connect([embedded_server.base_url]) as llm:
            params = SamplingParams(temperature=temperature, top_p=1.0, top_k=top_k, max_tokens=48, seed=3)
            completion = await llm.complete_tokens(prompt, params)
        return completion.token_ids, completion.logprobs

    def mean_gap(ids: list[int], served: list[float]) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[:, len(prompt) - 1 : -1]
        ours = selective_log_softmax(logits / temperature, torch.tensor([ids]))[0]
        return float((ours - torch.tensor(served)).abs().mean())

    full, top5 = await sample(0), await sample(5)
    assert len(full[0]) > 8
    assert mean_gap(*full) < 0.02
    assert mean_gap(*top5) > 5 * mean_gap(*full)


@pytest.mark.server
@pytest.mark.slow
def test_eval_with_qwen3s_template_is_token_exact_with_the_schema_in_the_prompt(embedded_server,
                                                                               shared_data, tmp_path) -> None:
    """The README's Qwen3 command on the embedded model (here against the session's server, with the model's
    folder as tokenizer, as `--base-url` users do): Hermes format, token-exact, the tool schema in the
    prompt ids, and every well-formed <tool_call> the model wrote was run."""
    out = tmp_path / "run"
    result = mathtool("eval", "--dataset", "aime2024", "--source", str(shared_data), "--chat-template", "qwen3",
                      "--limit", "2", "--n-samples", "2", "--base-url", embedded_server.base_url,
                      "--tokenizer", str(embedded_server.model_dir), "--max-response-length", "256",
                      "--seed", "0", "--output", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["tool_format"], config["token_exact"], config["chat_template"]) == ("hermes", True, "qwen3")
    tokenizer = AutoTokenizer.from_pretrained(embedded_server.model_dir)
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        prompt = tokenizer.decode(record["prompt_ids"])
        assert '<tools>\n{"type": "function", "function": {"name": "python"' in prompt
        assert record["token_exact"] and sum(record["completion_mask"]) == record["response_tokens"]
        assert record["num_tool_calls"] == calls_that_ran(record["messages"])
    assert json.loads((out / "metrics.json").read_text())["num_inexact"] == 0


def calls_that_ran(messages: list[dict]) -> int:
    """Every call the model wrote before its last turn was answered, one tool message per call, in order;
    returns how many were well-formed (those count as tool calls)."""
    well_formed = 0
    for i, message in enumerate(messages[:-1]):
        if message["role"] != "assistant":
            continue
        calls = parse_hermes(message["content"])
        answers = [m for m in messages[i + 1 : i + 1 + len(calls)] if m["role"] == "tool"]
        assert len(answers) == len(calls)
        well_formed += sum(call.code is not None for call in calls)
    return well_formed
