"""mathtool: math-reasoning agents that use a Python interpreter as a tool."""

__version__ = "0.1.0"
