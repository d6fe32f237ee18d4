"""What the host, the zygote and the workers agree on: limits, messages, and the frame format.

Frames between the host and a worker are a 4-byte big-endian length and a UTF-8 JSON body (never
pickle: the worker runs untrusted code and may send anything back). A worker says {"ready": true} once
it is confined; then, per call: host {"code": str}, worker {"ok": bool, "error": str|null}. A worker's
stdout and stderr are not framed: they are memfds the host also holds, read after the call (even after a
kill). A worker that cannot go on after a call writes WORKER_FAILED and the reason to its stderr, and exits.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

HEADER = struct.Struct("!I")
MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_REPLY_BYTES = 1024 * 1024
MAX_ERROR_CHARS = 1000  # of the error line in a reply (an exception's message can be any length)

# Zygote <-> host messages (SOCK_SEQPACKET, one per datagram).
NEED_ID_MAPS = b"U"  # zygote: "I unshared my user namespace; write my uid/gid maps"
ID_MAPS_DONE = b"M"  # host: b"M", + b"65534" when it could also map SANDBOX_UID
ZYGOTE_READY = b"R"  # zygote: "the root filesystem is built and numpy/sympy are imported"
ZYGOTE_FAILED = b"E"  # zygote: b"E" + an explanation, then it exits
ISOLATION_FAILED = "isolation failed: "  # how that explanation starts when namespaces or mounts failed
SPAWN = b"S"  # host: b"S" + a decimal count of workers to fork
WORKER = b"W"  # zygote: a new worker, with fds [socket, stdout, stderr, pidfd]

WORKER_FAILED = "[sandbox] the worker failed after the code ran: "

SANDBOX_UID = 65534  # "nobody": what the workers run as when the host can map a second id


@dataclass(frozen=True)
class Limits:
    """Limits of each call. The host enforces the wall-clock timeout; the rest are the worker's rlimits."""

    timeout_s: float = 5.0
    memory_mb: int = 1024  # address space of the worker process (RLIMIT_AS)
    max_output_bytes: int = 65536  # per stream; the rest is dropped with a marker
    max_processes: int = 64  # processes and threads of one worker (RLIMIT_NPROC, isolated mode only)
    max_open_files: int = 256
    scratch_mb: int = 64  # the private /tmp tmpfs, and the largest file (or output stream) it may write


@dataclass(frozen=True)
class ZygoteConfig:
    limits: Limits
    isolation: bool
    host_pid: int
    read_only_paths: list[str]  # host paths the workers see (read-only) at the same place
    scratch_root: str | None = None  # without isolation: the host directory holding each worker's scratch dir

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ZygoteConfig:
        data = json.loads(text)
        return cls(**{**data, "limits": Limits(**data["limits"])})


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return HEADER.pack(len(body)) + body


def take_frame(buffer: bytearray, max_bytes: int) -> bytes | None:
    """Remove the first whole frame from `buffer` and return its body; None until one has arrived."""
    if len(buffer) < HEADER.size:
        return None
    (size,) = HEADER.unpack_from(buffer)
    if size > max_bytes:
        raise ValueError(f"a frame of {size} bytes")
    end = HEADER.size + size
    if len(buffer) < end:
        return None
    body = bytes(buffer[HEADER.size : end])
    del buffer[:end]
    return body
