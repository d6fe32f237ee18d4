"""User-facing errors: the CLI prints each as one line (no traceback) and exits non-zero."""


class MathtoolError(Exception):
    """Base class for mistakes a user can fix; the message says what is wrong and how to fix it."""


class DatasetError(MathtoolError):
    """Unknown dataset, unreadable file, bad row, unreachable Hub."""


class ServerError(MathtoolError):
    """A model server that cannot be reached, started or used."""


class ContextExceeded(ServerError):
    """The server refused a prompt longer than the model's context (the chat path cannot count it first)."""


class ConfigError(MathtoolError):
    """Bad flag, config key or preset."""


class SandboxUnavailable(MathtoolError):
    """The kernel lacks what the sandbox needs for isolation."""
