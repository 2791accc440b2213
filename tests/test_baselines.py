"""Tests for resp.baselines: layer-by-layer statistics, Wanda-sp, OWL-sp, FLAP (+ bias
compensation), magnitude, random. Rankings are checked against scores computed by a different
route: a hand-written forward pass and per-column Python loops."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import math
import statistics
from pathlib import Path

import pytest
import torch

from conftest import MAKERS, make_llama, make_qwen3
from resp.adapters import adapter_for
from resp.baselines import (
    BASELINES,
    NO_BIAS_MESSAGE,
    BaselineError,
    InputStats,
    apply_bias_compensation,
    baseline_masks,
    flap_bias_compensation,
    flap_scores,
    layer_by_layer,
    layer_counts,
    magnitude_scores,
    owl_offsets,
    owl_outlier_ratios,
    random_scores,
    standardize,
    uniform_mask,
    wanda_sp_scores,
)
from resp.masks import Mask, MaskError, apply_mask, prune_step
from resp.structures import structures_for

UNITS = ["query_head", "kv_group"]
TARGETS = [0.1, 0.2, 0.3, 0.5]


def sequences(seed: int, lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g) for n in lengths]


def left_padded(seqs: list[torch.Tensor], prompt: int = 0) -> dict:
    """A left-padded batch whose first `prompt` tokens of each sequence carry no label."""
    width = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, x in enumerate(seqs):
        ids[row, width - len(x):] = x
        attention_mask[row, width - len(x):] = 1
        labels[row, width - len(x) + prompt:] = x[prompt:]
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}


PROMPT = 2
FIRST, SECOND = sequences(7, [9, 5, 12]), sequences(8, [6, 11])


def calibration() -> list[dict]:
    return [left_padded(FIRST, PROMPT), left_padded(SECOND, PROMPT)]


def calibration_stats(model, s) -> InputStats:
    return layer_by_layer(model, calibration(), s)[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def manual_projection_inputs(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the o_proj and down_proj inputs [T, *] of one unpadded sequence, computed by
    hand from the residual stream (eager attention, causal, GQA, RoPE, Qwen3 q/k norms)."""
    adapter = adapter_for(model.config)
    cfg = model.config
    H, KV, hd, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, len(ids)
    hidden = model(ids[None], output_hidden_states=True).hidden_states
    cos, sin = model.model.rotary_emb(hidden[0], torch.arange(T)[None])
    cos, sin = cos[0][:, None, :], sin[0][:, None, :]          # [T, 1, hd]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    layers = adapter.layers(model)
    result = []
    for i, layer in enumerate(layers):
        h = hidden[i][0]
        x = layer.input_layernorm(h)
        q = (x @ adapter.q_proj(layer).weight.T).view(T, H, hd)
        k = (x @ adapter.k_proj(layer).weight.T).view(T, KV, hd)
        v = (x @ adapter.v_proj(layer).weight.T).view(T, KV, hd)
        if adapter.has_qk_norm:
            q, k = layer.self_attn.q_norm(q), layer.self_attn.k_norm(k)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        logits = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        o_in = torch.einsum("hts,shd->thd", probs, v).reshape(T, H * hd)
        mid = h + o_in @ adapter.o_proj(layer).weight.T
        y = layer.post_attention_layernorm(mid)
        down_in = layer.mlp.act_fn(y @ adapter.gate_proj(layer).weight.T) * (y @ adapter.up_proj(layer).weight.T)
        if i + 1 < len(layers):  # the hand forward reproduces the model's residual stream
            torch.testing.assert_close(mid + down_in @ adapter.down_proj(layer).weight.T, hidden[i + 1][0],
                                       rtol=1e-4, atol=1e-5)
        result.append((o_in.double(), down_in.double()))
    return result




def labelled_inputs(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (o_proj inputs, down_proj inputs) of the calibration's labelled tokens, by hand."""
    per_sequence = [manual_projection_inputs(model, x) for x in FIRST + SECOND]
    return [(torch.cat([seq[i][0][PROMPT:] for seq in per_sequence]), torch.cat([seq[i][1][PROMPT:] for seq in per_sequence]))
            for i in range(model.config.num_hidden_layers)]


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_dense_stats_equal_a_hand_forward_on_labelled_tokens_only(family):
    model = MAKERS[family]()
    s = structures_for(model, "query_head")
    stats, mask = layer_by_layer(model, calibration(), s)
    assert stats.tokens == sum(len(x) - PROMPT for x in FIRST + SECOND)
    assert mask.digest() == Mask.dense(s).digest()
    for i, (o_in, down_in) in enumerate(labelled_inputs(model)):
        torch.testing.assert_close(stats.sums["o_proj"][i], o_in.sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.sumsqs["o_proj"][i], o_in.pow(2).sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.sums["down_proj"][i], down_in.sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.variance("down_proj")[i], down_in.var(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.l2("o_proj")[i], o_in.norm(dim=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_layer_by_layer_statistics_come_from_the_model_pruned_so_far(family):
    model = MAKERS[family]()
    s = structures_for(model, "query_head")
    heads = torch.tensor([True, False, True, True])
    channels = torch.arange(40) % 3 != 0

    def decide(index, stats):
        return heads, channels

    stats, mask = layer_by_layer(model, calibration(), s, decide=decide)
    assert mask.heads[1].tolist() == heads.tolist() and mask.channels[2].tolist() == channels.tolist()
    assert mask.heads[3].all() and mask.channels[3].all()   # the last layer is protected
    for layer in range(s.num_layers):
        before = Mask.dense(s)
        for i in range(layer):   # layers below `layer` pruned, `layer` itself still dense
            before.heads[i], before.channels[i] = mask.heads[i], mask.channels[i]
        pruned = copy.deepcopy(model)
        apply_mask(pruned, before, s)
        o_in, down_in = labelled_inputs(pruned)[layer]
        torch.testing.assert_close(stats.sumsqs["o_proj"][layer], o_in.pow(2).sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.sumsqs["down_proj"][layer], down_in.pow(2).sum(0), rtol=1e-4, atol=1e-5)
    # and those statistics differ from the dense model's once something below was pruned
    dense = calibration_stats(model, s)
    assert not torch.allclose(dense.sumsqs["o_proj"][2], stats.sumsqs["o_proj"][2])


def test_layer_by_layer_rejects_bad_batches(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head")
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(BaselineError, match=r"calibration batch lacks \['attention_mask'\]"):
        layer_by_layer(tiny_qwen3, [{"input_ids": ids}], s)
    with pytest.raises(BaselineError, match="hold no labelled non-padding tokens"):
        layer_by_layer(tiny_qwen3, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}], s)
    # hooks were removed even though the run failed: a plain forward is untouched
    assert not adapter_for(tiny_qwen3.config).layers(tiny_qwen3)[0]._forward_pre_hooks


def stats_by_hand(s, tokens: int) -> InputStats:
    widths = {"q_proj": s.hidden_size, "o_proj": s.num_heads * s.head_dim, "gate_proj": s.hidden_size,
              "down_proj": s.intermediate_size}
    zeros = {p: torch.zeros(s.num_layers, w, dtype=torch.float64) for p, w in widths.items()}
    return InputStats(zeros, {p: v.clone() for p, v in zeros.items()}, tokens)


def alternating_signs(shape) -> torch.Tensor:
    return (torch.arange(math.prod(shape)) % 2 * 2 - 1).view(shape).float()


@pytest.mark.parametrize("unit", UNITS)
@torch.no_grad()
def test_wanda_sp_scores_by_hand(unit):
    model = make_qwen3()
    s = structures_for(model, unit)
    layer = model.model.layers[1]
    o, down = layer.self_attn.o_proj, layer.mlp.down_proj           # o [24, 32], down [24, 40]
    for h in range(4):   # |W_o| = h+1 on head h's 8 columns, signs alternate
        o.weight[:, h * 8:(h + 1) * 8] = (h + 1) * alternating_signs((24, 8))
    down.weight.copy_((torch.arange(40) + 1).float() * alternating_signs((24, 40)))
    stats = stats_by_hand(s, tokens=10)
    stats.sumsqs["o_proj"][1] = 4.0                                           # ||X_c|| = 2 for every o_proj column
    stats.sumsqs["down_proj"][1] = (torch.arange(40) % 3 + 1).double() ** 2   # ||X_c|| = c%3 + 1
    attention, channels = wanda_sp_scores(model, s, stats)
    # head h: 8 columns * mean|W| (h+1) * norm 2 = 16(h+1); KV group j sums heads 2j, 2j+1
    expected = [16.0, 32.0, 48.0, 64.0] if unit == "query_head" else [48.0, 112.0]
    assert attention[1].tolist() == expected
    assert channels[1].tolist() == [(c + 1) * (c % 3 + 1) for c in range(40)]
    assert attention[0].abs().sum() == 0 and channels[2].abs().sum() == 0   # zero input norms elsewhere


def standardized(values: list[float]) -> list[float]:
    mean, std = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / std for v in values]


@pytest.mark.parametrize("unit", UNITS)
@torch.no_grad()
def test_flap_scores_by_hand(unit):
    model = make_llama()
    s = structures_for(model, unit)
    layer = model.model.layers[2]
    for h in range(4):
        layer.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = (h + 1) * alternating_signs((24, 8))
    layer.mlp.down_proj.weight.copy_(alternating_signs((24, 40)))
    stats = stats_by_hand(s, tokens=5)
    stats.sumsqs["o_proj"][2] = 8.0                                # mean 0: variance 8 / (5-1) = 2
    stats.sums["down_proj"][2] = 5.0
    stats.sumsqs["down_proj"][2] = 5.0 + 4.0 * (torch.arange(40) % 2).double()   # variance (sumsq - 25/5)/4 = c%2
    attention, channels = flap_scores(model, s, stats)
    # o_proj column of head h: (variance 2 * squared column norm 24(h+1)^2)^2, standardised over the 32 columns
    columns = standardized([(2 * 24.0 * (h + 1) ** 2) ** 2 for h in range(4) for _ in range(8)])
    heads = [columns[8 * h] for h in range(4)]
    expected = heads if unit == "query_head" else [(heads[0] + heads[1]) / 2, (heads[2] + heads[3]) / 2]
    torch.testing.assert_close(attention[2], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(channels[2], torch.tensor(standardized([24.0 * (c % 2) for c in range(40)]), dtype=torch.float64))


def test_standardize_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    std = math.sqrt(5 / 3)   # unbiased: sum of squared deviations 5 over n-1 = 3
    expected = [[-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(standardize(scores), torch.tensor(expected, dtype=torch.float64))
    assert standardize(torch.tensor([[3.0], [7.0]])).tolist() == [[0.0], [0.0]]   # one unit: nothing to compare


def brute_force_flap(model, s) -> tuple[list[list[float]], list[list[float]]]:
    """FLAP by per-column Python loops over a hand forward: heads and channels per layer."""
    attention, channels = [], []
    for i, (o_in, down_in) in enumerate(labelled_inputs(model)):
        layer = model.model.layers[i]
        o_w, down_w = layer.self_attn.o_proj.weight.double(), layer.mlp.down_proj.weight.double()
        o_cols = [(statistics.variance(o_in[:, c].tolist()) * sum(w * w for w in o_w[:, c].tolist())) ** 2
                  for c in range(o_in.shape[1])]
        down_cols = [statistics.variance(down_in[:, c].tolist()) * sum(w * w for w in down_w[:, c].tolist())
                     for c in range(down_in.shape[1])]
        z = standardized(o_cols)
        width = len(z) // s.attention_units
        attention.append([statistics.mean(z[u * width:(u + 1) * width]) for u in range(s.attention_units)])
        channels.append(standardized(down_cols))
    return attention, channels


def assert_lowest_pruned(mask: Mask, previous: Mask, attention, channels, s) -> None:
    """The units `mask` prunes beyond `previous` are exactly the lowest-scoring candidates, and the
    last of them was needed to reach the target."""
    candidates = []
    prev_units, units = previous.attention_units(s), mask.attention_units(s)
    for i in s.prunable_layers:
        candidates += [(attention[i][a], 0, i, a) for a in range(s.attention_units) if prev_units[i, a]]
        candidates += [(channels[i][c], 1, i, c) for c in range(s.intermediate_size) if previous.channels[i, c]]
    candidates.sort()
    pruned = {(0, i, a) for i, a in torch.nonzero(prev_units & ~units).tolist()}
    pruned |= {(1, i, c) for i, c in torch.nonzero(previous.channels & ~mask.channels).tolist()}
    assert pruned and {tuple(key) for _, *key in candidates[:len(pruned)]} == pruned


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_flap_ranking_equals_a_brute_force_per_column_computation(family, unit):
    model = MAKERS[family]()
    s = structures_for(model, unit)
    masks = baseline_masks("flap", model, s, TARGETS, calibration(), bias_compensation=False)
    attention, channels = brute_force_flap(model, s)
    previous = Mask.dense(s)
    for target in TARGETS:
        mask = masks[target]
        assert mask.sparsity(s) >= target
        assert_lowest_pruned(mask, previous, attention, channels, s)
        # the same mask from the brute-force scores through the global ranking step
        again = prune_step(torch.tensor(attention, dtype=torch.float64), torch.tensor(channels, dtype=torch.float64),
                           previous, s, target)
        assert again.digest() == mask.digest()
        previous = mask


def brute_force_wanda(model, s, mask: Mask, layer: int) -> tuple[list[float], list[float]]:
    """Wanda-sp scores of `layer` on a hand forward of the model with `mask` applied below it."""
    below = Mask.dense(s)
    below.heads[:layer], below.channels[:layer] = mask.heads[:layer], mask.channels[:layer]
    pruned = copy.deepcopy(model)
    apply_mask(pruned, below, s)
    o_in, down_in = labelled_inputs(pruned)[layer]
    lyr = model.model.layers[layer]
    o_cols = (lyr.self_attn.o_proj.weight.double().abs().mean(0) * o_in.norm(dim=0)).tolist()
    down_cols = (lyr.mlp.down_proj.weight.double().abs().mean(0) * down_in.norm(dim=0)).tolist()
    width = len(o_cols) // s.attention_units
    return [sum(o_cols[u * width:(u + 1) * width]) for u in range(s.attention_units)], down_cols


def assert_layerwise_wanda(model, s, mask: Mask) -> None:
    """In every prunable layer the pruned units are the lowest by Wanda-sp scores taken on the
    model pruned below that layer."""
    units = mask.attention_units(s)
    for layer in s.prunable_layers:
        attention, channels = brute_force_wanda(model, s, mask, layer)
        n_units, n_channels = int((~units[layer]).sum()), int((~mask.channels[layer]).sum())
        assert set(torch.nonzero(~units[layer]).flatten().tolist()) == set(torch.tensor(attention).argsort()[:n_units].tolist())
        assert set(torch.nonzero(~mask.channels[layer]).flatten().tolist()) == set(torch.tensor(channels).argsort()[:n_channels].tolist())


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_wanda_sp_prunes_each_layer_on_the_pruned_model_at_one_ratio(family, unit):
    from resp.baselines import sequential_wanda_mask

    model = MAKERS[family]()
    s = structures_for(model, unit)
    masks = baseline_masks("wanda_sp", model, s, TARGETS, calibration())
    assert list(masks) == TARGETS
    for target, mask in masks.items():
        kept = mask.kept_per_layer()
        assert all(kept[i] == {"heads": 4, "channels": 40} for i in s.protected)
        k = 40 - kept[s.prunable_layers[0]]["channels"]
        counts = layer_counts(s, k)
        units = mask.attention_units(s)
        assert {i: (int((~units[i]).sum()), 40 - kept[i]["channels"]) for i in s.prunable_layers} == counts
        assert mask.sparsity(s) >= target
        assert_layerwise_wanda(model, s, mask)
        smaller = sequential_wanda_mask(model, calibration(), s, layer_counts(s, k - 1), "check")
        assert smaller.sparsity(s) < target   # one grid step less misses the target
    # statistics through the pruned model differ from one dense pass: the masks do too somewhere
    stats = calibration_stats(model, s)
    dense_scores = wanda_sp_scores(model, s, stats)
    one_pass = {t: uniform_mask(*dense_scores, s, layer_counts(s, 40 - masks[t].kept_per_layer()[0]["channels"]))
                for t in TARGETS}
    assert any(one_pass[t].digest() != masks[t].digest() for t in TARGETS)


def test_uniform_counts_round_heads_with_the_channel_fraction(tiny_llama):
    s = structures_for(tiny_llama, "query_head")
    # 14 of 40 channels = 35% of 4 heads = 1.4 -> 1 head; 15 -> 1.5 -> 2 heads (halves round up)
    assert layer_counts(s, 14) == {0: (1, 14), 1: (1, 14), 2: (1, 14)}
    assert layer_counts(s, 15)[1] == (2, 15)
    offsets = torch.tensor([0.1, 0.0, -0.1, 0.0], dtype=torch.float64)
    assert layer_counts(s, 15, offsets) == {0: (1, 11), 1: (2, 15), 2: (2, 19)}   # round(15 - o*40)
    assert layer_counts(s, 3, offsets)[0] == (0, 0)                               # clamped at 0
    attention = torch.arange(16, dtype=torch.float64).view(4, 4)
    channels = torch.arange(160, dtype=torch.float64).view(4, 40).flip(-1)
    mask = uniform_mask(attention, channels, s, layer_counts(s, 15))
    assert mask.heads[1].tolist() == [False, False, True, True]
    assert mask.channels[1].tolist() == [True] * 25 + [False] * 15   # flipped scores: highest indices are lowest
    assert mask.heads[3].all() and mask.channels[3].all()             # layer 3 is protected


def test_owl_offsets_by_hand(tiny_llama):
    s = structures_for(tiny_llama, "query_head")   # layer 3 protected
    offsets = owl_offsets(torch.tensor([0.0, 0.1, 0.3, 0.9], dtype=torch.float64), s, 0.08)
    scaled = [0.0, 0.1 / 0.3 * 0.16, 0.16]          # (d - min) / (max - min) * 2 lambda over layers 0-2
    mean = sum(scaled) / 3
    torch.testing.assert_close(offsets, torch.tensor([v - mean for v in scaled] + [0.0], dtype=torch.float64))
    flat = owl_offsets(torch.tensor([0.2, 0.2, 0.2, 0.0], dtype=torch.float64), s, 0.08)
    assert flat.tolist() == [0.0, 0.0, 0.0, 0.0]


@torch.no_grad()
def test_owl_outlier_ratios_equal_a_brute_force_count():
    model = make_llama()
    model.model.layers[1].mlp.up_proj.weight[:, :3] *= 60.0   # plant outliers in layer 1
    s = structures_for(model, "query_head")
    stats = layer_by_layer(model, calibration(), s, projections=("q_proj", "o_proj", "gate_proj", "down_proj"))[0]
    ratios = owl_outlier_ratios(model, s, stats, 5.0)
    per_sequence = [manual_projection_inputs(model, x) for x in FIRST + SECOND]
    streams = hidden_states(model)
    for i in range(s.num_layers):
        layer = model.model.layers[i]
        attn_in = torch.cat([layer.input_layernorm(h[i]) for h in streams]).double()
        o_in = torch.cat([seq[i][0][PROMPT:] for seq in per_sequence])
        down_in = torch.cat([seq[i][1][PROMPT:] for seq in per_sequence])
        mid = torch.cat([post_attention_inputs(model, x, i) for x in FIRST + SECOND])
        norms = {"q": attn_in.norm(dim=0), "o": o_in.norm(dim=0), "g": mid.norm(dim=0), "d": down_in.norm(dim=0)}
        weights = [(layer.self_attn.q_proj, "q"), (layer.self_attn.k_proj, "q"), (layer.self_attn.v_proj, "q"),
                   (layer.self_attn.o_proj, "o"), (layer.mlp.gate_proj, "g"), (layer.mlp.up_proj, "g"),
                   (layer.mlp.down_proj, "d")]
        values = [v for w, key in weights for v in (w.weight.double().abs() * norms[key]).flatten().tolist()]
        mean = sum(values) / len(values)
        expected = sum(v > 5.0 * mean for v in values) / len(values)
        assert abs(float(ratios[i]) - expected) < 1e-9
    assert ratios[1] == ratios.max() and ratios[1] > 0


def hidden_states(model) -> list[list[torch.Tensor]]:
    """Per sequence, per layer: the residual stream entering that layer, labelled tokens only."""
    return [[h[0][PROMPT:] for h in model(x[None], output_hidden_states=True).hidden_states] for x in FIRST + SECOND]


def post_attention_inputs(model, x: torch.Tensor, i: int) -> torch.Tensor:
    """The input of gate_proj/up_proj in layer i for one sequence (labelled tokens)."""
    captured = {}
    handle = model.model.layers[i].mlp.gate_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0][0]))
    try:
        model(x[None])
    finally:
        handle.remove()
    return captured["x"][PROMPT:].double()


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_owl_sp_spreads_sparsity_by_outliers_and_prunes_like_wanda(family):
    model = MAKERS[family]()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[:, :3] *= 60.0   # layer 2: most outliers, pruned least
    s = structures_for(model, "query_head")
    stats = layer_by_layer(model, calibration(), s, projections=("q_proj", "o_proj", "gate_proj", "down_proj"))[0]
    offsets = owl_offsets(owl_outlier_ratios(model, s, stats, 5.0), s, 0.08)
    assert offsets[2] == offsets.max() > 0
    masks = baseline_masks("owl_sp", model, s, [0.3, 0.5], calibration(), owl_outlier_m=5.0, owl_lambda=0.08)
    for target, mask in masks.items():
        assert mask.sparsity(s) >= target
        pruned_channels = {i: int((~mask.channels[i]).sum()) for i in s.prunable_layers}
        ks = [k for k in range(60) if {i: c for i, (_, c) in layer_counts(s, k, offsets).items()} == pruned_channels]
        assert ks, f"channel counts {pruned_channels} are not one OWL grid step"
        assert pruned_channels[2] < pruned_channels[0]
        assert_layerwise_wanda(model, s, mask)


def ranking_scores(method: str, model, s, seed: int):
    return magnitude_scores(model, s, "paper") if method == "magnitude" else random_scores(s, seed)


def restore(mask: Mask, kind: int, layer: int, index: int, s) -> Mask:
    restored = mask.clone()
    if kind == 1:
        restored.channels[layer, index] = True
    elif s.attention_unit == "kv_group":
        restored.heads[layer, index * s.n_rep:(index + 1) * s.n_rep] = True
    else:
        restored.heads[layer, index] = True
    return restored


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("family", sorted(MAKERS))
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_weight_baselines_reach_each_target_minimally_and_nested(method, family, unit):
    model = MAKERS[family]()
    s = structures_for(model, unit)
    masks = baseline_masks(method, model, s, TARGETS, None, seed=5)
    attention, channels = ranking_scores(method, model, s, seed=5)
    previous = Mask.dense(s)
    for target in TARGETS:
        mask = masks[target]
        assert mask.sparsity(s) >= target
        assert previous.contains(mask)
        assert mask.heads[list(s.protected)].all() and mask.channels[list(s.protected)].all()
        assert_lowest_pruned(mask, previous, attention.tolist(), channels.tolist(), s)
        prev_units, units = previous.attention_units(s), mask.attention_units(s)
        new = [(float(attention[i, a]), 0, i, a) for i, a in torch.nonzero(prev_units & ~units).tolist()]
        new += [(float(channels[i, c]), 1, i, c) for i, c in torch.nonzero(previous.channels & ~mask.channels).tolist()]
        _, kind, layer, index = max(new)
        assert restore(mask, kind, layer, index, s).sparsity(s) < target   # the last pruned unit was needed
        previous = mask


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("normalize", ["paper", "none", "params"])
@torch.no_grad()
def test_magnitude_scores_by_hand(unit, normalize):
    model = make_qwen3()
    s = structures_for(model, unit)
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    for h in range(4):   # q rows of head h: |w| = h+1; o columns: |w| = 2
        attn.q_proj.weight[h * 8:(h + 1) * 8] = (h + 1) * alternating_signs((8, 24))
    attn.o_proj.weight.fill_(-2.0)
    attn.k_proj.weight.fill_(0.5)
    attn.v_proj.weight.fill_(-0.25)
    mlp.gate_proj.weight.fill_(1.0)
    mlp.up_proj.weight.copy_(-(torch.arange(40) + 1).float()[:, None].expand(40, 24))
    mlp.down_proj.weight.zero_()
    attention, channels = magnitude_scores(model, s, normalize)
    if unit == "query_head":   # 8*24*(h+1) + 24*8*2 = 192 (h+3)
        raw = [192.0 * (h + 3) for h in range(4)]
    else:                      # heads 2j, 2j+1 plus k/v rows 8*24*(0.5+0.25) = 144
        raw = [192.0 * (4 * j + 7) + 144.0 for j in range(2)]
    divisor = {"paper": (4 * 8 * 24, 3 * 40), "none": (1, 1),
               "params": (s.attention_unit_params, 3 * 24)}[normalize]
    torch.testing.assert_close(attention[1], torch.tensor(raw, dtype=torch.float64) / divisor[0])
    # channel c: gate 24*1 + up 24*(c+1) + down 0 = 24 (c+2)
    torch.testing.assert_close(channels[1], torch.tensor([24.0 * (c + 2) for c in range(40)], dtype=torch.float64) / divisor[1])


def test_random_masks_depend_only_on_the_seed(tiny_llama):
    s = structures_for(tiny_llama, "query_head")
    first = baseline_masks("random", tiny_llama, s, TARGETS, None, seed=3)
    again = baseline_masks("random", tiny_llama, s, TARGETS, None, seed=3)
    other = baseline_masks("random", tiny_llama, s, TARGETS, None, seed=4)
    assert [m.digest() for m in first.values()] == [m.digest() for m in again.values()]
    assert all(first[t].digest() != other[t].digest() for t in TARGETS)


@pytest.mark.parametrize("scorer", ["wanda_sp", "owl_sp", "flap"])
def test_activation_baselines_are_deterministic(scorer, tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head")
    first = baseline_masks(scorer, tiny_qwen3, s, [0.2, 0.4], calibration())
    again = baseline_masks(scorer, tiny_qwen3, s, [0.2, 0.4], calibration())
    assert [m.digest() for m in first.values()] == [m.digest() for m in again.values()]


@torch.no_grad()
def test_flap_bias_compensation_is_exact_at_the_mean_input():
    dense = make_llama(attention_bias=True, mlp_bias=True)
    s = structures_for(dense, "query_head")
    stats = calibration_stats(dense, s)
    mask = baseline_masks("flap", dense, s, [0.3], calibration())[0.3]
    biases = flap_bias_compensation(dense, mask, stats, s)
    assert sorted(biases) == [i for i in s.prunable_layers if not (mask.heads[i].all() and mask.channels[i].all())]
    pruned = copy.deepcopy(dense)
    apply_mask(pruned, Mask(mask.heads, mask.channels), s)   # zeroing only; the compensation is added next
    info = apply_bias_compensation(pruned, biases, add_bias=False)
    assert info["applied"] == [f"{i}.{p}" for i in sorted(biases) for p in ("o_proj", "down_proj")]
    assert info["created"] == [] and info["skipped"] == []
    g = torch.Generator().manual_seed(0)
    for i in biases:
        for name, removed in (("o_proj", ~mask.heads[i].repeat_interleave(8)), ("down_proj", ~mask.channels[i])):
            before = getattr(dense.model.layers[i].self_attn if name == "o_proj" else dense.model.layers[i].mlp, name)
            after = getattr(pruned.model.layers[i].self_attn if name == "o_proj" else pruned.model.layers[i].mlp, name)
            x = torch.randn(5, before.in_features, generator=g)
            at_mean = x.clone()
            at_mean[:, removed] = stats.mean(name)[i][removed].float()
            # pruned + compensated layer == dense layer fed the removed inputs at their calibration mean
            torch.testing.assert_close(after(x), before(at_mean), rtol=1e-5, atol=1e-5)
            if removed.any():
                assert not torch.allclose(after.bias, before.bias)


@torch.no_grad()
def test_bias_compensation_not_applied_without_bias_unless_asked():
    model = make_qwen3()
    s = structures_for(model, "kv_group")
    stats = calibration_stats(model, s)
    mask = baseline_masks("flap", model, s, [0.3], calibration())[0.3]
    biases = flap_bias_compensation(model, mask, stats, s)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = apply_bias_compensation(model, biases, add_bias=False)
    assert info["message"] == NO_BIAS_MESSAGE
    assert info["applied"] == [] and len(info["skipped"]) == 2 * len(biases)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    info = apply_bias_compensation(model, biases, add_bias=True)
    assert info["created"] == info["applied"] and len(info["applied"]) == 2 * len(biases)
    layer = next(iter(biases))
    assert torch.equal(model.model.layers[layer].mlp.down_proj.bias, biases[layer]["down_proj"].float())
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_baseline_errors(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head")
    with pytest.raises(BaselineError, match="baseline scorer 'slicegpt' is unknown; valid: flap, magnitude, owl_sp, random, wanda_sp"):
        baseline_masks("slicegpt", tiny_qwen3, s, [0.2], None)
    for scorer in ("wanda_sp", "owl_sp", "flap"):
        with pytest.raises(BaselineError, match=f"scorer '{scorer}' needs calibration batches: declare calibration self, gold or generic"):
            baseline_masks(scorer, tiny_qwen3, s, [0.2], None)
    with pytest.raises(BaselineError, match="scorer 'magnitude' reads no calibration data: declare calibration none"):
        baseline_masks("magnitude", tiny_qwen3, s, [0.2], calibration())
    with pytest.raises(BaselineError, match=r"normalize 'sum' must be one of \['none', 'paper', 'params'\]"):
        baseline_masks("magnitude", tiny_qwen3, s, [0.2], None, normalize="sum")
    wider = make_qwen3(intermediate_size=48)
    foreign = calibration_stats(wider, structures_for(wider, "query_head"))
    with pytest.raises(BaselineError, match=r"input statistics of down_proj have shape \[4, 48\], not \[4, 40\] for this model"):
        flap_scores(tiny_qwen3, s, foreign)
    one_token = layer_by_layer(tiny_qwen3, [left_padded(sequences(0, [1]))], s)[0]
    with pytest.raises(BaselineError, match="method 'flap' needs at least 2 calibration tokens, got 1"):
        flap_scores(tiny_qwen3, s, one_token)
    for scorer in BASELINES:
        batches = calibration() if scorer in ("wanda_sp", "owl_sp", "flap") else None
        with pytest.raises(MaskError, match="target sparsity 0.9 cannot be reached with protected layers"):
            baseline_masks(scorer, tiny_qwen3, s, [0.2, 0.9], batches)


@torch.no_grad()
def test_flap_masks_carry_bias_compensation_into_evaluation_and_compact_exports(tmp_path):
    from resp.checkpoints.compact import compact_model
    from resp.masks import MaskedModel

    dense = make_llama(attention_bias=True, mlp_bias=True)
    s = structures_for(dense, "query_head")
    stats = calibration_stats(copy.deepcopy(dense).double(), s)   # flap_statistics_dtype float64 (the default)
    mask = baseline_masks("flap", dense, s, [0.3], calibration())[0.3]
    assert sorted(mask.biases) == ["down_proj", "o_proj"]
    # the mask's tensors are exactly flap_bias_compensation's vectors (zero where a layer lost nothing)
    expected = flap_bias_compensation(dense, mask, stats, s)
    for layer in range(s.num_layers):
        for name in ("o_proj", "down_proj"):
            want = expected[layer][name].float() if layer in expected else torch.zeros(s.hidden_size)
            assert torch.equal(mask.biases[name][layer], want)
    # applying the mask == zeroing + apply_bias_compensation, and survives a save/load round trip
    by_hand = copy.deepcopy(dense)
    apply_mask(by_hand, Mask(mask.heads, mask.channels), s)
    apply_bias_compensation(by_hand, expected, add_bias=False)
    loaded, _ = Mask.load(mask.save(tmp_path / "flap.safetensors", {}))
    assert loaded.digest() == mask.digest() != Mask(mask.heads, mask.channels).digest()
    masked = MaskedModel(copy.deepcopy(dense), s, keep_dense=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for _ in range(2):   # setting the mask twice adds the compensation once
        model = masked.set(loaded)
    torch.testing.assert_close(model(ids).logits, by_hand(ids).logits)
    compact, _ = compact_model(dense, loaded, s)
    torch.testing.assert_close(compact(ids).logits, by_hand(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep_dense=True"):
        MaskedModel(copy.deepcopy(dense), s, keep_dense=False).set(loaded)


def test_flap_statistics_dtype_model_uses_the_models_own_forward():
    dense = make_llama()
    s = structures_for(dense, "query_head")
    mask = baseline_masks("flap", dense, s, [0.3], calibration(), flap_statistics_dtype="model")[0.3]
    expected = flap_bias_compensation(dense, mask, calibration_stats(dense, s), s)
    for layer, per_proj in expected.items():
        for name, value in per_proj.items():
            assert torch.equal(mask.biases[name][layer], value.float())


FLAP_DIGEST = """
import sys
sys.path.insert(0, sys.argv[1])
from test_baselines import baseline_masks, calibration, make_llama, structures_for
dense = make_llama()
print(baseline_masks("flap", dense, structures_for(dense, "query_head"), [0.3], calibration())[0.3].digest())
"""


def test_flap_compensation_bytes_do_not_depend_on_the_cpu_kernels():
    """Float64 statistics: the same mask digest (compensation included) with AVX2 kernels as with the
    machine's widest (AVX-512 here, where float32 statistics change the compensation's last bits)."""
    def digest(extra_env: dict) -> str:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
        run = subprocess.run([sys.executable, "-c", FLAP_DIGEST, str(Path(__file__).parent)], env=env,
                             capture_output=True, text=True, check=True)
        return run.stdout.split()[-1]

    avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert digest({}) == digest(avx2)


def test_flap_nobias_carries_no_compensation(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head")
    with_bias = baseline_masks("flap", tiny_qwen3, s, [0.2], calibration())[0.2]
    without = baseline_masks("flap", tiny_qwen3, s, [0.2], calibration(), bias_compensation=False)[0.2]
    assert without.biases is None and sorted(with_bias.biases) == ["down_proj", "o_proj"]
    # the compensation changes no pruning decision, only what is added back
    assert torch.equal(without.heads, with_bias.heads) and torch.equal(without.channels, with_bias.channels)


@torch.no_grad()
def test_flap_compensation_on_a_model_without_output_biases_creates_them(tmp_path):
    """Qwen3 has no o_proj/down_proj bias: applying a compensated mask creates them (FLAP's own
    modeling code gives LLaMA these biases), the compact export carries them with its smaller
    shapes and the same logits, the masked export refuses, and re-setting another mask removes them."""
    from resp.checkpoints.compact import compact_model
    from resp.checkpoints.masked import masked_model
    from resp.checkpoints.slicing import ExportError
    from resp.masks import MaskedModel

    dense = make_qwen3()
    s = structures_for(dense, "query_head")
    stats = calibration_stats(dense, s)
    mask = baseline_masks("flap", dense, s, [0.3], calibration())[0.3]
    expected = flap_bias_compensation(dense, mask, stats, s)
    by_hand = copy.deepcopy(dense)
    apply_mask(by_hand, Mask(mask.heads, mask.channels), s)
    info = apply_bias_compensation(by_hand, expected, add_bias=True)
    assert info["created"] == info["applied"] == [f"{i}.{p}" for i in sorted(expected) for p in ("o_proj", "down_proj")]
    masked = MaskedModel(copy.deepcopy(dense), s, keep_dense=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model = masked.set(mask)
    torch.testing.assert_close(model(ids).logits, by_hand(ids).logits)
    no_comp = Mask(mask.heads, mask.channels)
    model = masked.set(no_comp)   # the created biases go with the mask that made them
    assert all(layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None for layer in model.model.layers)
    plain = copy.deepcopy(dense)
    apply_mask(plain, no_comp, s)
    torch.testing.assert_close(model(ids).logits, plain(ids).logits)
    compact, _ = compact_model(dense, mask, s)
    assert compact.config.o_bias and compact.config.down_bias and not compact.config.mlp_bias
    torch.testing.assert_close(compact(ids).logits, by_hand(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="FLAP bias compensation for o_proj/down_proj, which this model's stock config "
                                          "has no bias for: export it with --format compact"):
        masked_model(dense, mask, s)


def test_a_compensated_mask_refuses_the_uniform_export():
    from resp.checkpoints.slicing import ExportError
    from resp.checkpoints.uniform import uniform_model

    dense = make_llama(attention_bias=True, mlp_bias=True)
    s = structures_for(dense, "query_head")
    mask = baseline_masks("flap", dense, s, [0.3], calibration())[0.3]
    with pytest.raises(ExportError, match="export it as masked or compact"):
        uniform_model(dense, mask, s, 8)
