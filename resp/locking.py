"""Advisory locks so that two writers never share an output: one per run directory, one per
export directory, one per sqlite tracking store.

A lock is a `filelock.FileLock` (`flock` on Unix) on a small file next to what it guards
(`<parent>/.<name>.resp-lock`, so the guarded directory itself, often a DVC output, holds nothing
extra). The file names the pid that holds it; the kernel releases the lock when that process
ends, however it ends (`kill -9` included), so a stale lock file never blocks anyone.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

SUFFIX = ".resp-lock"


class LockError(ValueError):
    """Another process holds the lock."""


def lock_path(target: str | Path) -> Path:
    target = Path(target).absolute()
    return target.with_name(f".{target.name}{SUFFIX}")


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").split()
    except OSError:
        text = []
    return text[0] if text else "unknown"


def _name_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


@contextmanager
def exclusive(target: str | Path, what: str, fix: str, wait_s: float = 0.0, make_parent: bool = False):
    """Hold the lock of `target` for the block. With `wait_s` 0 a held lock fails at once with
    "<what> <target> is in use by pid N ...: <fix>"; otherwise it waits up to `wait_s` seconds.
    The folder of `target` is created with `make_parent` (an output's folder), else it must exist
    (a tracking store: a mistyped path stays an error, not a new folder)."""
    path = lock_path(target)
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise LockError(f"{what} {target}: folder {path.parent} does not exist: create it or fix the path")
    # flock only (no soft fallback); the holder's pid is written once the lock is ours
    lock = FileLock(path, timeout=wait_s, mode=0o644, thread_local=False, fallback_to_soft=False,
                    preserve_lock_file=True, on_acquired=_name_holder)
    try:
        lock.acquire(poll_interval=0.1)
    except Timeout:
        waited = f" (waited {wait_s:.0f} s)" if wait_s else ""
        raise LockError(f"{what} {target} is in use by pid {_holder(path)}{waited}: {fix}") from None
    try:
        yield
    finally:
        lock.release()


def run_dir_lock(run_dir: str | Path):
    """The lock of a `resp prune --out` directory: a second writer fails at once."""
    return exclusive(run_dir, "run directory", "wait for that run to finish, or prune into another --out",
                     make_parent=True)


def export_dir_lock(export_dir: str | Path):
    """The lock of an export directory: a second writer fails at once."""
    return exclusive(export_dir, "export directory", "wait for that export to finish, or export into another --out",
                     make_parent=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
