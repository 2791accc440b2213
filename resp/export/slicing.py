"""Cutting a model's tensors to a per-layer plan of kept units (shared by the compact and uniform exports).

A `LayerPlan` lists, in stored order, the original indices of the KV heads, query heads (or
padding slots) and MLP channels an export keeps in one layer. `sliced_state_dict` cuts q/k/v rows,
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
    """Which units of one layer an export stores, in stored order (original indices)."""
    kv_heads: list[int]
    query_heads: list[int | None]   # None = padding head: zero q rows, zero o columns
    channels: list[int]

    @property
    def padding_heads(self) -> int:
        return sum(h is None for h in self.query_heads)

    def summary(self) -> dict:
        return {"kv_heads": len(self.kv_heads), "query_heads": len(self.query_heads),
                "padding_heads": self.padding_heads, "intermediate_size": len(self.channels)}


def _head_index(heads: list[int | None], head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of `heads` blocks (padding reads block 0) and a bool marking padding rows."""
    rows = torch.tensor([(0 if h is None else h) * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long, device=device)
    padding = torch.tensor([h is None for h in heads for _ in range(head_dim)], dtype=torch.bool, device=device)
    return rows, padding


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
    out = tensor.index_select(dim, index)  # a new tensor: the source stays as it is
    if padding is not None and padding.any():
        out.index_fill_(dim, torch.nonzero(padding).flatten(), 0)
    return out


@torch.no_grad()
def sliced_state_dict(model, plans: list[LayerPlan], s: Structures) -> dict[str, torch.Tensor]:
    """The model's state dict with q/k/v/o and MLP tensors of every layer cut to `plans`."""
    adapter = adapter_for(model.config)
    names = {module: name for name, module in model.named_modules()}
    state = dict(model.state_dict())
    hd = s.head_dim
    for layer, plan in zip(adapter.layers(model), plans):
        device = adapter.q_proj(layer).weight.device
        q_rows, q_padding = _head_index(plan.query_heads, hd, device)
        kv_rows, _ = _head_index(plan.kv_heads, hd, device)
        channels = torch.tensor(plan.channels, dtype=torch.long, device=device)
        cuts = [  # (module, dim of weight to cut, row/column index, padding rows zeroed)
            (adapter.q_proj(layer), 0, q_rows, q_padding),
            (adapter.k_proj(layer), 0, kv_rows, None),
            (adapter.v_proj(layer), 0, kv_rows, None),
            (adapter.o_proj(layer), 1, q_rows, q_padding),
            (adapter.gate_proj(layer), 0, channels, None),
            (adapter.up_proj(layer), 0, channels, None),
            (adapter.down_proj(layer), 1, channels, None),
        ]
        for module, dim, index, padding in cuts:
            state[f"{names[module]}.weight"] = _take(module.weight, dim, index, padding)
            if module.bias is not None and dim == 0:  # an output bias follows the rows; o/down biases stay whole
                state[f"{names[module]}.bias"] = _take(module.bias, 0, index, padding)
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
