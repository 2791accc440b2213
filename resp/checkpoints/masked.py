"""Masked export: stock config and shapes, pruned structures zeroed (method step 10).

Loads anywhere the base model loads (any runtime, vLLM included); saves no memory or compute.
"""

from __future__ import annotations

import copy

from resp.masks import Mask, apply_mask
from resp.structures import Structures


def masked_model(model, mask: Mask, s: Structures):
    """A copy of `model` with the weights of pruned units zeroed (`model` is unchanged)."""
    masked = copy.deepcopy(model)
    apply_mask(masked, mask, s)
    return masked.eval()
