"""Masked export: stock config and shapes, pruned structures zeroed (method step 10).

Loads anywhere the base model loads (any runtime, vLLM included); saves no memory or compute.
"""

from __future__ import annotations

import copy

from resp.checkpoints.slicing import ExportError
from resp.masks import Mask, apply_mask
from resp.structures import Structures


def masked_model(model, mask: Mask, s: Structures):
    """A copy of `model` with the weights of pruned units zeroed (`model` is unchanged)."""
    missing = [name for name, has in (("o_proj", s.o_bias), ("down_proj", s.mlp_bias)) if name in (mask.biases or {})
               and not has]
    if missing:
        raise ExportError(f"the mask carries FLAP bias compensation for {'/'.join(missing)}, which this model's stock "
                          f"config has no bias for: export it with --format compact (its config carries the biases)")
    masked = copy.deepcopy(model)
    apply_mask(masked, mask, s)
    return masked.eval()
