"""Sticky routing over two real vLLM servers: every turn of a trajectory goes to the server of its first
turn, and a trajectory whose server fails moves to a healthy one and stays there; one server of two dying
mid-run does not stop the run."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import defaultdict
from collections.abc import Iterator

import pytest
from server_proxy import CuttableProxy

from mathtool.agent.chat_format import ChatFormat, chat_setup
from mathtool.agent.loop import AgentConfig
from mathtool.agent.parsers import MARKDOWN
from mathtool.data.problem import Problem
from mathtool.engine.runner import run_many
from mathtool.llm import OpenAIBackend, SamplingParams
from mathtool.llm.openai_backend import server_root
from mathtool.sandbox import PythonSandbox
from mathtool.serve import embedded_spec, running_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

BACKEND_LOG = "mathtool.llm.openai_backend"
TOOL_PROBLEM = Problem(
    "mul",
    "Use Python to compute 123456 * 654321. Write the code in a ```python block, then give the final "
    "answer in \\boxed{}.",
    "80779853376",
)


@pytest.fixture(scope="module")
def second_server(embedded_server) -> Iterator[str]:
    """A second embedded server beside the session's one (same model, token path only)."""
    with running_server(embedded_spec(port=0)) as url:
        yield url


def served_by(caplog: pytest.LogCaptureFixture) -> dict[object, list[str]]:
    """The server root of each request, per routing key, from the backend's debug log."""
    servers: dict[object, list[str]] = defaultdict(list)
    for record in caplog.records:
        if record.name == BACKEND_LOG and record.msg == "%s%s for %s":
            root, _, key = record.args
            servers[key].append(root)
    return servers


def test_sticky_routing_keeps_every_turn_of_a_trajectory_on_one_server(embedded_server, second_server,
                                                                         caplog) -> None:
    from transformers import AutoTokenizer

    chat = chat_setup(AutoTokenizer.from_pretrained(embedded_server.model_dir), None, None, MARKDOWN)
    config = AgentConfig(chat=chat, max_turns=3, max_response_length=300, context_length=4096,
                         sampling=SamplingParams(temperature=0.8, top_p=0.95))
    done = []

    async def run() -> None:
        urls = [embedded_server.base_url, second_server]
        async with await OpenAIBackend.connect(urls) as llm, PythonSandbox(timeout_s=5) as sandbox:
            assert llm.sticky and llm.supports_token_ids
            jobs = [(TOOL_PROBLEM, sample) for sample in range(12)]
            await run_many(jobs, llm, sandbox, config, 6, lambda traj, _: done.append(traj))

    with caplog.at_level(logging.DEBUG, logger=BACKEND_LOG):
        asyncio.run(run())
    servers = served_by(caplog)
    assert all(traj.error is None for traj in done)
    assert any(traj.num_turns > 1 for traj in done), "no trajectory took a second turn"
    for traj in done:
        roots = servers[(traj.problem_id, traj.sample)]
        assert len(roots) == traj.num_turns and len(set(roots)) == 1, (traj.sample, roots)
    assert {roots[0] for roots in servers.values() if roots} == {
        server_root(embedded_server.base_url), server_root(second_server)}


def test_a_trajectory_moves_off_a_failed_server_and_stays(embedded_server, caplog) -> None:
    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    live = server_root(embedded_server.base_url)

    async def run(sticky: bool) -> list[str]:
        async with OpenAIBackend([dead, embedded_server.base_url], embedded_server.model, supports_token_ids=True,
                                 backoff_s=0.05, sticky=sticky) as llm:
            view = llm.route(("p", sticky))
            ids = [1, 2, 3]
            for _ in range(3):
                ids += (await view.complete_tokens(ids, SamplingParams(0.0, max_tokens=4))).token_ids
                await asyncio.sleep(0.1)  # past the dead server's backoff: per-turn routing tries it again
            return [view.server or "", llm.route("other").server or ""]

    with caplog.at_level(logging.DEBUG, logger=BACKEND_LOG):
        sticky_server, unused = asyncio.run(run(sticky=True))
        asyncio.run(run(sticky=False))
    servers = served_by(caplog)
    assert servers[("p", True)] == [server_root(dead), live, live, live]
    assert servers[("p", False)].count(server_root(dead)) >= 2  # per-turn: back to the dead one after its backoff
    assert (sticky_server, unused) == (live, "")


def test_one_server_of_two_dying_mid_run_does_not_stop_it(embedded_server, caplog) -> None:
    """Two servers (the embedded one, and a relay in front of it that dies after the second trajectory): the
    dead one's trajectories move to the live one and every trajectory finishes."""
    proxy = CuttableProxy(int(server_root(embedded_server.base_url).rsplit(":", 1)[1]))
    proxy.start()
    config = AgentConfig(chat=ChatFormat(MARKDOWN), max_turns=1, max_response_length=48,
                         sampling=SamplingParams(temperature=0.8, top_p=0.95))
    done = []

    def on_done(traj, _) -> None:
        done.append(traj)
        if len(done) == 2:
            proxy.cut()

    async def run() -> None:
        async with OpenAIBackend([proxy.url, embedded_server.base_url], embedded_server.model) as llm, \
                PythonSandbox(timeout_s=5) as sandbox:
            await run_many([(TOOL_PROBLEM, sample) for sample in range(16)], llm, sandbox, config, 8, on_done)

    with caplog.at_level(logging.DEBUG, logger=BACKEND_LOG):
        asyncio.run(run())
    servers = served_by(caplog)
    assert len(done) == 16 and all(traj.error is None for traj in done), [traj.error for traj in done]
    assert any(roots[:1] == [server_root(proxy.url)] and roots[-1] != roots[0] for roots in servers.values()), \
        "no trajectory moved off the server that died"
