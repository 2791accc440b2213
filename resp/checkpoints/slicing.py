"""Cutting a model's tensors to a per-layer plan of kept units (shared by the compact and uniform exports).

A `LayerPlan` lists, in stored order, the original indices of the KV heads, query heads and MLP
channels an export keeps in one layer, and how many of the query heads each KV head serves. `sliced_state_dict` cuts q/k/v rows,
o columns, gate/up rows and down columns accordingly; everything else is copied unchanged.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights

from resp.adapters import adapter_for
from resp.structures import Structures


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class LayerPlan:
    """Which units of one layer an export stores, in stored order (original indices).

    `query_heads` is grouped by KV head: the first `group_sizes[0]` serve `kv_heads[0]`, and so on.
    """
    kv_heads: list[int]
    query_heads: list[int]
    group_sizes: list[int]
    channels: list[int]

    def summary(self) -> dict:
        return {"kv_heads": len(self.kv_heads), "query_heads": len(self.query_heads),
                "group_sizes": list(self.group_sizes), "intermediate_size": len(self.channels)}


def _head_rows(heads: list[int], head_dim: int, device) -> torch.Tensor:
    """Row indices of the `head_dim`-row blocks of `heads`, in order."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long, device=device)


@torch.no_grad()
def sliced_state_dict(model, plans: list[LayerPlan], s: Structures,
                      biases: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with q/k/v/o and MLP tensors of every layer cut to `plans`, plus a
    mask's bias compensation ({"o_proj"|"down_proj": [L, hidden]}) added to those output biases
    (which become the compensation alone where the model has none)."""
    adapter = adapter_for(model.config)
    names = {module: name for name, module in model.named_modules()}
    state = dict(model.state_dict())
    hd = s.head_dim
    for i, (layer, plan) in enumerate(zip(adapter.layers(model), plans)):
        device = adapter.q_proj(layer).weight.device
        q_rows = _head_rows(plan.query_heads, hd, device)
        kv_rows = _head_rows(plan.kv_heads, hd, device)
        channels = torch.tensor(plan.channels, dtype=torch.long, device=device)
        cuts = [  # (module, dim of weight to cut, row/column index)
            (adapter.q_proj(layer), 0, q_rows),
            (adapter.k_proj(layer), 0, kv_rows),
            (adapter.v_proj(layer), 0, kv_rows),
            (adapter.o_proj(layer), 1, q_rows),
            (adapter.gate_proj(layer), 0, channels),
            (adapter.up_proj(layer), 0, channels),
            (adapter.down_proj(layer), 1, channels),
        ]
        for module, dim, index in cuts:  # index_select makes new tensors: the source stays as it is
            state[f"{names[module]}.weight"] = module.weight.index_select(dim, index)
            if module.bias is not None and dim == 0:  # an output bias follows the rows; o/down biases stay whole
                state[f"{names[module]}.bias"] = module.bias.index_select(0, index)
        for name, deltas in (biases or {}).items():   # a model without the bias gets one (the config says so)
            module = getattr(adapter, name)(layer)
            delta = deltas[i].to(module.weight.dtype).to(device)
            state[f"{names[module]}.bias"] = delta if module.bias is None else module.bias + delta
    return state


def build_from_state_dict(model_class, config, state: dict[str, torch.Tensor], like) -> torch.nn.Module:
    """Instantiate `model_class(config)` without random init and load `state` (exact keys) into it.

    Tensors of `state` are used as they are: those copied unchanged from `like` stay shared with it.
    """
    config.dtype = like.dtype
    with init_empty_weights(), warnings.catch_warnings():  # parameters on the meta device; buffers are real
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # emptied layers: nothing to init
        model = model_class(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(like.generation_config)
    return model.to(like.device).eval()
