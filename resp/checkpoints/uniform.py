"""Uniform export: the mask rounded to one shape shared by every layer, in the stock config (method step 10).

Any runtime that loads the base family loads this export (no custom code), at the price of
moving some units: the stock config has one head count and one MLP width for all layers.

The shape (identical for all layers, protected ones included):
- KV heads G = the mean number of alive KV groups per layer, rounded half up, in [1, KV];
- query heads per KV head r = (mean kept query heads per layer) / G, rounded half up, in [1, n_rep];
- MLP width = the mean kept channels per layer rounded half up to a multiple of `channel_multiple`,
  in [min(channel_multiple, I), I].
Means run over all layers, so the parameter budget of the mask is spread evenly and the total
stays close to the mask's; protected layers are therefore cut to the same shape as the others
(the manifest reports, per layer, how many units were added back or dropped, and which layers
are protected).

Which units fill the shape, per layer: units the mask kept come first, then larger weight
magnitude (sum of squared weights of the unit; a KV group adds its k/v rows to its query heads'),
then lower index. So a layer that kept more than the shape drops its smallest kept units, and
one that kept fewer gets back its largest pruned units with their original weights: export from
the unmasked base model.
"""

from __future__ import annotations

import copy
import math

import torch

from resp.adapters import adapter_for
from resp.checkpoints.slicing import ExportError, LayerPlan, build_from_state_dict, sliced_state_dict
from resp.masks import Mask
from resp.structures import Structures


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def uniform_shape(mask: Mask, s: Structures, channel_multiple: int) -> dict:
    """The per-layer shape every layer gets, with the means it was rounded from."""
    mean_groups = float(mask.kv_alive(s).sum(1).float().mean())
    mean_heads = float(mask.heads.sum(1).float().mean())
    mean_channels = float(mask.channels.sum(1).float().mean())
    kv_heads = min(max(_round_half_up(mean_groups), 1), s.num_kv_heads)
    heads_per_kv = min(max(_round_half_up(mean_heads / kv_heads), 1), s.n_rep)
    width = _round_half_up(mean_channels / channel_multiple) * channel_multiple
    width = min(max(width, min(channel_multiple, s.intermediate_size)), s.intermediate_size)
    return {"mean_alive_kv_groups": mean_groups, "mean_kept_query_heads": mean_heads,
            "mean_kept_channels": mean_channels, "channel_multiple": channel_multiple,
            "num_key_value_heads": kv_heads, "num_attention_heads": kv_heads * heads_per_kv,
            "intermediate_size": width}


@torch.no_grad()
def magnitudes(model, s: Structures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of squared weights per query head [L, H], per KV head [L, KV] and per channel [L, I]."""
    adapter = adapter_for(model.config)
    hd, hidden = s.head_dim, s.hidden_size
    heads, kv, channels = [], [], []
    for layer in adapter.layers(model):
        q = adapter.q_proj(layer).weight.float().view(s.num_heads, hd, hidden).pow(2).sum((1, 2))
        o = adapter.o_proj(layer).weight.float().view(hidden, s.num_heads, hd).pow(2).sum((0, 2))
        k = adapter.k_proj(layer).weight.float().view(s.num_kv_heads, hd, hidden).pow(2).sum((1, 2))
        v = adapter.v_proj(layer).weight.float().view(s.num_kv_heads, hd, hidden).pow(2).sum((1, 2))
        gate = adapter.gate_proj(layer).weight.float().pow(2).sum(1)
        up = adapter.up_proj(layer).weight.float().pow(2).sum(1)
        down = adapter.down_proj(layer).weight.float().pow(2).sum(0)
        heads.append(q + o)
        kv.append(k + v)
        channels.append(gate + up + down)
    return torch.stack(heads).cpu(), torch.stack(kv).cpu(), torch.stack(channels).cpu()


def _best(candidates: list[int], kept: list[int], magnitude: list[float], k: int) -> list[int]:
    """The k best candidates (mask-kept first, then larger magnitude, then lower index), in index order."""
    ranked = sorted(candidates, key=lambda u: (-kept[u], -magnitude[u], u))
    return sorted(ranked[:k])


def uniform_plan(model, mask: Mask, s: Structures, shape: dict) -> list[LayerPlan]:
    head_mag, kv_mag, channel_mag = magnitudes(model, s)
    kv_heads = shape["num_key_value_heads"]
    per_kv = shape["num_attention_heads"] // kv_heads
    plans = []
    for i in range(s.num_layers):
        kept_heads = mask.heads[i].int().tolist()
        group_heads = [list(range(j * s.n_rep, (j + 1) * s.n_rep)) for j in range(s.num_kv_heads)]
        group_kept = [sum(kept_heads[h] for h in g) for g in group_heads]
        group_mag = [float(kv_mag[i, j] + head_mag[i, g].sum()) for j, g in enumerate(group_heads)]
        groups = _best(list(range(s.num_kv_heads)), group_kept, group_mag, kv_heads)
        query_heads = [h for j in groups
                       for h in _best(group_heads[j], kept_heads, head_mag[i].tolist(), per_kv)]
        channels = _best(list(range(s.intermediate_size)), mask.channels[i].int().tolist(),
                         channel_mag[i].tolist(), shape["intermediate_size"])
        plans.append(LayerPlan(groups, query_heads, [per_kv] * len(groups), channels))
    return plans


def layer_changes(plans: list[LayerPlan], mask: Mask, s: Structures) -> list[dict]:
    """Per layer: query heads and channels the uniform shape added back (pruned by the mask) or dropped (kept by it)."""
    changes = []
    for i, plan in enumerate(plans):
        heads = set(plan.query_heads)
        mask_heads = set(torch.nonzero(mask.heads[i]).flatten().tolist())
        channels = set(plan.channels)
        mask_channels = set(torch.nonzero(mask.channels[i]).flatten().tolist())
        changes.append({"protected": i in s.protected,
                        "heads_added": len(heads - mask_heads), "heads_dropped": len(mask_heads - heads),
                        "channels_added": len(channels - mask_channels),
                        "channels_dropped": len(mask_channels - channels)})
    return changes


def uniform_model(model, mask: Mask, s: Structures, channel_multiple: int):
    """A stock-family model (a new module; `model` is unchanged), its plan and its shape."""
    if mask.biases:
        raise ExportError("a uniform export changes which units are removed, so the mask's FLAP bias compensation "
                          "no longer matches: export it as masked or compact")
    shape = uniform_shape(mask, s, channel_multiple)
    plans = uniform_plan(model, mask, s, shape)
    config = copy.deepcopy(model.config)
    config.num_attention_heads = shape["num_attention_heads"]
    config.num_key_value_heads = shape["num_key_value_heads"]
    config.intermediate_size = shape["intermediate_size"]
    config.head_dim = s.head_dim  # families that derive head_dim from hidden/heads would change it otherwise
    state = sliced_state_dict(model, plans, s)
    return build_from_state_dict(type(model), config, state, model), plans, shape
