"""Non-gradient structured-pruning baselines (method.md, "Baselines to run in the same harness").

Every baseline produces `Mask`s over the same units as RESP (query heads or KV groups, MLP
channels), never touches protected layers, and reaches the same parameter-sparsity targets as
measured by `Mask.sparsity`. Scores are computed once on the model as given (dense), then:

- **wanda_sp**: per-layer score |W| * ||X||_2 on the inputs of o_proj / down_proj (L2 norm
  over all non-padding calibration tokens, per input column), averaged over output rows and
  summed over a unit's columns. Uniform ratio per layer: with k = channels pruned in every
  prunable layer, each prunable layer also loses round(k * A / I) attention units (A units and
  I channels per layer, so heads and channels lose the same fraction r = k / I up to rounding,
  halves rounded up). k is the smallest value on the grid 0..I whose mask reaches the target
  (binary search; sparsity grows with k). Per-layer rankings are fixed, so masks are nested.
- **flap**: fluctuation = sample variance of each input column over calibration tokens times
  the squared norm of the weight column; a head sums its columns. Scores are standardised per
  layer and block type (minus mean, over the unbiased std of that layer's units; a layer whose
  scores do not vary gets zeros), then ranked globally by `prune_step`.
  Bias compensation (`flap_bias_compensation`) gives, per layer, W[:, removed] @ mean(X[removed])
  for o_proj and down_proj: adding it to the output bias makes the pruned layer exact whenever
  the removed inputs sit at their calibration mean. Qwen3/Qwen2/Llama/Mistral o_proj and
  down_proj have no bias by default, and a Linear given a new bias no longer matches the stock
  config, so `apply_bias_compensation` adds to existing biases only unless `add_bias=True`, and
  says in its info dict when it did not apply (our FLAP masks are then FLAP without its
  compensation).
- **magnitude**: element score |w|, unit score = sum over its weights (q rows + o columns of a
  head; plus k/v rows for a KV group; gate/up rows + down column of a channel; biases are not
  scored), divided by `Structures.normalizer(normalize)` exactly like the Taylor scores,
  ranked globally.
- **random**: uniform scores from `torch.Generator().manual_seed(seed)`, ranked globally, so
  the sparsity accounting is the same as every other method.

Global methods prune progressively over ascending targets starting from the previous mask, so
all returned masks are nested. `normalize` matters for magnitude only; `seed` for random only
(the others break ties by position and are deterministic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from resp.adapters import adapter_for
from resp.masks import Mask, MaskError, prune_step, unit_mask_to_heads
from resp.structures import Structures

logger = logging.getLogger(__name__)

NORMALIZE_MODES = ("none", "params", "paper")
NO_BIAS_MESSAGE = "bias compensation not applied: architecture has no o_proj/down_proj bias"


class BaselineError(ValueError):
    pass


@dataclass
class InputStats:
    """First and second moments of the inputs of o_proj and down_proj over calibration tokens."""

    o_sum: torch.Tensor        # float64 [L, H*head_dim]: sum over tokens of each o_proj input column
    o_sumsq: torch.Tensor      # float64 [L, H*head_dim]: sum of squares
    down_sum: torch.Tensor     # float64 [L, I]
    down_sumsq: torch.Tensor   # float64 [L, I]
    tokens: int                # non-padding tokens seen (the same for every layer)

    def l2(self, proj: str) -> torch.Tensor:
        """||X[:, c]||_2 over all tokens, per input column."""
        return self._sumsq(proj).sqrt()

    def mean(self, proj: str) -> torch.Tensor:
        return self._sum(proj) / self.tokens

    def variance(self, proj: str) -> torch.Tensor:
        """Unbiased sample variance per input column (clamped at 0 against cancellation)."""
        n = self.tokens
        return ((self._sumsq(proj) - self._sum(proj) ** 2 / n) / (n - 1)).clamp_min(0)

    def _sum(self, proj: str) -> torch.Tensor:
        return {"o_proj": self.o_sum, "down_proj": self.down_sum}[proj]

    def _sumsq(self, proj: str) -> torch.Tensor:
        return {"o_proj": self.o_sumsq, "down_proj": self.down_sumsq}[proj]


@torch.inference_mode()
def collect_input_stats(model, batches: Iterable[dict], structures: Structures) -> InputStats:
    """Run the model over `batches` ({input_ids, attention_mask} tensors, any padding side) and
    accumulate, in float64 with forward pre-hooks, the per-column sum and sum of squares of
    every layer's o_proj and down_proj inputs over non-padding tokens."""
    s = structures
    adapter = adapter_for(model.config)
    device = next(model.parameters()).device
    width = {"o_proj": s.num_heads * s.head_dim, "down_proj": s.intermediate_size}
    sums = {p: torch.zeros(s.num_layers, w, dtype=torch.float64, device=device) for p, w in width.items()}
    sumsqs = {p: torch.zeros(s.num_layers, w, dtype=torch.float64, device=device) for p, w in width.items()}
    current: dict[str, torch.Tensor] = {}

    def accumulate(proj: str, layer: int):
        def hook(module, args):
            rows = args[0][current["keep"]].to(torch.float64)  # [tokens, width], padding dropped
            sums[proj][layer] += rows.sum(0)
            sumsqs[proj][layer] += rows.pow(2).sum(0)
        return hook

    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        handles.append(adapter.o_proj(layer).register_forward_pre_hook(accumulate("o_proj", i)))
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(accumulate("down_proj", i)))
    tokens = 0
    try:
        for batch in tqdm(batches, desc="input stats", unit="batch"):
            missing = [k for k in ("input_ids", "attention_mask") if k not in batch]
            if missing:
                raise BaselineError(f"calibration batch lacks {missing}: "
                                    "pass dicts with input_ids and attention_mask tensors")
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            current["keep"] = attention_mask.bool()
            # Positions count real tokens only, as generation does, so a left-padded row sees its unpadded positions.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False, logits_to_keep=1)
            tokens += int(current["keep"].sum())
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise BaselineError("calibration batches hold no non-padding tokens: pass at least one non-empty sequence")
    return InputStats(sums["o_proj"].cpu(), sumsqs["o_proj"].cpu(), sums["down_proj"].cpu(),
                      sumsqs["down_proj"].cpu(), tokens)


def _f64(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float64)


def _units_from_columns(columns: torch.Tensor, s: Structures) -> torch.Tensor:
    """Sum o_proj column scores [L, H*hd] into attention units [L, A] (heads of a KV group are contiguous)."""
    return columns.view(s.num_layers, s.attention_units, -1).sum(-1)


def _check_stats(stats: InputStats | None, s: Structures, method: str, min_tokens: int) -> InputStats:
    if stats is None:
        raise BaselineError(f"method {method!r} needs input statistics: call collect_input_stats(model, batches, structures) first")
    want = [s.num_layers, s.num_heads * s.head_dim], [s.num_layers, s.intermediate_size]
    got = list(stats.o_sum.shape), list(stats.down_sum.shape)
    if got[0] != want[0] or got[1] != want[1]:
        raise BaselineError(f"input statistics of shapes o_proj{got[0]}/down_proj{got[1]} do not fit this model "
                            f"(o_proj{want[0]}/down_proj{want[1]}): collect them on the model being pruned")
    if stats.tokens < min_tokens:
        raise BaselineError(f"method {method!r} needs at least {min_tokens} calibration tokens, got {stats.tokens}: pass more text")
    return stats


def wanda_sp_scores(model, s: Structures, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention [L, A], channels [L, I]): sum over a unit's input columns of mean_r |W[r, c]| * ||X_c||_2."""
    stats = _check_stats(stats, s, "wanda_sp", 1)
    adapter = adapter_for(model.config)
    o_cols, down_cols = [], []
    for i, layer in enumerate(adapter.layers(model)):
        o_weight, down_weight = _f64(adapter.o_proj(layer).weight), _f64(adapter.down_proj(layer).weight)
        o_cols.append(o_weight.abs().mean(0).cpu() * stats.l2("o_proj")[i])
        down_cols.append(down_weight.abs().mean(0).cpu() * stats.l2("down_proj")[i])
    return _units_from_columns(torch.stack(o_cols), s), torch.stack(down_cols)


def flap_scores(model, s: Structures, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw fluctuation (attention [L, A], channels [L, I]): sum over a unit's columns of var(X_c) * ||W[:, c]||^2."""
    stats = _check_stats(stats, s, "flap", 2)
    adapter = adapter_for(model.config)
    o_cols, down_cols = [], []
    for i, layer in enumerate(adapter.layers(model)):
        o_weight, down_weight = _f64(adapter.o_proj(layer).weight), _f64(adapter.down_proj(layer).weight)
        o_cols.append(o_weight.pow(2).sum(0).cpu() * stats.variance("o_proj")[i])
        down_cols.append(down_weight.pow(2).sum(0).cpu() * stats.variance("down_proj")[i])
    return _units_from_columns(torch.stack(o_cols), s), torch.stack(down_cols)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Per row (layer): (x - mean) / std (unbiased); a row with no spread (or one unit) becomes zeros."""
    centered = scores - scores.mean(-1, keepdim=True)
    if scores.shape[-1] < 2:
        return torch.zeros_like(scores)
    std = scores.std(-1, keepdim=True)
    return torch.where(std > 0, centered / torch.where(std > 0, std, 1), torch.zeros_like(centered))


def magnitude_scores(model, s: Structures, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention [L, A], channels [L, I]): sum of |w| over each unit's weights, divided by the normalizer."""
    adapter = adapter_for(model.config)
    hd = s.head_dim
    attention, channels = [], []
    for layer in adapter.layers(model):
        q_rows = _f64(adapter.q_proj(layer).weight).abs().sum(1).cpu()       # [H*hd]
        o_cols = _f64(adapter.o_proj(layer).weight).abs().sum(0).cpu()       # [H*hd]
        units = (q_rows + o_cols).view(s.attention_units, -1).sum(-1)
        if s.attention_unit == "kv_group":
            kv_rows = _f64(adapter.k_proj(layer).weight).abs().sum(1) + _f64(adapter.v_proj(layer).weight).abs().sum(1)
            units = units + kv_rows.cpu().view(s.num_kv_heads, hd).sum(-1)
        attention.append(units)
        rows = _f64(adapter.gate_proj(layer).weight).abs().sum(1) + _f64(adapter.up_proj(layer).weight).abs().sum(1)
        channels.append((rows + _f64(adapter.down_proj(layer).weight).abs().sum(0)).cpu())
    norm_attention, norm_channels = s.normalizer(normalize)
    return torch.stack(attention) / norm_attention, torch.stack(channels) / norm_channels


def random_scores(s: Structures, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform [0, 1) scores for (attention [L, A], channels [L, I]), identical for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    attention = torch.rand(s.num_layers, s.attention_units, generator=generator, dtype=torch.float64)
    channels = torch.rand(s.num_layers, s.intermediate_size, generator=generator, dtype=torch.float64)
    return attention, channels


def _log_mask(method: str, target: float, mask: Mask, s: Structures) -> None:
    kept = [(k["heads"], k["channels"]) for k in mask.kept_per_layer()]
    logger.info("%s: target %.3f -> sparsity %.4f, kept (heads, channels) per layer %s",
                method, target, mask.sparsity(s), kept)


def global_masks(method: str, attention_scores: torch.Tensor, channel_scores: torch.Tensor,
                 s: Structures, targets: list[float]) -> dict[float, Mask]:
    """Prune by global ranking (`prune_step`) over ascending targets, each from the previous mask."""
    masks: dict[float, Mask] = {}
    mask = Mask.dense(s)
    for target in sorted(set(targets)):
        mask = prune_step(attention_scores, channel_scores, mask, s, target)
        masks[target] = mask
        _log_mask(method, target, mask, s)
    return masks


def uniform_mask(attention_scores: torch.Tensor, channel_scores: torch.Tensor, s: Structures,
                 pruned_channels: int) -> Mask:
    """Prune the `pruned_channels` lowest channels and the round(pruned_channels * A / I) lowest
    attention units of every prunable layer (ties: lower index first)."""
    pruned_units = (2 * pruned_channels * s.attention_units + s.intermediate_size) // (2 * s.intermediate_size)
    units = torch.ones(s.num_layers, s.attention_units, dtype=torch.bool)
    mask = Mask.dense(s)
    for layer in s.prunable_layers:
        units[layer, torch.argsort(attention_scores[layer], stable=True)[:pruned_units]] = False
        mask.channels[layer, torch.argsort(channel_scores[layer], stable=True)[:pruned_channels]] = False
    mask.heads = unit_mask_to_heads(units, s).clone()
    return mask


def uniform_masks(method: str, attention_scores: torch.Tensor, channel_scores: torch.Tensor,
                  s: Structures, targets: list[float]) -> dict[float, Mask]:
    """Per target, the smallest uniform per-layer ratio (grid k = 0..I channels) reaching it."""
    full = uniform_mask(attention_scores, channel_scores, s, s.intermediate_size)
    masks: dict[float, Mask] = {}
    low = 0
    for target in sorted(set(targets)):
        if full.sparsity(s) < target:
            raise MaskError(f"target sparsity {target} cannot be reached with protected layers {list(s.protected)} "
                            f"(max {full.sparsity(s):.3f}); lower the target or protect fewer layers")
        high = s.intermediate_size
        while low < high:  # smallest k with sparsity(k) >= target; sparsity grows with k
            mid = (low + high) // 2
            if uniform_mask(attention_scores, channel_scores, s, mid).sparsity(s) >= target:
                high = mid
            else:
                low = mid + 1
        masks[target] = uniform_mask(attention_scores, channel_scores, s, low)
        _log_mask(method, target, masks[target], s)
    return masks


def _wanda_sp(model, s, targets, stats, seed, normalize):
    return uniform_masks("wanda_sp", *wanda_sp_scores(model, s, stats), s, targets)


def _flap(model, s, targets, stats, seed, normalize):
    attention, channels = flap_scores(model, s, stats)
    return global_masks("flap", standardize(attention), standardize(channels), s, targets)


def _magnitude(model, s, targets, stats, seed, normalize):
    return global_masks("magnitude", *magnitude_scores(model, s, normalize), s, targets)


def _random(model, s, targets, stats, seed, normalize):
    return global_masks("random", *random_scores(s, seed), s, targets)


BaselineFn = Callable[..., dict[float, Mask]]
BASELINES: dict[str, BaselineFn] = {
    "wanda_sp": _wanda_sp,
    "flap": _flap,
    "magnitude": _magnitude,
    "random": _random,
}


def baseline_masks(method: str, model, structures: Structures, targets: list[float],
                   stats: InputStats | None, seed: int, normalize: str) -> dict[float, Mask]:
    """Masks of baseline `method` for every target (keys: the targets), nested in target order."""
    if method not in BASELINES:
        raise BaselineError(f"baseline method {method!r} is unknown; valid: {', '.join(sorted(BASELINES))}")
    if normalize not in NORMALIZE_MODES:
        raise BaselineError(f"normalize {normalize!r} must be one of {sorted(NORMALIZE_MODES)}")
    return BASELINES[method](model, structures, targets, stats, seed, normalize)


def flap_bias_compensation(model, mask: Mask, stats: InputStats, s: Structures) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer with pruned units: {"o_proj": W_o[:, removed] @ mean(X_o[removed]),
    "down_proj": W_down[:, removed] @ mean(X_down[removed])} (float64, CPU, [hidden])."""
    stats = _check_stats(stats, s, "flap", 1)
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    biases: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(s.num_layers):
        removed = {"o_proj": ~mask.heads[i].repeat_interleave(s.head_dim), "down_proj": ~mask.channels[i]}
        if not any(r.any() for r in removed.values()):
            continue
        projections = {"o_proj": adapter.o_proj(layers[i]), "down_proj": adapter.down_proj(layers[i])}
        biases[i] = {name: _f64(projections[name].weight).cpu()[:, cols] @ stats.mean(name)[i][cols]
                     for name, cols in removed.items()}
    return biases


@torch.no_grad()
def apply_bias_compensation(model, biases: dict[int, dict[str, torch.Tensor]], add_bias: bool) -> dict:
    """Add FLAP's compensation to the output biases of o_proj/down_proj in place.

    A projection without a bias is skipped unless `add_bias` (then a bias is created, and the
    model no longer matches its stock config). Returns {"applied": [...], "created": [...],
    "skipped": [...], "message": str} with entries like "3.o_proj"."""
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    applied, created, skipped = [], [], []
    for i, per_proj in sorted(biases.items()):
        projections = {"o_proj": adapter.o_proj(layers[i]), "down_proj": adapter.down_proj(layers[i])}
        for name, vector in per_proj.items():
            proj = projections[name]
            if proj.bias is None:
                if not add_bias:
                    skipped.append(f"{i}.{name}")
                    continue
                proj.bias = nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype, device=proj.weight.device))
                created.append(f"{i}.{name}")
            proj.bias += vector.to(proj.bias.dtype).to(proj.bias.device)
            applied.append(f"{i}.{name}")
    if skipped and not applied:
        message = NO_BIAS_MESSAGE
    elif skipped:
        message = f"bias compensation applied to {len(applied)} projections; skipped {skipped}: they have no bias"
    else:
        message = f"bias compensation applied to {len(applied)} projections ({len(created)} biases created)"
    logger.info(message)
    return {"applied": applied, "created": created, "skipped": skipped, "message": message}
