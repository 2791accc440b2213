"""A healed model after healing: exported and evaluated under the mask made for it (`resp heal` writes
both the model and that mask), the stages the flow runs before registering it."""

from __future__ import annotations

import json
from pathlib import Path

from resp.config import Params
from resp.healing import MANIFEST, healed_mask
from resp.stages.export import export_masks


def export_healed(params: Params, healed: str, formats: list[str], out_root: str) -> dict[str, str]:
    """A healed model (`resp heal`) under the mask made for it, in every format, to `<out_root>/<format>/`."""
    jobs = [(healed_mask(healed), fmt, Path(out_root) / fmt) for fmt in formats]
    return {fmt: str(path) for fmt, path in zip(formats, export_masks(params, jobs, model=healed))}


def evaluate_healed(params: Params, task: str, method: str, healed: str, out: str) -> str:
    """A healed model (`resp heal`) under the mask made for it, to `out`, keyed by its target like the mask it
    healed. Without held-out NLL: the held-out traces are the teacher's, and evaluation takes only traces of
    the model it evaluates."""
    from resp.evaluation import evaluate_masks

    target = float(json.loads((Path(healed) / MANIFEST).read_text())["target"])
    student = params.model_copy(update={
        "model": params.model.model_copy(update={"name_or_path": str(healed), "revision": None}),
        "evaluation": params.evaluation.model_copy(update={"nll_traces": 0})})
    return str(evaluate_masks(student, task, method, {target: healed_mask(healed)}, None, out, include_dense=False))
