"""PythonSandbox: model-written Python in isolated, pre-forked workers (namespaces, rlimits, timeouts)."""

from mathtool.sandbox.sandbox import PythonSandbox, PythonSession, RunResult

__all__ = ["PythonSandbox", "PythonSession", "RunResult"]
