"""What the agent loop needs from a sandbox: sessions that run Python cells and say what came of them.

`PythonSandbox` (isolated, pre-forked workers) is the implementation; the loop and the engine are typed
against these protocols, as they are against `mathtool.llm.base.LLMBackend` for the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RunResult:
    stdout: str
    stderr: str  # tracebacks included, already trimmed of the sandbox's own frames
    ok: bool  # the code ran to the end without an uncaught exception
    timed_out: bool = False
    duration_s: float = 0.0
    error: str | None = None  # one line: "ZeroDivisionError: division by zero", "timed out after 5 s", ...


class Session(Protocol):
    """One trajectory's interpreter: variables persist across `run()` calls; closed on leaving `async with`."""

    async def __aenter__(self) -> Session: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def run(self, code: str) -> RunResult:
        """Run `code` as a notebook cell (a final bare expression is printed); never raises for the code's faults."""
        ...


class Sandbox(Protocol):
    """Where model-written code runs: a fresh session for each trajectory, isolated from every other."""

    def session(self) -> Session: ...
