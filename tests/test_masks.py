import pytest
import torch

from conftest import make_llama, make_qwen3
from resp.masks import Mask, MaskError, apply_mask, check_mask_fits, prune_step
from resp.structures import StructureError, default_protected, structures_for


def hook_masked_logits(model, mask, s, ids):
    """Independent masking: zero pruned heads' outputs before o_proj and pruned channels before down_proj."""
    hooks = []
    for i, layer in enumerate(model.model.layers):
        keep_heads = mask.heads[i].repeat_interleave(s.head_dim).float()
        keep_ch = mask.channels[i].float()
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, k=keep_heads: (a[0] * k,)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, k=keep_ch: (a[0] * k,)))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("make", [make_qwen3, make_llama])
def test_masked_forward_equals_zeroed_weights(make):
    model = make()
    s = structures_for(model, "query_head", [])
    mask = Mask.dense(s)
    mask.heads[0, [0, 1]] = False      # a whole KV group (heads 0,1 share kv head 0) -> k/v rows zeroed too
    mask.heads[2, 3] = False
    mask.channels[1, :20] = False
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = hook_masked_logits(model, mask, s, ids)
    apply_mask(model, mask, s)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(model.model.layers[0].self_attn.k_proj.weight[:8] == 0)
    assert torch.any(model.model.layers[2].self_attn.k_proj.weight[8:] != 0)


def test_sparsity_counts_zeroed_weights_exactly(tiny_model):
    s = structures_for(tiny_model, "query_head", [3])
    mask = Mask.dense(s)
    mask.heads[0, [0, 1]] = False
    mask.heads[1, 2] = False
    mask.channels[2, :7] = False
    # hidden 24, head_dim 8: head = 2*8*24 = 384; dead kv group = 2*8*24 = 384; channel = 3*24 = 72
    assert mask.pruned_params(s) == 3 * 384 + 384 + 7 * 72
    apply_mask(tiny_model, mask, s)
    zeros = sum(int((p == 0).sum()) for p in tiny_model.model.layers.parameters())
    assert zeros == mask.pruned_params(s)
    assert mask.sparsity(s) == pytest.approx(zeros / sum(p.numel() for p in tiny_model.model.layers.parameters()))


def test_prune_step_global_ranking_exact(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [3])
    att = torch.arange(16, dtype=torch.float64).view(4, 4) + 100   # all heads score >= 100
    ch = torch.full((4, 40), 50.0, dtype=torch.float64)
    ch[1, 5], ch[2, 7] = 1.0, 2.0                                 # two cheapest units are channels
    att[2, 1] = 3.0                                                # then head 1 of layer 2
    att[3, 0] = 0.0                                                # protected layer: never a candidate
    target = (2 * s.channel_params + s.head_params) / s.decoder_params
    new = prune_step(att, ch, Mask.dense(s), s, target)
    assert (~new.channels).nonzero().tolist() == [[1, 5], [2, 7]]
    assert (~new.heads).nonzero().tolist() == [[2, 1]]
    assert new.sparsity(s) == pytest.approx(target)


def test_prune_step_is_nested_and_protects_layers(tiny_llama):
    s = structures_for(tiny_llama, "kv_group", None)
    assert s.protected == default_protected(4) == (3,)
    g = torch.Generator().manual_seed(0)
    att, ch = torch.rand(4, 2, generator=g, dtype=torch.float64), torch.rand(4, 40, generator=g, dtype=torch.float64)
    m1 = prune_step(att, ch, Mask.dense(s), s, 0.2)
    m2 = prune_step(att, ch, m1, s, 0.4)
    assert m1.contains(m2) and not m2.contains(m1)
    assert m2.heads[3].all() and m2.channels[3].all()
    # kv_group: query heads of a group go together
    assert (m2.heads.view(4, 2, 2).all(-1) | ~m2.heads.view(4, 2, 2).any(-1)).all()
    assert 0.4 <= m2.sparsity(s) < 0.4 + s.attention_unit_params / s.decoder_params


def test_unreachable_target_and_bad_protection(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [0, 1, 2])
    with pytest.raises(MaskError, match="cannot be reached with protected layers"):
        prune_step(torch.ones(4, 4), torch.ones(4, 40), Mask.dense(s), s, 0.9)
    with pytest.raises(StructureError, match="nothing is left to prune"):
        structures_for(tiny_qwen3, "query_head", [0, 1, 2, 3])
    with pytest.raises(StructureError, match=r"protected layers \[7\] do not exist"):
        structures_for(tiny_qwen3, "query_head", [7])


def test_mask_roundtrip_digest_and_fit(tmp_path, tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", None)
    mask = Mask.dense(s)
    mask.heads[1, 0] = False
    path = mask.save(tmp_path / "m.safetensors", {"model": {"key": "abc"}})
    loaded, meta = Mask.load(path)
    assert torch.equal(loaded.heads, mask.heads) and loaded.digest() == mask.digest() == meta["digest"]
    check_mask_fits(loaded, s, meta, "abc")
    with pytest.raises(MaskError, match="made for model abc"):
        check_mask_fits(loaded, s, meta, "other")
    other = structures_for(make_qwen3(num_attention_heads=6, num_key_value_heads=3), "query_head", None)
    with pytest.raises(MaskError, match="made for a different model"):
        check_mask_fits(loaded, other)
    bad = Mask.dense(s)
    bad.save(tmp_path / "b.safetensors", {})
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes())
    with pytest.raises(MaskError, match="does not match the digest"):
        Mask.load(tmp_path / "b.safetensors")
