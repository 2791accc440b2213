"""Advisory locks so that two writers never share an output: one per run directory, one per
sqlite tracking store.

A lock is an `flock` on a small file next to what it guards (`<parent>/.<name>.resp-lock`, so the
guarded directory itself, often a DVC output, holds nothing extra). The file names the pid that
holds it; the kernel releases the lock when that process ends, however it ends (`kill -9`
included), so a stale lock file never blocks anyone.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

SUFFIX = ".resp-lock"


class LockError(ValueError):
    """Another process holds the lock."""


def lock_path(target: str | Path) -> Path:
    target = Path(target).absolute()
    return target.with_name(f".{target.name}{SUFFIX}")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    return text[0] if text else "unknown"


@contextmanager
def exclusive(target: str | Path, what: str, fix: str, wait_s: float = 0.0):
    """Hold the lock of `target` for the block. With `wait_s` 0 a held lock fails at once with
    "<what> <target> is in use by pid N ...: <fix>"; otherwise it waits up to `wait_s` seconds."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait_s:.0f} s)" if wait_s else ""
                    raise LockError(f"{what} {target} is in use by pid {_holder(fd)}{waited}: {fix}") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def run_dir_lock(run_dir: str | Path):
    """The lock of a `resp prune --out` directory: a second writer fails at once."""
    return exclusive(run_dir, "run directory", "wait for that run to finish, or prune into another --out")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
