"""Where mathtool keeps its files ($MATHTOOL_HOME, default ~/.cache/mathtool), and writing files safely.

Every place mathtool writes (a run directory, a report, the dataset registry) is checked with
`check_writable` before slow work starts, its files are written whole or not at all (`atomic_write`), and
an operating-system error while writing becomes one ConfigError line that names the path and the fix
(`write_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from mathtool.errors import ConfigError

OUTPUT_FIX = "pick another --output"  # the fix for an --output that cannot take the run


def mathtool_home() -> Path:
    return Path(os.environ.get("MATHTOOL_HOME") or Path.home() / ".cache" / "mathtool").expanduser()


def _reason(error: OSError) -> str:
    reasons = {
        errno.EROFS: "it is on a read-only filesystem",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is used up",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.EEXIST: "a part of the path is a file, not a directory",  # mkdir where a file stands
    }
    return reasons.get(error.errno, error.strerror or str(error))


@contextlib.contextmanager
def write_errors(path: Path, fix: str) -> Iterator[None]:
    """Turn an OSError raised while writing under `path` into one line: what, why, and `fix`."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {_reason(e)}; {fix}") from None


def check_writable(directory: Path, fix: str) -> None:
    """Prove that files can be created in `directory` (or, where it does not exist yet, in its nearest existing
    parent) by creating and deleting one, before any slow work; raise one ConfigError line if not. Nothing is
    left behind: a directory that does not exist is not created."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        which = "it" if existing == directory else str(existing)
        raise ConfigError(f"cannot write {directory}: {which} is a file, not a directory; {fix}")
    with write_errors(directory, fix):
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".mathtool-write-check-")
        os.close(fd)
        os.unlink(probe)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temp file in the same directory (`write` fills it), then rename: readers see the
    old file or the new one, never half of one. The directory is created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # created by `write`, with the umask's mode
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
