"""Structured masks: which query heads and MLP channels survive, per layer (method steps 5-7, 10).

A `Mask` holds `heads` [L, H] and `channels` [L, I] booleans (True = kept). KV groups are
derived: a group is alive while any of its query heads is. `prune_step` ranks all unpruned
units of all unprotected layers together and prunes the lowest until a parameter-sparsity
target is met, so masks are nested by construction. Saved as safetensors plus a JSON
manifest naming the model and shapes it was made for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from resp.adapters import adapter_for
from resp.artifacts import manifest_path, read_manifest, write_with_manifest
from resp.structures import Structures


class MaskError(ValueError):
    pass


@dataclass
class Mask:
    heads: torch.Tensor      # bool [L, H], True = kept
    channels: torch.Tensor   # bool [L, I], True = kept
    # FLAP's bias compensation, added to existing output biases when the mask is applied:
    # {"o_proj": float32 [L, hidden], "down_proj": float32 [L, hidden]}; None for every other method.
    biases: dict[str, torch.Tensor] | None = None

    @classmethod
    def dense(cls, s: Structures) -> "Mask":
        return cls(torch.ones(s.num_layers, s.num_heads, dtype=torch.bool),
                   torch.ones(s.num_layers, s.intermediate_size, dtype=torch.bool))

    def clone(self) -> "Mask":
        biases = {k: v.clone() for k, v in self.biases.items()} if self.biases else None
        return Mask(self.heads.clone(), self.channels.clone(), biases)

    def kv_alive(self, s: Structures) -> torch.Tensor:
        """bool [L, KV]: a KV group is alive while any of its query heads is kept."""
        return self.heads.view(s.num_layers, s.num_kv_heads, s.n_rep).any(-1)

    def attention_units(self, s: Structures) -> torch.Tensor:
        """bool [L, A] over the attention units of `s.attention_unit`."""
        return self.heads if s.attention_unit == "query_head" else self.kv_alive(s)

    def contains(self, other: "Mask") -> bool:
        """True if every unit kept by `other` is kept here (self is the less sparse mask)."""
        return bool((other.heads <= self.heads).all() and (other.channels <= self.channels).all())

    def pruned_params(self, s: Structures) -> int:
        heads = int((~self.heads).sum()) * s.head_params
        kv = int((~self.kv_alive(s)).sum()) * s.kv_params
        channels = int((~self.channels).sum()) * s.channel_params
        return heads + kv + channels

    def sparsity(self, s: Structures) -> float:
        """Parameter sparsity: pruned decoder-layer weights / all decoder-layer parameters."""
        return self.pruned_params(s) / s.decoder_params

    def structure_ratio(self, s: Structures) -> float:
        """Fraction of all attention units and channels pruned (the paper's structure count)."""
        total = s.num_layers * (s.attention_units + s.intermediate_size)
        pruned = int((~self.attention_units(s)).sum()) + int((~self.channels).sum())
        return pruned / total

    def composition(self, s: Structures) -> dict:
        """What the mask removed: query heads, dead KV groups (every query head gone) and MLP channels,
        in total and per layer, so methods that differ in allocation are not read as differing in data."""
        heads = (~self.heads).sum(dim=1).tolist()
        kv_dead = (~self.kv_alive(s)).sum(dim=1).tolist()
        channels = (~self.channels).sum(dim=1).tolist()
        return {"heads_pruned": sum(heads), "heads_total": s.num_layers * s.num_heads,
                "kv_groups_dead": sum(kv_dead), "kv_groups_total": s.num_layers * s.num_kv_heads,
                "channels_pruned": sum(channels), "channels_total": s.num_layers * s.intermediate_size,
                "per_layer": {"heads_pruned": heads, "kv_groups_dead": kv_dead, "channels_pruned": channels}}

    def kept_per_layer(self) -> list[dict]:
        return [{"heads": int(h.sum()), "channels": int(c.sum())}
                for h, c in zip(self.heads, self.channels)]

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.heads, self.channels):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.uint8).numpy().tobytes())
        for name, t in sorted((self.biases or {}).items()):   # absent for masks without compensation: digests unchanged
            h.update(name.encode())
            h.update(t.to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path, manifest: dict) -> Path:
        """Write `<path>` (safetensors) and its manifest `<path>.json`, each atomically."""
        tensors = {"heads": self.heads.to(torch.uint8), "channels": self.channels.to(torch.uint8)}
        tensors.update({f"bias.{name}": t.to(torch.float32).contiguous() for name, t in (self.biases or {}).items()})
        meta = {**manifest, "digest": self.digest(), "heads_shape": list(self.heads.shape),
                "channels_shape": list(self.channels.shape)}
        return write_with_manifest(path, lambda tmp: save_file(tensors, str(tmp)), meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple["Mask", dict]:
        path = Path(path)
        meta_path = manifest_path(path)
        if not path.is_file() or not meta_path.is_file():
            raise MaskError(f"mask {path} (or its manifest {meta_path.name}) not found: run `resp prune` first")
        tensors = load_file(str(path))
        biases = {k.removeprefix("bias."): v for k, v in tensors.items() if k.startswith("bias.")} or None
        mask = cls(tensors["heads"].bool(), tensors["channels"].bool(), biases)
        meta = read_manifest(path)
        if meta.get("digest") != mask.digest():
            raise MaskError(f"mask {path} does not match the digest in its manifest: the file was changed; re-run `resp prune`")
        return mask, meta


def check_mask_fits(mask: Mask, s: Structures, meta: dict | None = None, model_key: str | None = None) -> None:
    """Refuse a mask made for another model (shape or identity)."""
    want = (s.num_layers, s.num_heads), (s.num_layers, s.intermediate_size)
    got = tuple(mask.heads.shape), tuple(mask.channels.shape)
    if got != want:
        raise MaskError(f"mask shapes heads{list(got[0])}/channels{list(got[1])} do not fit this model "
                        f"(heads{list(want[0])}/channels{list(want[1])}): the mask was made for a different model")
    made_for = (meta or {}).get("model", {}).get("key")
    if model_key and made_for and made_for != model_key:
        raise MaskError(f"mask was made for model {made_for[:16]}, not this model {model_key[:16]}: "
                        "prune this model or load the model the mask belongs to")


@torch.no_grad()
def apply_mask(model, mask: Mask, s: Structures) -> None:
    """Zero the weights of pruned units in place (the masked model keeps stock shapes) and add the
    mask's bias compensation, if it has one, to the output biases, creating them where the model has
    none (apply such a mask to dense weights once)."""
    adapter = adapter_for(model.config)
    hd = s.head_dim
    kv_alive = mask.kv_alive(s)
    for i, layer in enumerate(adapter.layers(model)):
        q, k, v, o = (adapter.q_proj(layer), adapter.k_proj(layer), adapter.v_proj(layer), adapter.o_proj(layer))
        for h in torch.nonzero(~mask.heads[i]).flatten().tolist():
            rows = slice(h * hd, (h + 1) * hd)
            q.weight[rows] = 0
            if q.bias is not None:
                q.bias[rows] = 0
            o.weight[:, rows] = 0
        for j in torch.nonzero(~kv_alive[i]).flatten().tolist():
            rows = slice(j * hd, (j + 1) * hd)
            for proj in (k, v):
                proj.weight[rows] = 0
                if proj.bias is not None:
                    proj.bias[rows] = 0
        dead = ~mask.channels[i]
        if dead.any():
            for proj in (adapter.gate_proj(layer), adapter.up_proj(layer)):
                proj.weight[dead] = 0
                if proj.bias is not None:
                    proj.bias[dead] = 0
            adapter.down_proj(layer).weight[:, dead] = 0
        for name, deltas in (mask.biases or {}).items():
            proj = getattr(adapter, name)(layer)
            if proj.bias is None:   # FLAP's compensation needs a bias: create it, as FLAP's modeling code does
                proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype,
                                                           device=proj.weight.device))
            proj.bias += deltas[i].to(proj.bias.dtype).to(proj.bias.device)


def unit_mask_to_heads(units: torch.Tensor, s: Structures) -> torch.Tensor:
    """Expand a [L, A] attention-unit mask to query heads [L, H]."""
    return units if s.attention_unit == "query_head" else units.repeat_interleave(s.n_rep, dim=1)


def prune_step(attention_scores: torch.Tensor, channel_scores: torch.Tensor, mask: Mask,
               s: Structures, target: float) -> Mask:
    """Prune the globally lowest-scoring units until parameter sparsity >= `target`.

    Scores are already normalised per block type ([L, A] and [L, I]). Units in protected
    layers and units already pruned are never candidates. Ties are broken by position
    (attention before channels, then layer, then index), so the result is deterministic.
    """
    new = mask.clone()
    units = new.attention_units(s).clone()
    candidates = []  # (score, kind, layer, index)
    for layer in s.prunable_layers:
        for a in torch.nonzero(units[layer]).flatten().tolist():
            candidates.append((float(attention_scores[layer, a]), 0, layer, a))
        for c in torch.nonzero(new.channels[layer]).flatten().tolist():
            candidates.append((float(channel_scores[layer, c]), 1, layer, c))
    candidates.sort()
    pruned = new.pruned_params(s)
    goal = target * s.decoder_params
    for _, kind, layer, index in candidates:
        if pruned >= goal:
            break
        if kind == 1:
            new.channels[layer, index] = False
            pruned += s.channel_params
            continue
        if s.attention_unit == "kv_group":
            units[layer, index] = False
            new.heads[layer] = unit_mask_to_heads(units, s)[layer]
            pruned += s.attention_unit_params
        else:
            group = index // s.n_rep
            new.heads[layer, index] = False
            pruned += s.head_params
            if not new.heads[layer, group * s.n_rep:(group + 1) * s.n_rep].any():
                pruned += s.kv_params
    if pruned < goal:
        raise MaskError(f"target sparsity {target} cannot be reached with protected layers {list(s.protected)} "
                        f"(max {pruned / s.decoder_params:.3f}); lower the target or protect fewer layers")
    return new


class MaskedModel:
    """Puts a model into the state of a mask before scoring or generating.

    Masks along one run are nested, so zeroing in place is enough; with `keep_dense` a CPU
    copy of the prunable weights is kept so branches can return to a less sparse mask.
    """

    def __init__(self, model, s: Structures, keep_dense: bool, dense: dict | None = None):
        self.model, self.s = model, s
        self.dense = dense if dense is not None else (
            {n: p.detach().cpu().clone() for n, p in model.named_parameters()
             if n.endswith("proj.weight") or n.endswith("proj.bias")} if keep_dense else None)

    def set(self, mask: Mask):
        if mask.biases and self.dense is None:
            raise ValueError("a mask with bias compensation adds to biases: build MaskedModel with keep_dense=True")
        if self.dense is not None:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name in self.dense:
                        p.copy_(self.dense[name])
            for name, module in self.model.named_modules():   # biases an earlier mask created go again
                if getattr(module, "bias", None) is not None and f"{name}.bias" not in self.dense:
                    module.bias = None
        apply_mask(self.model, mask, self.s)
        return self.model
