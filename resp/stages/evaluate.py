"""Evaluation of a run's masks (method step 10): accuracy, length, truncation and held-out NLL."""

from __future__ import annotations

from resp.artifacts import parse_target
from resp.config import Params


def evaluate(params: Params, task: str, method: str, masks: dict[str, str], heldout: str | None, out: str,
             include_dense: bool) -> str:
    """Every mask of `masks` ({target key: mask file}) and, with `include_dense`, the dense model, to `out`."""
    from resp.evaluation import evaluate_masks

    return str(evaluate_masks(params, task, method, {parse_target(t): p for t, p in masks.items()}, heldout, out,
                              include_dense))
