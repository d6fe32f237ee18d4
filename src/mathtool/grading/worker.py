"""The grader worker process: `main()` with argv `FD [MODULE[:FUNCTION] ...]` (started by pool.KillablePool).

It imports the modules (and calls the functions, to warm up), says it is ready on the socket FD, then
runs pickled `(function, args)` jobs one at a time until the socket closes. A plain subprocess, not
multiprocessing's spawn, so the parent's `__main__` is never re-imported (a script without an
`if __name__ == "__main__"` guard still works).
"""

from __future__ import annotations

import importlib
import signal
import sys
from multiprocessing.connection import Connection

READY = "ready"


def serve(conn: Connection, preload: list[str]) -> None:
    """Import `preload` (calling any `:function`), say ready, then answer jobs: (True, result) or (False, error)."""
    for entry in preload:
        module, _, function = entry.partition(":")
        loaded = importlib.import_module(module)
        if function:
            getattr(loaded, function)()
    if not _send(conn, READY):
        return
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = (True, fn(*args))
        except Exception as exc:  # the job's failure goes back to the caller
            reply = (False, f"{type(exc).__name__}: {str(exc)[:500]}")
        if not _send(conn, reply):
            return


def _send(conn: Connection, message: object) -> bool:
    """False if the parent is gone (it exited, or gave up on a start-up still warming up in the background)."""
    try:
        conn.send(message)
    except OSError:
        return False
    return True


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then ends us
    serve(Connection(int(sys.argv[1])), sys.argv[2:])
