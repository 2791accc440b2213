"""Compact export: physically sliced per-layer shapes (method step 10).

Per layer, the plan keeps:
- the alive KV groups (a group is alive while any of its query heads is kept): their k/v rows;
- per alive group, its kept query heads, and how many there are: groups may be uneven (2 heads
  on one KV head, 1 on the next), so nothing is padded and every stored weight is a kept one;
- the kept MLP channels: gate/up rows and down columns.
A layer with no kept heads keeps no q/k/v rows at all; one with no kept channels keeps no MLP rows.
The result is `RespCompactForCausalLM` (see `modeling_compact.py`), whose logits equal the masked
model's.
"""

from __future__ import annotations

import torch

from resp.adapters import adapter_for
from resp.checkpoints.modeling_compact import RespCompactConfig, RespCompactForCausalLM
from resp.checkpoints.slicing import ExportError, LayerPlan, build_from_state_dict, sliced_state_dict
from resp.masks import Mask
from resp.structures import Structures


def compact_plan(mask: Mask, s: Structures) -> list[LayerPlan]:
    """Per layer: alive KV groups, their kept query heads (group by group), kept channels."""
    plans = []
    kv_alive = mask.kv_alive(s)
    for i in range(s.num_layers):
        groups = torch.nonzero(kv_alive[i]).flatten().tolist()
        kept = {j: [h for h in range(j * s.n_rep, (j + 1) * s.n_rep) if mask.heads[i, h]] for j in groups}
        channels = torch.nonzero(mask.channels[i]).flatten().tolist()
        plans.append(LayerPlan(groups, [h for j in groups for h in kept[j]], [len(kept[j]) for j in groups], channels))
    return plans


def compact_config(base, plans: list[LayerPlan], s: Structures, compensated: tuple[str, ...] = ()) -> RespCompactConfig:
    """The compact model's config; `compensated` names the projections a mask's bias compensation
    gives a bias (o_proj, down_proj) even where the base model has none."""
    sliding_window = getattr(base, "sliding_window", None)
    layer_types = getattr(base, "layer_types", None) or [
        "sliding_attention" if sliding_window else "full_attention"] * s.num_layers
    return RespCompactConfig(
        vocab_size=base.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        head_dim=s.head_dim,
        layer_kv_group_sizes=[list(p.group_sizes) for p in plans],
        layer_intermediate_sizes=[len(p.channels) for p in plans],
        hidden_act=base.hidden_act,
        max_position_embeddings=base.max_position_embeddings,
        initializer_range=base.initializer_range,
        rms_norm_eps=base.rms_norm_eps,
        qk_norm=adapter_for(base).has_qk_norm,
        qkv_bias=s.qkv_bias,
        o_bias=s.o_bias or "o_proj" in compensated,
        mlp_bias=s.mlp_bias,
        down_bias="down_proj" in compensated,
        tie_word_embeddings=base.tie_word_embeddings,
        rope_parameters=dict(base.rope_parameters),
        layer_types=list(layer_types),
        sliding_window=sliding_window,
        attention_dropout=base.attention_dropout,
        base_model_type=base.model_type,
        pad_token_id=base.pad_token_id,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
    )


def compact_model(model, mask: Mask, s: Structures) -> tuple[RespCompactForCausalLM, list[LayerPlan]]:
    """The compact model (a new module; `model` is unchanged) and its per-layer plan."""
    plans = compact_plan(mask, s)
    if not any(p.query_heads for p in plans):
        raise ExportError("the mask prunes every attention head of every layer: a compact model needs one layer "
                          "with attention; protect a layer or lower the sparsity")
    state = sliced_state_dict(model, plans, s, mask.biases)
    config = compact_config(model.config, plans, s, tuple(mask.biases or ()))
    return build_from_state_dict(RespCompactForCausalLM, config, state, model), plans
