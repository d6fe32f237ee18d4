"""PythonSandbox: model-written Python in isolated, pre-forked workers (namespaces, rlimits, timeouts); the
`Sandbox` and `Session` protocols the agent loop is typed against (`base`)."""

from mathtool.sandbox.base import RunResult, Sandbox, Session
from mathtool.sandbox.sandbox import PythonSandbox, PythonSession

__all__ = ["PythonSandbox", "PythonSession", "RunResult", "Sandbox", "Session"]
