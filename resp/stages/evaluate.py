"""Evaluation of a run's masks (method step 10): accuracy, length, truncation and held-out NLL."""

from __future__ import annotations

from pathlib import Path

from resp.artifacts import parse_target
from resp.config import Params


def evaluate(params: Params, task: str, method: str, masks: dict[str, str], heldout: str | None, out: str,
             include_dense: bool) -> str:
    """Every mask of `masks` ({target key: mask file}) and, with `include_dense`, the dense model, to `out`."""
    from resp.evaluation import evaluate_masks

    return str(evaluate_masks(params, task, method, {parse_target(t): p for t, p in masks.items()}, heldout, out,
                              include_dense))


def evaluate_healed(params: Params, task: str, method: str, healed: str, out: str) -> str:
    """A healed model (`resp heal`) under the mask made for it, to `out`, keyed by its target like the mask it
    healed. Without held-out NLL: the held-out traces are the teacher's, and evaluation takes only traces of
    the model it evaluates."""
    import json

    from resp.evaluation import evaluate_masks
    from resp.healing import MANIFEST, healed_mask

    target = float(json.loads((Path(healed) / MANIFEST).read_text())["target"])
    student = params.model_copy(update={
        "model": params.model.model_copy(update={"name_or_path": str(healed), "revision": None}),
        "evaluation": params.evaluation.model_copy(update={"nll_traces": 0})})
    return str(evaluate_masks(student, task, method, {target: healed_mask(healed)}, None, out, include_dense=False))
