"""Tests for resp.baselines: input statistics, Wanda-sp, FLAP (+ bias compensation), magnitude, random."""

from __future__ import annotations

import copy
import math

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
    collect_input_stats,
    flap_bias_compensation,
    flap_scores,
    magnitude_scores,
    random_scores,
    standardize,
    uniform_mask,
    wanda_sp_scores,
)
from resp.masks import Mask, MaskError, apply_mask
from resp.structures import structures_for

UNITS = ["query_head", "kv_group"]
TARGETS = [0.1, 0.2, 0.3, 0.5]


def left_padded(sequences: list[torch.Tensor]) -> dict:
    width = max(len(x) for x in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, x in enumerate(sequences):
        ids[row, width - len(x):] = x
        attention_mask[row, width - len(x):] = 1
    return {"input_ids": ids, "attention_mask": attention_mask}


def sequences(seed: int, lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g) for n in lengths]


def calibration_stats(model, s) -> InputStats:
    return collect_input_stats(model, [left_padded(sequences(7, [9, 5, 12])), left_padded(sequences(8, [6, 11]))], s)


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


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_input_stats_equal_manual_forward_and_ignore_left_padding(family):
    model = MAKERS[family]()
    s = structures_for(model, "query_head")
    first, second = sequences(3, [7, 4]), sequences(4, [9])
    stats = collect_input_stats(model, [left_padded(first), left_padded(second)], s)
    assert stats.tokens == 7 + 4 + 9
    per_sequence = [manual_projection_inputs(model, x) for x in first + second]
    for i in range(s.num_layers):
        o_in = torch.cat([seq[i][0] for seq in per_sequence])
        down_in = torch.cat([seq[i][1] for seq in per_sequence])
        torch.testing.assert_close(stats.o_sum[i], o_in.sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.o_sumsq[i], o_in.pow(2).sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.down_sum[i], down_in.sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.down_sumsq[i], down_in.pow(2).sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.variance("down_proj")[i], down_in.var(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.l2("o_proj")[i], o_in.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_input_stats_reject_bad_batches(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head")
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(BaselineError, match=r"calibration batch lacks \['attention_mask'\]"):
        collect_input_stats(tiny_qwen3, [{"input_ids": ids}], s)
    with pytest.raises(BaselineError, match="hold no non-padding tokens"):
        collect_input_stats(tiny_qwen3, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}], s)
    # hooks were removed even though the run failed: a plain forward is untouched
    assert not adapter_for(tiny_qwen3.config).o_proj(tiny_qwen3.model.layers[0])._forward_pre_hooks


def stats_by_hand(s, tokens: int) -> InputStats:
    L, width, I = s.num_layers, s.num_heads * s.head_dim, s.intermediate_size
    zeros = lambda w: torch.zeros(L, w, dtype=torch.float64)  # noqa: E731
    return InputStats(zeros(width), zeros(width), zeros(I), zeros(I), tokens)


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
    stats.o_sumsq[1] = 4.0                                           # ||X_c|| = 2 for every o_proj column
    stats.down_sumsq[1] = (torch.arange(40) % 3 + 1).double() ** 2   # ||X_c|| = c%3 + 1
    attention, channels = wanda_sp_scores(model, s, stats)
    # head h: 8 columns * mean|W| (h+1) * norm 2 = 16(h+1); KV group j sums heads 2j, 2j+1
    expected = [16.0, 32.0, 48.0, 64.0] if unit == "query_head" else [48.0, 112.0]
    assert attention[1].tolist() == expected
    assert channels[1].tolist() == [(c + 1) * (c % 3 + 1) for c in range(40)]
    assert attention[0].abs().sum() == 0 and channels[2].abs().sum() == 0   # zero input norms elsewhere


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("family", sorted(MAKERS))
def test_wanda_sp_masks_are_uniform_minimal_and_nested(family, unit):
    model = MAKERS[family]()
    s = structures_for(model, unit)
    stats = calibration_stats(model, s)
    masks = baseline_masks("wanda_sp", model, s, TARGETS, stats, seed=0, normalize="paper")
    attention, channels = wanda_sp_scores(model, s, stats)
    assert list(masks) == TARGETS
    for target, mask in masks.items():
        kept = mask.kept_per_layer()
        first = kept[s.prunable_layers[0]]
        assert all(kept[i] == first for i in s.prunable_layers)   # the same counts in every prunable layer
        assert all(kept[i] == {"heads": 4, "channels": 40} for i in s.protected)
        assert mask.sparsity(s) >= target
        pruned_channels = 40 - first["channels"]
        assert mask.digest() == uniform_mask(attention, channels, s, pruned_channels).digest()
        # one grid step less would miss the target: the last step was needed
        assert uniform_mask(attention, channels, s, pruned_channels - 1).sparsity(s) < target
        units = mask.attention_units(s)
        for i in s.prunable_layers:   # per layer, the pruned units are the lowest-scoring ones
            if (~units[i]).any() and units[i].any():
                assert attention[i][~units[i]].max() <= attention[i][units[i]].min()
            assert channels[i][~mask.channels[i]].max() <= channels[i][mask.channels[i]].min()
    for smaller, larger in zip(TARGETS, TARGETS[1:]):
        assert masks[smaller].contains(masks[larger])


def test_uniform_mask_rounds_heads_with_the_channel_fraction(tiny_llama):
    s = structures_for(tiny_llama, "query_head")
    attention = torch.arange(16, dtype=torch.float64).view(4, 4)
    channels = torch.arange(160, dtype=torch.float64).view(4, 40).flip(-1)
    # 14 of 40 channels = 35% of 4 heads = 1.4 -> 1 head; 15 -> 1.5 -> 2 heads (halves round up)
    assert uniform_mask(attention, channels, s, 14).kept_per_layer()[1] == {"heads": 3, "channels": 26}
    mask = uniform_mask(attention, channels, s, 15)
    assert mask.heads[1].tolist() == [False, False, True, True]
    assert mask.channels[1].tolist() == [True] * 25 + [False] * 15   # flipped scores: highest indices are lowest
    assert mask.heads[3].all() and mask.channels[3].all()             # layer 3 is protected


def test_standardize_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    std = math.sqrt(5 / 3)   # unbiased: sum of squared deviations 5 over n-1 = 3
    expected = [[-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(standardize(scores), torch.tensor(expected, dtype=torch.float64))
    assert standardize(torch.tensor([[3.0], [7.0]])).tolist() == [[0.0], [0.0]]   # one unit: nothing to compare


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
    stats.o_sumsq[2] = 8.0                                # mean 0: variance 8 / (5-1) = 2
    stats.down_sum[2] = 5.0
    stats.down_sumsq[2] = 5.0 + 4.0 * (torch.arange(40) % 2).double()   # variance (sumsq - 25/5)/4 = c%2
    attention, channels = flap_scores(model, s, stats)
    # head h: 8 columns * variance 2 * squared column norm 24(h+1)^2 = 384 (h+1)^2
    expected = [384.0, 1536.0, 3456.0, 6144.0] if unit == "query_head" else [1920.0, 9600.0]
    assert attention[2].tolist() == expected
    assert channels[2].tolist() == [24.0 * (c % 2) for c in range(40)]


def ranking_scores(method: str, model, s, stats, seed: int):
    if method == "flap":
        attention, channels = flap_scores(model, s, stats)
        return standardize(attention), standardize(channels)
    if method == "magnitude":
        return magnitude_scores(model, s, "paper")
    return random_scores(s, seed)


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
@pytest.mark.parametrize("method", ["flap", "magnitude", "random"])
def test_global_baselines_reach_each_target_minimally_and_nested(method, family, unit):
    model = MAKERS[family]()
    s = structures_for(model, unit)
    stats = calibration_stats(model, s)
    masks = baseline_masks(method, model, s, TARGETS, stats, seed=5, normalize="paper")
    attention, channels = ranking_scores(method, model, s, stats, seed=5)
    previous = Mask.dense(s)
    for target in TARGETS:
        mask = masks[target]
        assert mask.sparsity(s) >= target
        assert previous.contains(mask)
        assert mask.heads[list(s.protected)].all() and mask.channels[list(s.protected)].all()
        prev_units, units = previous.attention_units(s), mask.attention_units(s)
        new = [(float(attention[i, a]), 0, i, a) for i, a in torch.nonzero(prev_units & ~units).tolist()]
        new += [(float(channels[i, c]), 1, i, c) for i, c in torch.nonzero(previous.channels & ~mask.channels).tolist()]
        kept = [float(attention[i, a]) for i, a in torch.nonzero(units).tolist() if i in s.prunable_layers]
        kept += [float(channels[i, c]) for i, c in torch.nonzero(mask.channels).tolist() if i in s.prunable_layers]
        assert new, f"target {target} pruned nothing new"
        assert max(score for score, *_ in new) <= min(kept)   # the globally lowest were pruned
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
    first = baseline_masks("random", tiny_llama, s, TARGETS, None, seed=3, normalize="paper")
    again = baseline_masks("random", tiny_llama, s, TARGETS, None, seed=3, normalize="paper")
    other = baseline_masks("random", tiny_llama, s, TARGETS, None, seed=4, normalize="paper")
    assert [m.digest() for m in first.values()] == [m.digest() for m in again.values()]
    assert all(first[t].digest() != other[t].digest() for t in TARGETS)


@torch.no_grad()
def test_flap_bias_compensation_is_exact_at_the_mean_input():
    dense = make_llama(attention_bias=True, mlp_bias=True)
    s = structures_for(dense, "query_head")
    stats = calibration_stats(dense, s)
    mask = baseline_masks("flap", dense, s, [0.3], stats, seed=0, normalize="paper")[0.3]
    biases = flap_bias_compensation(dense, mask, stats, s)
    assert sorted(biases) == [i for i in s.prunable_layers if not (mask.heads[i].all() and mask.channels[i].all())]
    pruned = copy.deepcopy(dense)
    apply_mask(pruned, mask, s)
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
    mask = baseline_masks("flap", model, s, [0.3], stats, seed=0, normalize="paper")[0.3]
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
    with pytest.raises(BaselineError, match="baseline method 'slicegpt' is unknown; valid: flap, magnitude, random, wanda_sp"):
        baseline_masks("slicegpt", tiny_qwen3, s, [0.2], None, seed=0, normalize="paper")
    for method in ("wanda_sp", "flap"):
        with pytest.raises(BaselineError, match=f"method '{method}' needs input statistics: call collect_input_stats"):
            baseline_masks(method, tiny_qwen3, s, [0.2], None, seed=0, normalize="paper")
    with pytest.raises(BaselineError, match=r"normalize 'sum' must be one of \['none', 'paper', 'params'\]"):
        baseline_masks("magnitude", tiny_qwen3, s, [0.2], None, seed=0, normalize="sum")
    wider = make_qwen3(intermediate_size=48)
    foreign = calibration_stats(wider, structures_for(wider, "query_head"))
    with pytest.raises(BaselineError, match=r"down_proj\[4, 48\] do not fit this model \(o_proj\[4, 32\]/down_proj\[4, 40\]\)"):
        baseline_masks("flap", tiny_qwen3, s, [0.2], foreign, seed=0, normalize="paper")
    one_token = collect_input_stats(tiny_qwen3, [left_padded(sequences(0, [1]))], s)
    with pytest.raises(BaselineError, match="method 'flap' needs at least 2 calibration tokens, got 1"):
        baseline_masks("flap", tiny_qwen3, s, [0.2], one_token, seed=0, normalize="paper")
    stats = calibration_stats(tiny_qwen3, s)
    for method in BASELINES:
        with pytest.raises(MaskError, match="target sparsity 0.9 cannot be reached with protected layers"):
            baseline_masks(method, tiny_qwen3, s, [0.2, 0.9], stats, seed=0, normalize="paper")


def test_target_zero_is_the_dense_mask(tiny_llama):
    s = structures_for(tiny_llama, "kv_group")
    stats = calibration_stats(tiny_llama, s)
    for method in BASELINES:
        masks = baseline_masks(method, tiny_llama, s, [0.0], stats, seed=0, normalize="paper")
        assert masks[0.0].digest() == Mask.dense(s).digest()
