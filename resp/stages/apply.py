"""One pruning step's mask (method step 6): the units of lowest normalised score pruned up to a sparsity."""

from __future__ import annotations

from resp.config import Params
from resp.stages.common import load_mask, loaded_model


def apply(params: Params, base: dict, scores: str, mask: str | None, sparsity: float, out: str) -> str:
    """Prune `mask` by `scores` (normalised per importance.normalize) up to parameter sparsity `sparsity`."""
    from resp.importance import load_scores
    from resp.masks import prune_step

    s = loaded_model(params, base).masked.s
    unit_scores, _ = load_scores(scores)
    att, ch = unit_scores.normalized(s, params.importance.normalize)
    pruned = prune_step(att, ch, load_mask(mask, s), s, sparsity)
    return str(pruned.save(out, {"kind": "step", "scores": scores, "target": sparsity}))
