"""Where the workflow's files live under `flow.data_dir` (the layout dvc.yaml's stages write too).

    runs/{task}/traces/dense.jsonl           dense calibration traces (+ .json manifest)
    runs/{task}/traces/heldout.jsonl         dense traces on the eval split (decode-only NLL)
    runs/{task}/{method}/                    masks/, summary.json, traces/ (regenerations), state/
    metrics/{task}/{method}.json, dense.json evaluations
    checkpoints/{task}/{method}/sparsity-{t:.2f}/{format}/   exports

Plain path arithmetic: no Prefect import, so the CLI can use it without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    def dense_traces(self, task: str) -> Path:
        return self.root / "runs" / task / "traces" / "dense.jsonl"

    def heldout_traces(self, task: str) -> Path:
        return self.root / "runs" / task / "traces" / "heldout.jsonl"

    def run_dir(self, task: str, method: str) -> Path:
        return self.root / "runs" / task / method

    def masks_dir(self, task: str, method: str) -> Path:
        return self.run_dir(task, method) / "masks"

    def metrics(self, task: str, method: str) -> Path:
        return self.root / "metrics" / task / f"{method}.json"

    def dense_metrics(self, task: str) -> Path:
        return self.metrics(task, "dense")

    def method_exports(self, task: str, method: str) -> Path:
        """Holds `sparsity-{t:.2f}/{format}/` for every target."""
        return self.root / "checkpoints" / task / method

    def export_root(self, task: str, method: str, target: float) -> Path:
        """Holds one directory per export format."""
        return self.method_exports(task, method) / f"sparsity-{target:.2f}"


def existing_exports(method_exports: Path, targets: list[float], formats: list[str]) -> dict[float, dict[str, Path]]:
    """The export directories under `method_exports` that exist, by target and format."""
    found: dict[float, dict[str, Path]] = {}
    for target in targets:
        dirs = {fmt: method_exports / f"sparsity-{target:.2f}" / fmt for fmt in formats}
        present = {fmt: d for fmt, d in dirs.items() if d.is_dir()}
        if present:
            found[target] = present
    return found
