"""Activation and weight baselines, each as its paper and reference code define it (method.md, "Baselines").

Every baseline produces `Mask`s over the same units as RESP (query heads or KV groups, MLP
channels), never touches protected layers, and reaches the same parameter-sparsity targets as
measured by `Mask.sparsity`. Calibration batches come from `decode_only_batches`: activation
statistics are taken on the tokens that carry a label (the completion of a self-generated or
gold trace after its masked prompt; every token of generic text), the same tokens the Taylor
loss sees.

Activation statistics are gathered by walking the decoder one layer at a time over cached
hidden states, as the reference code does (`layer_by_layer`):

- **wanda_sp** (FLAP's `prune_wanda_sp`): per layer, column score mean_r |W[r, c]| * ||X_c||_2 on
  the inputs of o_proj / down_proj, summed over a unit's columns; the same pruned fraction in
  every prunable layer. Layer l's statistics come from the model whose layers < l are already
  pruned (Wanda's order: the pruned output feeds the next layer).
- **owl_sp** (OWL, Yin et al. 2024, paper settings M=5, lambda=0.08): Wanda-sp with non-uniform
  layer ratios. From the dense model, the outlier ratio D_l of a layer is the share of its
  Wanda scores |W| * ||X|| (all seven projections) above M times their mean; ratios are scaled to
  [0, 2 lambda] over the prunable layers and centred, and a layer with more outliers is pruned
  less (sparsity_l = s - offset_l). Pruning then proceeds layer by layer like Wanda-sp.
- **flap** (FLAP, An et al. 2024, WIFV metric, adaptive structure over all prunable layers): per
  input column, fluctuation = variance of the input over calibration tokens times the squared
  norm of the weight column (squared again for attention, as FLAP's code does), standardised
  over the columns of each layer and module type; a head scores the mean of its standardised
  columns, a channel its own value; one global ranking (`prune_step`). FLAP scores every layer
  before pruning any (its global threshold needs them all), so its statistics come from the
  dense model, as in its code. Bias compensation (`flap_bias_compensation`): W[:, removed] @
  mean(X[removed]) is carried by the mask (`Mask.biases`) and added to the output biases when the
  mask is applied or exported; where the architecture has no o_proj/down_proj bias (the supported
  families by default), applying the mask creates one, as FLAP's own modeling code does. The
  statistics forward runs in `statistics_dtype` (baselines.flap_statistics_dtype): in float64 the
  compensation's float32 bytes do not depend on the CPU's float reduction order.
- **magnitude**: element score |w|, unit score = sum over its weights, divided by
  `Structures.normalizer(normalize)` exactly like the Taylor scores, ranked globally.
- **random**: uniform scores from `torch.Generator().manual_seed(seed)`, ranked globally.

Global methods prune progressively over ascending targets from the previous mask, so their masks
are nested. Wanda-sp and OWL-sp masks are computed per target (statistics depend on what is
already pruned), so they need not be nested.
"""

from __future__ import annotations

import copy

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from resp.adapters import adapter_for
from resp.masks import Mask, MaskError, prune_step, unit_mask_to_heads
from resp.structures import Structures
from resp.traces import IGNORE_INDEX

logger = logging.getLogger(__name__)

NORMALIZE_MODES = ("none", "params", "paper")
NO_BIAS_MESSAGE = "bias compensation not applied: architecture has no o_proj/down_proj bias"
# Inputs whose statistics a scorer reads: q_proj's input is k/v's too, gate_proj's is up_proj's.
PROJECTIONS = ("q_proj", "o_proj", "gate_proj", "down_proj")
CALIBRATED = ("wanda_sp", "owl_sp", "flap")   # scorers that read activations


class BaselineError(ValueError):
    pass


@dataclass
class InputStats:
    """Per input column of each projection: sum and sum of squares over calibration tokens (float64 [L, width])."""

    sums: dict[str, torch.Tensor]
    sumsqs: dict[str, torch.Tensor]
    tokens: int

    def l2(self, proj: str) -> torch.Tensor:
        """||X[:, c]||_2 over all tokens, per input column."""
        return self.sumsqs[proj].sqrt()

    def mean(self, proj: str) -> torch.Tensor:
        return self.sums[proj] / self.tokens

    def variance(self, proj: str) -> torch.Tensor:
        """Unbiased sample variance per input column (clamped at 0 against cancellation)."""
        n = self.tokens
        return ((self.sumsqs[proj] - self.sums[proj] ** 2 / n) / (n - 1)).clamp_min(0)


def _input_width(s: Structures, proj: str) -> int:
    return {"q_proj": s.hidden_size, "o_proj": s.num_heads * s.head_dim,
            "gate_proj": s.hidden_size, "down_proj": s.intermediate_size}[proj]


def _layer0_inputs(model, batches, device) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """(hidden states, keyword arguments, tokens to count) entering decoder layer 0, per batch."""
    adapter = adapter_for(model.config)

    class Captured(Exception):
        pass

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        raise Captured(hidden, kwargs)

    layer_types = getattr(model.config, "layer_types", None) or []
    if len(set(layer_types)) > 1:
        raise BaselineError(f"layers of types {sorted(set(layer_types))} take different attention masks; "
                            "layer-by-layer statistics support models whose layers are all alike")
    states = []
    handle = adapter.layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            missing = [k for k in ("input_ids", "attention_mask") if k not in batch]
            if missing:
                raise BaselineError(f"calibration batch lacks {missing}: pass dicts with input_ids and attention_mask tensors")
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            keep = attention_mask.bool()
            if "labels" in batch:   # decode-only: count the tokens that carry a label
                keep &= batch["labels"].to(device) != IGNORE_INDEX
            # Positions count real tokens only, as generation does, so a left-padded row sees its unpadded positions.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            except Captured as caught:
                hidden, kwargs = caught.args
                states.append((hidden, kwargs, keep))
    finally:
        handle.remove()
    return states


def _removal_hooks(adapter, layer: nn.Module, heads: torch.Tensor, channels: torch.Tensor, head_dim: int) -> list:
    """Pre-hooks that zero the o_proj input columns of pruned heads and the down_proj inputs of
    pruned channels: the layer's output then equals the masked layer's (`apply_mask`)."""
    def scale(keep: torch.Tensor):
        def hook(module, args):
            return (args[0] * keep.to(args[0].dtype),) + tuple(args[1:])
        return hook

    return [adapter.o_proj(layer).register_forward_pre_hook(scale(heads.repeat_interleave(head_dim))),
            adapter.down_proj(layer).register_forward_pre_hook(scale(channels))]


Decide = Callable[[int, InputStats], tuple[torch.Tensor, torch.Tensor]]


@torch.inference_mode()
def layer_by_layer(model, batches: list[dict], s: Structures, projections: tuple[str, ...] = ("o_proj", "down_proj"),
                   decide: Decide | None = None, desc: str = "input stats") -> tuple[InputStats, Mask]:
    """Walk the decoder one layer at a time over cached hidden states (the Wanda/FLAP/OWL loop).

    At layer l, accumulate (float64) per-column sums and sums of squares of the inputs of
    `projections` over the counted tokens. If `decide(l, stats)` is given and l is prunable, it
    returns the (heads [H], channels [I]) kept in layer l, and the layer's output is recomputed
    with those units removed, so layer l+1 sees the pruned model. Without `decide` the
    statistics are the dense model's. Returns the statistics and the mask decided."""
    adapter = adapter_for(model.config)
    device = next(model.parameters()).device
    states = _layer0_inputs(model, batches, device)
    tokens = sum(int(keep.sum()) for _, _, keep in states)
    if tokens == 0:
        raise BaselineError("calibration batches hold no labelled non-padding tokens: pass at least one non-empty sequence")
    sums = {p: torch.zeros(s.num_layers, _input_width(s, p), dtype=torch.float64, device=device) for p in projections}
    sumsqs = {p: torch.zeros_like(sums[p]) for p in projections}
    stats = InputStats(sums, sumsqs, tokens)
    mask = Mask.dense(s)
    current: dict[str, torch.Tensor] = {}

    def accumulate(proj: str, index: int):
        def hook(module, args):
            rows = args[0][current["keep"]].to(torch.float64)   # [tokens, width], padding and prompt dropped
            sums[proj][index] += rows.sum(0)
            sumsqs[proj][index] += rows.pow(2).sum(0)
        return hook

    def run(layer, hooks: list) -> list[torch.Tensor]:
        outputs = []
        try:
            for hidden, kwargs, keep in states:
                current["keep"] = keep
                out = layer(hidden, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            for handle in hooks:
                handle.remove()
        return outputs

    for index, layer in enumerate(tqdm(adapter.layers(model), desc=desc, unit="layer")):
        outputs = run(layer, [getattr(adapter, p)(layer).register_forward_pre_hook(accumulate(p, index))
                              for p in projections])
        if decide is not None and index in s.prunable_layers:
            heads, channels = decide(index, stats)
            mask.heads[index], mask.channels[index] = heads, channels
            if not (heads.all() and channels.all()):
                outputs = run(layer, _removal_hooks(adapter, layer, heads.to(device), channels.to(device), s.head_dim))
        states = [(out, kwargs, keep) for out, (_, kwargs, keep) in zip(outputs, states)]
    stats = InputStats({p: v.cpu() for p, v in sums.items()}, {p: v.cpu() for p, v in sumsqs.items()}, tokens)
    return stats, mask


def _f64(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float64).cpu()


def _units_from_columns(columns: torch.Tensor, s: Structures, reduce: str = "sum") -> torch.Tensor:
    """Reduce o_proj column scores [..., H*hd] to attention units [..., A] (heads of a KV group are contiguous)."""
    grouped = columns.reshape(*columns.shape[:-1], s.attention_units, -1)
    return grouped.sum(-1) if reduce == "sum" else grouped.mean(-1)


def _check_stats(stats: InputStats, s: Structures, method: str, min_tokens: int) -> InputStats:
    for proj, value in stats.sums.items():
        want = [s.num_layers, _input_width(s, proj)]
        if list(value.shape) != want:
            raise BaselineError(f"input statistics of {proj} have shape {list(value.shape)}, not {want} for this model: "
                                "collect them on the model being pruned")
    if stats.tokens < min_tokens:
        raise BaselineError(f"method {method!r} needs at least {min_tokens} calibration tokens, got {stats.tokens}: pass more text")
    return stats


def wanda_sp_layer_scores(model, s: Structures, stats: InputStats, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention [A], channels [I]) of layer `index`: sum over a unit's input columns of mean_r |W[r, c]| * ||X_c||_2."""
    adapter = adapter_for(model.config)
    layer = adapter.layers(model)[index]
    o_cols = _f64(adapter.o_proj(layer).weight).abs().mean(0) * stats.l2("o_proj")[index]
    down_cols = _f64(adapter.down_proj(layer).weight).abs().mean(0) * stats.l2("down_proj")[index]
    return _units_from_columns(o_cols, s), down_cols


def wanda_sp_scores(model, s: Structures, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda-sp scores of every layer: (attention [L, A], channels [L, I])."""
    _check_stats(stats, s, "wanda_sp", 1)
    per_layer = [wanda_sp_layer_scores(model, s, stats, i) for i in range(s.num_layers)]
    return torch.stack([a for a, _ in per_layer]), torch.stack([c for _, c in per_layer])


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Per row (layer): (x - mean) / std (unbiased); a row with no spread (or one entry) becomes zeros."""
    centered = scores - scores.mean(-1, keepdim=True)
    if scores.shape[-1] < 2:
        return torch.zeros_like(scores)
    std = scores.std(-1, keepdim=True)
    return torch.where(std > 0, centered / torch.where(std > 0, std, 1), torch.zeros_like(centered))


def flap_column_metrics(model, s: Structures, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's WIFV per input column: (o_proj [L, H*hd], down_proj [L, I]) = var(X_c) * ||W[:, c]||^2,
    squared for o_proj as in FLAP's code."""
    _check_stats(stats, s, "flap", 2)
    adapter = adapter_for(model.config)
    o_cols, down_cols = [], []
    for i, layer in enumerate(adapter.layers(model)):
        o_cols.append((_f64(adapter.o_proj(layer).weight).pow(2).sum(0) * stats.variance("o_proj")[i]) ** 2)
        down_cols.append(_f64(adapter.down_proj(layer).weight).pow(2).sum(0) * stats.variance("down_proj")[i])
    return torch.stack(o_cols), torch.stack(down_cols)


def flap_scores(model, s: Structures, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP ranking scores: columns standardised per layer and module, heads by the mean of their columns."""
    o_cols, down_cols = flap_column_metrics(model, s, stats)
    return _units_from_columns(standardize(o_cols), s, reduce="mean"), standardize(down_cols)


def owl_outlier_ratios(model, s: Structures, stats: InputStats, outlier_m: float) -> torch.Tensor:
    """OWL's layerwise outlier distribution: per layer, the share of Wanda scores |W| * ||X|| over all
    seven projections that exceed `outlier_m` times their mean (float64 [L])."""
    _check_stats(stats, s, "owl_sp", 1)
    adapter = adapter_for(model.config)
    inputs = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
              "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}
    ratios = []
    for i, layer in enumerate(adapter.layers(model)):
        scores = torch.cat([(_f64(getattr(adapter, proj)(layer).weight).abs() * stats.l2(source)[i]).flatten()
                            for proj, source in inputs.items()])
        ratios.append((scores > outlier_m * scores.mean()).double().mean())
    return torch.stack(ratios)


def owl_offsets(ratios: torch.Tensor, s: Structures, lam: float) -> torch.Tensor:
    """Per-layer sparsity offsets (float64 [L], 0 on protected layers): OWL's outlier ratios of the
    prunable layers scaled to [0, 2*lam] and centred; a layer's sparsity is s - offset."""
    offsets = torch.zeros(s.num_layers, dtype=torch.float64)
    d = ratios[s.prunable_layers]
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    offsets[s.prunable_layers] = scaled - scaled.mean()
    return offsets


def magnitude_scores(model, s: Structures, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention [L, A], channels [L, I]): sum of |w| over each unit's weights, divided by the normalizer."""
    adapter = adapter_for(model.config)
    hd = s.head_dim
    attention, channels = [], []
    for layer in adapter.layers(model):
        q_rows = _f64(adapter.q_proj(layer).weight).abs().sum(1)       # [H*hd]
        o_cols = _f64(adapter.o_proj(layer).weight).abs().sum(0)       # [H*hd]
        units = (q_rows + o_cols).view(s.attention_units, -1).sum(-1)
        if s.attention_unit == "kv_group":
            kv_rows = _f64(adapter.k_proj(layer).weight).abs().sum(1) + _f64(adapter.v_proj(layer).weight).abs().sum(1)
            units = units + kv_rows.view(s.num_kv_heads, hd).sum(-1)
        attention.append(units)
        rows = _f64(adapter.gate_proj(layer).weight).abs().sum(1) + _f64(adapter.up_proj(layer).weight).abs().sum(1)
        channels.append(rows + _f64(adapter.down_proj(layer).weight).abs().sum(0))
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


def layer_counts(s: Structures, k: int, offsets: torch.Tensor | None = None) -> dict[int, tuple[int, int]]:
    """(attention units, channels) to prune per prunable layer at grid step k: channels
    round(k - offset_l * I) clamped to [0, I]; units round(channels * A / I), halves up."""
    I, A = s.intermediate_size, s.attention_units
    counts = {}
    for layer in s.prunable_layers:
        shift = float(offsets[layer]) * I if offsets is not None else 0.0
        channels = min(max(int(torch.tensor(k - shift).round()), 0), I)
        counts[layer] = ((2 * channels * A + I) // (2 * I), channels)
    return counts


def _count_sparsity(s: Structures, counts: dict[int, tuple[int, int]]) -> float:
    """Sparsity of `counts` ignoring dead KV groups: a lower bound of the mask's sparsity."""
    pruned = sum(u * s.attention_unit_params + c * s.channel_params for u, c in counts.values())
    return pruned / s.decoder_params


def _keep_lowest_out(scores: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(scores.shape[0], dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:n]] = False   # ties: lower index pruned first
    return keep


def uniform_mask(attention_scores: torch.Tensor, channel_scores: torch.Tensor, s: Structures,
                 counts: dict[int, tuple[int, int]]) -> Mask:
    """Prune, per prunable layer, its count of lowest-scoring attention units and channels (fixed scores)."""
    units = torch.ones(s.num_layers, s.attention_units, dtype=torch.bool)
    mask = Mask.dense(s)
    for layer, (n_units, n_channels) in counts.items():
        units[layer] = _keep_lowest_out(attention_scores[layer], n_units)
        mask.channels[layer] = _keep_lowest_out(channel_scores[layer], n_channels)
    mask.heads = unit_mask_to_heads(units, s).clone()
    return mask


def sequential_wanda_mask(model, batches: list[dict], s: Structures, counts: dict[int, tuple[int, int]],
                          desc: str) -> Mask:
    """Wanda-sp's loop: per layer, score on the inputs the already-pruned model gives it, prune its count."""
    def decide(index: int, stats: InputStats):
        attention, channels = wanda_sp_layer_scores(model, s, stats, index)
        n_units, n_channels = counts[index]
        units = _keep_lowest_out(attention, n_units)
        return unit_mask_to_heads(units.unsqueeze(0), s)[0], _keep_lowest_out(channels, n_channels)

    return layer_by_layer(model, batches, s, decide=decide, desc=desc)[1]


def layerwise_masks(method: str, model, batches: list[dict], s: Structures, targets: list[float],
                    offsets: torch.Tensor | None = None, dense_stats: InputStats | None = None) -> dict[float, Mask]:
    """Per target, the smallest grid step k whose layer-by-layer mask reaches it.

    A layer-by-layer pass costs about two forward passes, so k is first predicted from masks on
    the dense model's statistics (no forward), then the layer-by-layer mask at k decides: k steps
    up until the target is reached, then down while it still is (dead KV groups make sparsity
    depend on which heads go, not only on how many)."""
    if dense_stats is None:
        dense_stats = layer_by_layer(model, batches, s, desc=f"{method} dense stats")[0]
    attention, channels = wanda_sp_scores(model, s, dense_stats)
    top = s.intermediate_size + (int(torch.ceil(offsets.abs().max() * s.intermediate_size)) if offsets is not None else 0)
    cache: dict[int, Mask] = {}

    def layerwise(k: int) -> Mask:
        if k not in cache:
            cache[k] = sequential_wanda_mask(model, batches, s, layer_counts(s, k, offsets), f"{method} k={k}")
        return cache[k]

    masks: dict[float, Mask] = {}
    for target in sorted(set(targets)):
        if uniform_mask(attention, channels, s, layer_counts(s, top, offsets)).sparsity(s) < target:
            raise MaskError(f"target sparsity {target} cannot be reached with protected layers {list(s.protected)}; "
                            "lower the target or protect fewer layers")
        low, high = 0, top   # predicted: smallest k whose dense-statistics mask reaches the target
        while low < high:
            mid = (low + high) // 2
            if uniform_mask(attention, channels, s, layer_counts(s, mid, offsets)).sparsity(s) >= target:
                high = mid
            else:
                low = mid + 1
        k = low
        while layerwise(k).sparsity(s) < target and k < top:
            k += 1
        if layerwise(k).sparsity(s) < target:
            raise MaskError(f"target sparsity {target} cannot be reached by {method} with protected layers "
                            f"{list(s.protected)}; lower the target or protect fewer layers")
        while k > 0 and layerwise(k - 1).sparsity(s) >= target:
            k -= 1
        masks[target] = layerwise(k)
        _log_mask(method, target, masks[target], s)
    return masks


def _wanda_sp(model, s, targets, batches, options):
    return layerwise_masks("wanda_sp", model, batches, s, targets)


def _owl_sp(model, s, targets, batches, options):
    stats, _ = layer_by_layer(model, batches, s, projections=PROJECTIONS, desc="owl outliers")
    ratios = owl_outlier_ratios(model, s, stats, options["owl_outlier_m"])
    offsets = owl_offsets(ratios, s, options["owl_lambda"])
    logger.info("owl_sp: outlier ratios %s -> sparsity offsets %s", [round(float(r), 4) for r in ratios],
                [round(float(o), 4) for o in offsets])
    return layerwise_masks("owl_sp", model, batches, s, targets, offsets, dense_stats=stats)


def _flap(model, s, targets, batches, options):
    # Activations in float64 (a float64 copy of the model): kernels of other CPUs change float32 sums in
    # their last bits, which the compensation tensors would carry into the stored mask; float64's last
    # bits do not reach float32.
    wide = options["statistics_dtype"] == "float64" and next(model.parameters()).dtype != torch.float64
    stats_model = copy.deepcopy(model).to(torch.float64) if wide else model
    stats, _ = layer_by_layer(stats_model, batches, s, desc="flap stats")
    del stats_model
    masks = global_masks("flap", *flap_scores(model, s, stats), s, targets)
    if options["bias_compensation"]:   # FLAP's compensation rides with each mask into evaluation and exports
        for mask in masks.values():
            mask.biases = compensation_tensors(flap_bias_compensation(model, mask, stats, s), s)
    return masks


def _magnitude(model, s, targets, batches, options):
    return global_masks("magnitude", *magnitude_scores(model, s, options["normalize"]), s, targets)


def _random(model, s, targets, batches, options):
    return global_masks("random", *random_scores(s, options["seed"]), s, targets)


BaselineFn = Callable[..., dict[float, Mask]]
BASELINES: dict[str, BaselineFn] = {
    "wanda_sp": _wanda_sp,
    "owl_sp": _owl_sp,
    "flap": _flap,
    "magnitude": _magnitude,
    "random": _random,
}


def baseline_masks(scorer: str, model, structures: Structures, targets: list[float], batches: list[dict] | None,
                   seed: int = 0, normalize: str = "paper", owl_outlier_m: float = 5.0,
                   owl_lambda: float = 0.08, bias_compensation: bool = True,
                   flap_statistics_dtype: str = "float64") -> dict[float, Mask]:
    """Masks of baseline `scorer` for every target (keys: the targets). `batches` (from
    `decode_only_batches`, as a list) calibrate wanda_sp, owl_sp and flap; magnitude and random
    take none."""
    if scorer not in BASELINES:
        raise BaselineError(f"baseline scorer {scorer!r} is unknown; valid: {', '.join(sorted(BASELINES))}")
    if normalize not in NORMALIZE_MODES:
        raise BaselineError(f"normalize {normalize!r} must be one of {sorted(NORMALIZE_MODES)}")
    if scorer in CALIBRATED and not batches:
        raise BaselineError(f"scorer {scorer!r} needs calibration batches: declare calibration self, gold or generic for it")
    if scorer not in CALIBRATED and batches:
        raise BaselineError(f"scorer {scorer!r} reads no calibration data: declare calibration none for it")
    options = {"seed": seed, "normalize": normalize, "owl_outlier_m": owl_outlier_m, "owl_lambda": owl_lambda,
               "bias_compensation": bias_compensation, "statistics_dtype": flap_statistics_dtype}
    return BASELINES[scorer](model, structures, targets, batches, options)


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
        biases[i] = {name: _f64(projections[name].weight)[:, cols] @ stats.mean(name)[i][cols]
                     for name, cols in removed.items()}
    return biases


def compensation_tensors(biases: dict[int, dict[str, torch.Tensor]], s: Structures) -> dict[str, torch.Tensor]:
    """`flap_bias_compensation`'s per-layer vectors as a mask's bias tensors (float32 [L, hidden]) for
    o_proj and down_proj. Where the architecture has no such bias, applying the mask creates one (as
    FLAP's own modeling file gives LLaMA's o_proj/down_proj a bias)."""
    tensors = {name: torch.zeros(s.num_layers, s.hidden_size, dtype=torch.float32) for name in ("o_proj", "down_proj")}
    for layer, per_proj in biases.items():
        for name in tensors:
            tensors[name][layer] = per_proj[name].to(torch.float32)
    return tensors


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
