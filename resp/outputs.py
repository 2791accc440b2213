"""Checks on output paths before any work starts: the path's shape (no file where a directory
must be, no directory where a file must be) and that its first existing folder is writable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written."""


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(path: str | Path, kind: str = "file", option: str = "--out") -> Path:
    """Refuse `path` now rather than after the work: `kind` is "file" or "dir"."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise OutputError(f"{option} {path} is a directory, not a file: give a file path")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a directory: give a directory path")
    anchor = _first_existing(path if kind == "dir" else path.parent)
    if not anchor.is_dir():
        raise OutputError(f"{option} {path}: {anchor} is a file, not a directory: choose another {option}")
    try:
        if not os.access(anchor, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
        with tempfile.TemporaryFile(dir=anchor, prefix=".resp-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{option} {path}: {anchor} is not writable ({e.strerror}): choose a writable {option} "
                          "or fix its permissions") from None
    return path
