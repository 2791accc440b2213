"""Restoring a recorded file that is missing here from DVC (cache, else the default remote), kept only if
it matches the sha256 the registry recorded."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from resp.artifacts import atomic_path, file_digest
from resp.registry.store import RegistryError

log = logging.getLogger("resp.registry")


def _dvc_command() -> str:
    """The dvc installed with this Python, else the one on PATH."""
    found = shutil.which("dvc", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise RegistryError("the dvc command is not installed: `pip install dvc` (with your remote's extra, e.g. "
                            "'dvc[s3]'), then run `resp audit --fetch` again")
    return found


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_dvc_command(), *args], cwd=project, capture_output=True, text=True)


def _dvc_project(path: Path) -> Path | None:
    """The nearest folder above `path` holding a `.dvc` folder."""
    return next((folder for folder in path.absolute().parents if (folder / ".dvc").is_dir()), None)


def _dvc_reason(result: subprocess.CompletedProcess) -> str:
    """DVC's first error line, without its prefixes."""
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    text = (errors or lines or [f"dvc exited with status {result.returncode}"])[0]
    return text.removeprefix("ERROR: ").removeprefix("unexpected error - ")[:200]


def _fetch_error(project: Path, what: str, path: Path, name: str, result: subprocess.CompletedProcess) -> RegistryError:
    reason = _dvc_reason(result)
    if reason == repr([name]):   # how `dvc get` says that no output of this checkout holds the file
        return RegistryError(f"{what} {path} is not tracked by DVC in {project} (no output of its dvc.yaml or .dvc files "
                             "holds it in this checkout): check out the commit whose dvc.lock recorded it, or re-run "
                             "the stage that writes it (`dvc repro`)")
    remote = _dvc(project, "remote", "default")
    remote_name = remote.stdout.strip() if remote.returncode == 0 else ""
    if not remote_name:
        return RegistryError(f"{what} {path} is not in the DVC cache of {project} and no default DVC remote is configured "
                             f"({reason}): add the remote its producer pushes to (`dvc remote add -d storage URL`), "
                             "then run `resp audit --fetch` again")
    return RegistryError(f"{what} {path} cannot be fetched from DVC remote {remote_name!r} ({reason}): run `dvc push` on the "
                         "machine that produced it (or fix the remote's URL and credentials), then `resp audit --fetch` again")


def fetch_file(path: str | Path, sha256: str, what: str = "file") -> Path:
    """Restore the missing file `path` from the DVC cache or default remote of the project holding
    it, and keep it only if its sha256 is `sha256`.

    `dvc get` writes only the file it is told to: a `dvc pull`/`dvc checkout` of one file of a
    directory output that fails (object missing) deletes the whole directory, edited files
    included. The fetched copy is verified before it is renamed into place.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise RegistryError(f"{what} {path} exists: only a missing file is fetched, an existing one is never replaced")
    project = _dvc_project(path)
    if project is None:
        raise RegistryError(f"{what} {path} is missing and no DVC project holds it (no .dvc folder above it): run "
                            "`resp audit --fetch` in the clone of the project that produced it")
    missing_dirs = [folder for folder in path.absolute().parents if not folder.exists()]  # nearest first
    try:
        with atomic_path(path) as tmp:
            name = path.absolute().relative_to(project).as_posix()
            result = _dvc(project, "get", str(project), name, "-o", str(tmp))
            if result.returncode != 0 or not tmp.is_file():
                raise _fetch_error(project, what, path, name, result)
            digest = file_digest(tmp)
            if digest != sha256:
                raise RegistryError(f"{what} {path} fetched from DVC does not match the registry (sha256 {digest[:12]} != "
                                    f"recorded {sha256[:12]}); nothing was written: check out the dvc.lock that recorded "
                                    "the registered file (`git log -- dvc.lock`) and fetch again, or `dvc push` it from "
                                    "the machine that produced it")
            if os.path.lexists(path):
                raise RegistryError(f"{what} {path} appeared while it was fetched: it was kept as it is; audit again")
    except BaseException:
        for folder in missing_dirs:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    log.info("restored %s %s from DVC (sha256 %s verified)", what, path, sha256[:12])
    return path


def _fetch_missing(entries: list[dict]) -> set[str]:
    """Restore every recorded local file that is missing (see `fetch_file`); the paths restored."""
    restored = set()
    for e in entries:
        if e["path"] is not None and not os.path.lexists(e["path"]):
            fetch_file(e["path"], e["sha256"], e["role"].replace("_", " "))
            restored.add(e["path"])
    return restored
