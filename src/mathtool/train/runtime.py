"""A background event loop for the agent loops of a training run.

TRL calls `rollout_func` synchronously, once per step. The agent loops are asyncio code; running them on
one long-lived loop in a thread keeps the sandbox's warm workers and the backend's connections alive
across steps instead of starting them again at every step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from mathtool.sandbox.base import Sandbox

log = logging.getLogger(__name__)
T = TypeVar("T")


class AgentRuntime:
    """An event loop thread that owns a `PythonSandbox`; `run()` executes a coroutine on it and waits."""

    def __init__(self, tool_timeout_s: float, tool_memory_mb: int, isolation: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="agent-loop", daemon=True)
        self._thread.start()
        self._sandbox_cm: Any = None
        try:
            self.sandbox: Sandbox = self.run(self._open_sandbox(tool_timeout_s, tool_memory_mb, isolation))
        except BaseException:
            self._stop_loop()
            raise

    async def _open_sandbox(self, timeout_s: float, memory_mb: int, isolation: bool) -> Sandbox:
        from mathtool.sandbox import PythonSandbox

        self._sandbox_cm = PythonSandbox(timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation)
        return await self._sandbox_cm.__aenter__()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the runtime's loop and return its result (blocking the calling thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self._sandbox_cm is not None:
            try:
                self.run(self._sandbox_cm.__aexit__(None, None, None))
            except Exception:
                log.warning("closing the sandbox failed", exc_info=True)
            self._sandbox_cm = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> AgentRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
