"""The zygote's view of the machine: a new root holding only what Python needs, read-only.

Inside: the system directories (/usr and its /bin, /lib symlinks); the Python installation and its
virtual environment at their host paths (as named and as resolved, where symlinks make them differ);
a handful of /etc files and /dev nodes; and an empty /tmp where each worker mounts its own private
tmpfs. Nothing else of the host (home directories, /work, /etc/shadow, /proc) exists there.
"""

from __future__ import annotations

import os

from mathtool.sandbox import linux

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/fonts")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
MOUNTPOINTS = ("/tmp", "/mnt", "/media", "/srv", "/opt", "/var/tmp")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
READ_ONLY = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID


def build_root(python_paths: list[str]) -> None:
    """Pivot the current mount namespace into a fresh read-only root (call after unshare(CLONE_NEWNS))."""
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    extra = [p for p in python_paths if not _under(p, SYSTEM_DIRS)]
    root = _pick_mountpoint(extra)
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=8m,mode=0755")
    for path in SYSTEM_DIRS:
        _replicate(path, root)
    for path in [*extra, *ETC_FILES]:
        if os.path.exists(path):
            _bind(path, root, READ_ONLY | linux.MS_NODEV)
    for path in DEVICES:
        _bind(path, root, None)
    _write(root + "/etc/passwd", PASSWD)
    _write(root + "/etc/group", GROUP)
    os.makedirs(root + "/tmp", exist_ok=True)
    os.chmod(root + "/tmp", 0o1777)
    os.symlink("/tmp", root + "/dev/shm")
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount(".")
    os.chdir("/")
    linux.mount("none", "/", None, READ_ONLY | linux.MS_NODEV)


def _under(path: str, parents: tuple[str, ...] | list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


def _pick_mountpoint(sources: list[str]) -> str:
    for candidate in MOUNTPOINTS:
        if os.path.isdir(candidate) and not os.path.islink(candidate):
            if not any(_under(source, [candidate]) for source in sources):
                return candidate
    raise OSError(f"no free directory among {MOUNTPOINTS} to build the sandbox root on")


def _replicate(path: str, root: str) -> None:
    """A symlink is copied as a symlink (/bin -> usr/bin); a directory is bound read-only."""
    if os.path.islink(path):
        os.symlink(os.readlink(path), root + path)
    elif os.path.isdir(path):
        _bind(path, root, READ_ONLY | linux.MS_NODEV)


def _bind(source: str, root: str, remount_flags: int | None) -> None:
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _write(target, "")
    linux.mount(source, target, None, linux.MS_BIND)
    if remount_flags is not None:
        linux.mount("none", target, None, remount_flags)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
