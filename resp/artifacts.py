"""Files the tool writes: atomic writes, sidecar manifests, digests, target names, the run layout.

Every artifact (trace set, scores, mask, metrics, summary, export) is written to a temporary
name beside its final one and renamed when complete, so a reader never sees half a file. A
payload file `x` may carry a manifest `x.json` saying what produced it; the manifest is
renamed into place after the payload is, so a manifest never describes a file that is not
there yet. A sparsity target is a float in code and `sparsity-0.30` / `"0.30"` on disk; the
conversions live here only.

    runs/{task}/traces/dense.jsonl           dense calibration traces (+ .json manifest)
    runs/{task}/traces/heldout.jsonl         dense traces on the eval split (decode-only NLL)
    runs/{task}/{method}/                    masks/, summary.json, traces/ (regenerations), steps/ (raw
                                             scores: CPU-dependent floats, outside DVC's hashes, .dvcignore)
    runs/{task}/traces/heal-{n}.jsonl        dense traces on the first n calibration prompts (healing data)
    runs/{task}/{method}/healed/sparsity-{t:.2f}/   healed models (resp heal)
    metrics/{task}/{method}.json, dense.json evaluations
    checkpoints/{task}/{method}/sparsity-{t:.2f}/{format}/   exports
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from resp.locking import pid_alive

MANIFEST_SUFFIX = ".json"


class ArtifactError(ValueError):
    pass


# ---------------------------------------------------------------- atomic writes

def tmp_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path to write; on success rename it to `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        _umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    try:  # read, not set: os.umask would change it for every thread for a moment
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _umask_mode(path: Path) -> None:
    """Files get the mode the umask gives (safetensors writes 0600 whatever the umask); folders keep theirs."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file() and not f.is_symlink()]
    mode = 0o666 & ~_umask()
    for f in files:
        os.chmod(f, mode)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj, sort_keys: bool = False, newline: bool = False) -> Path:
    """Indented JSON, atomically; `newline` ends the file with one (as the metrics files always have)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + ("\n" if newline else ""))


@contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary directory to fill; on success it replaces `path`, on error it is
    removed. An existing `path` is moved aside under a name of this process and deleted once the
    new one is in place. Temporary directories that earlier writers of `path` left when they were
    killed (their process is gone) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _umask_mode(tmp)
        tmp.chmod(0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def write_with_manifest(path: str | Path, write_payload: Callable[[Path], None], manifest: dict) -> Path:
    """Write a payload (by `write_payload(tmp)`) and its sidecar manifest `<path>.json`, payload
    first: a manifest on disk always describes a complete payload."""
    path = Path(path)
    with atomic_path(path) as tmp:
        write_payload(tmp)
    write_json(manifest_path(path), manifest, sort_keys=True)
    return path


def read_manifest(path: str | Path) -> dict:
    return json.loads(manifest_path(path).read_text())


# ---------------------------------------------------------------- digests

def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_digest(path: str | Path) -> str:
    """sha256 over a directory's files: relative names and contents, in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_digest(text: str) -> str:
    return bytes_digest(text.encode())


def json_digest(obj) -> str:
    """sha256 of a JSON-able value, key order ignored."""
    return text_digest(json.dumps(obj, sort_keys=True))


def content_digest(value):
    """What a path argument points at, as digests: a file and its manifest, or a directory;
    recurses through dicts and lists; None, numbers and booleans pass through."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): content_digest(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [content_digest(v) for v in value]
    path = Path(value)
    if path.is_dir():
        return dir_digest(path)
    if path.is_file():
        manifest = manifest_path(path)
        return [file_digest(path), file_digest(manifest) if manifest.is_file() else None]
    return f"missing:{value}"


def is_local(ref: str) -> bool:
    """A path rather than a hub id: hub ids are `name` or `owner/name`; anything on disk, starting
    with `.`, `/` or `~`, with more than one `/`, or naming a JSON file is a path."""
    return (Path(ref).exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1
            or ref.endswith((".json", ".jsonl")))


# ---------------------------------------------------------------- losses in tracked files

# Significant digits of the losses that files DVC hashes or git commits hold (run summaries, plots): the
# 6th-7th digit of a float32 loss depends on the CPU's float reduction order (thread count, SIMD width),
# and those files must come out byte-identical from `dvc repro` on another machine (a loss within that
# noise of a rounding boundary is rare: about 1 in 1000 at 4 digits). Full precision stays in untracked files.
LOSS_DIGITS = 4


def reported_loss(x: float) -> float:
    """`x` at LOSS_DIGITS significant digits."""
    return float(f"{x:.{LOSS_DIGITS}g}")


def reported_change(x: float, loss: float) -> float:
    """A change `x` of `loss` (e.g. drift) at the absolute precision reported_loss(loss) has: a change below
    it, all noise, is 0.0 (never -0.0, whose sign would be the noise's)."""
    if loss == 0 or not math.isfinite(loss):
        return reported_loss(x)
    return round(x, LOSS_DIGITS - 1 - math.floor(math.log10(abs(loss)))) + 0.0


# ---------------------------------------------------------------- sparsity targets

_TARGET_NAME = re.compile(r"^sparsity-(\d+\.\d+)$")


def target_key(target: float) -> str:
    """`0.3` -> `"0.30"`: how a target is keyed in JSON files."""
    return f"{target:.2f}"


def target_name(target: float) -> str:
    """`0.3` -> `sparsity-0.30`: the stem of a mask file or export directory."""
    return f"sparsity-{target_key(target)}"


def parse_target(text: str) -> float:
    """`"0.30"`, `sparsity-0.30` or `sparsity-0.30.safetensors` -> 0.3 (rounded to 6 decimals, so
    equal targets are equal keys)."""
    stem = text.removesuffix(".safetensors")
    match = _TARGET_NAME.match(stem)
    try:
        target = float(match.group(1) if match else stem)
    except ValueError:
        target = math.nan
    if not 0 <= target < 1:  # NaN too
        raise ArtifactError(f"{text!r} names no sparsity target: expected a fraction in [0, 1) such as 0.30, "
                            "or sparsity-0.30")
    return round(target, 6)


# ---------------------------------------------------------------- run layout

@dataclass(frozen=True)
class Layout:
    """Where the workflow's files live under `flow.data_dir` (the layout dvc.yaml's stages write too)."""

    root: Path

    def dense_traces(self, task: str) -> Path:
        return self.root / "runs" / task / "traces" / "dense.jsonl"

    def heldout_traces(self, task: str) -> Path:
        return self.root / "runs" / task / "traces" / "heldout.jsonl"

    def run_dir(self, task: str, method: str) -> Path:
        return self.root / "runs" / task / method

    def masks_dir(self, task: str, method: str) -> Path:
        return self.run_dir(task, method) / "masks"

    def heal_traces(self, task: str, num_prompts: int) -> Path:
        """The dense model's traces on the first `num_prompts` calibration prompts: healing data."""
        return self.root / "runs" / task / "traces" / f"heal-{num_prompts}.jsonl"

    def healed(self, task: str, method: str, target: float) -> Path:
        """A healed model directory (`resp heal`) of the mask of `method` at `target`."""
        return self.run_dir(task, method) / "healed" / target_name(target)

    def metrics(self, task: str, method: str) -> Path:
        return self.root / "metrics" / task / f"{method}.json"

    def dense_metrics(self, task: str) -> Path:
        return self.metrics(task, "dense")

    def method_exports(self, task: str, method: str) -> Path:
        """Holds `sparsity-{t:.2f}/{format}/` for every target."""
        return self.root / "checkpoints" / task / method

    def export_root(self, task: str, method: str, target: float) -> Path:
        """Holds one directory per export format."""
        return self.method_exports(task, method) / target_name(target)


def mask_file(masks_dir: str | Path, target: float) -> Path:
    return Path(masks_dir) / f"{target_name(target)}.safetensors"


def masks_in_dir(directory: str | Path) -> dict[float, Path]:
    """The masks `resp prune` wrote to `directory`, by target (`sparsity-0.20.safetensors`)."""
    directory = Path(directory)
    found = {parse_target(f.name): f for f in sorted(directory.glob("sparsity-*.safetensors"))
             if _TARGET_NAME.match(f.name.removesuffix(".safetensors"))}
    if not found:
        raise ArtifactError(f"no masks (sparsity-*.safetensors) in {directory}: run `resp prune` first")
    return found


def existing_exports(method_exports: Path, targets: list[float], formats: list[str]) -> dict[float, dict[str, Path]]:
    """The export directories under `method_exports` that exist, by target and format."""
    found: dict[float, dict[str, Path]] = {}
    for target in targets:
        dirs = {fmt: method_exports / target_name(target) / fmt for fmt in formats}
        present = {fmt: d for fmt, d in dirs.items() if d.is_dir()}
        if present:
            found[target] = present
    return found


# ---------------------------------------------------------------- outputs the tool may replace

RUN_ENTRIES = {"masks", "steps", "traces", "state", "summary.json"}


def check_run_dir(out: str | Path, task: str, method: str) -> None:
    """A non-empty `prune --out` must be a run directory of the same task and method (resumed or
    replaced); a folder of other files, or another method's run, is refused (their `steps/` and
    `traces/` would mix)."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise ArtifactError(f"--out {out} is not empty and is not a resp run directory (it holds {', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty directory")
    made = _run_of(out)
    if made is not None and made != (task, method):
        raise ArtifactError(f"--out {out} holds the {made[1]} run of {made[0]}, not {method} on {task}: its steps/ and "
                            "traces/ would mix; choose another --out")


def _run_of(out: Path) -> tuple[str, str] | None:
    """(task, method) that the run directory `out` records (summary, else any manifest), None if none does."""
    candidates = [out / "summary.json", *sorted((out / "masks").glob("*.json")), *sorted((out / "state").glob("*.json")),
                  *sorted((out / "steps").rglob("*.json")), *sorted((out / "traces").glob("*.json"))]
    for path in candidates:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and isinstance(record.get("task"), str) and isinstance(record.get("method"), str):
            return record["task"], record["method"]
    return None


def check_replaceable_json(out: str | Path, keys: tuple[str, ...], what: str, overwrite: bool = False) -> None:
    """An existing `--out` file is replaced only when it is a `what` (a JSON object with `keys`, as the
    command writes it) or with `overwrite`; any other file is refused before the work."""
    out = Path(out)
    if overwrite or not out.is_file():
        return
    try:
        record = json.loads(out.read_text())
        ours = isinstance(record, dict) and all(k in record for k in keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ours = False
    if not ours:
        raise ArtifactError(f"--out {out} exists and is not {what}: choose another --out, or pass --overwrite to "
                            "replace it")
