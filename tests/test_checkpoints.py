"""resp.checkpoints: masked, compact and uniform exports against each other, on disk and in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_llama, make_qwen3
from transformers import (AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config)
from typer.testing import CliRunner

from resp.cli import app
from resp.checkpoints import MANIFEST, export_model
from resp.checkpoints.compact import compact_model, compact_plan
from resp.checkpoints.masked import masked_model
from resp.checkpoints.modeling_compact import RespCompactForCausalLM
from resp.checkpoints.slicing import ExportError
from resp.checkpoints.uniform import uniform_model, uniform_shape
from resp.masks import Mask, MaskError
from resp.models import model_identity
from resp.structures import structures_for

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def make_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2: q/k/v biases (no o bias)."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


def make_mistral(seed: int = 0) -> MistralForCausalLM:
    """Mistral with a sliding window shorter than the test prompts."""
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=4)).eval()


def make_llama_biased(seed: int = 0):
    """Llama with attention and MLP biases: o_proj/down_proj biases survive in emptied layers."""
    return make_llama(seed, attention_bias=True, mlp_bias=True)


FAMILIES = {"qwen3": make_qwen3, "llama": make_llama, "qwen2": make_qwen2, "mistral": make_mistral,
            "llama_biased": make_llama_biased}


def uneven_mask(s, dead_layer: int = 2) -> Mask:
    """4 layers x 4 query heads (2 KV groups of 2) x 40 channels, every hard case once.

    layer 0: heads {2} kept: group 0 dead, group 1 keeps one head
    layer 1: heads {0, 1, 3}: groups keep 2 and 1 heads (uneven groups); even channels only
    layer `dead_layer` (0 or 2): no heads at all
    layer 3: dense attention, no MLP channels
    """
    mask = Mask.dense(s)
    mask.heads[0] = torch.tensor([False, False, True, False])
    mask.heads[1] = torch.tensor([True, True, False, True])
    mask.channels[1, 1::2] = False
    mask.heads[dead_layer] = False
    mask.channels[3] = False
    return mask


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request):
    return FAMILIES[request.param]()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_compact_logits_equal_masked(family_model, attention):
    s = structures_for(family_model, "query_head", [])
    mask = uneven_mask(s)
    masked = masked_model(family_model, mask, s)
    compact, plans = compact_model(family_model, mask, s)
    # uneven layers hand either attention function K/V expanded per query head; the stock model
    # uses the same function, since they differ on the fully masked rows of left padding
    for model in (masked, compact):
        model.set_attn_implementation(attention)
        assert model.config._attn_implementation == attention
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # left padding on the first row
    with torch.no_grad():
        want = masked(ids, attention_mask=attention).logits
        got = compact(ids, attention_mask=attention).logits
    assert isinstance(compact, RespCompactForCausalLM) and [p.group_sizes for p in plans] == [[1], [2, 1], [], [2, 2]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the masked copy changed, the base model did not
    assert family_model.model.layers[2].self_attn.q_proj.weight.abs().sum() > 0


@pytest.mark.parametrize("dead_layer", [0, 2])
def test_compact_greedy_generation_equals_masked(family_model, dead_layer):
    s = structures_for(family_model, "query_head", [])
    mask = uneven_mask(s, dead_layer)
    masked = masked_model(family_model, mask, s)
    compact, _ = compact_model(family_model, mask, s)
    ids = torch.randint(3, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(2))
    attention = torch.ones_like(ids)
    ids[0, :2], attention[0, :2] = 0, 0  # left padding: decode steps need the right mask from the cache
    settings = dict(attention_mask=attention, max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = masked.generate(ids, **settings)
    got = compact.generate(ids, **settings)
    assert want.shape == (2, 18)
    assert torch.equal(got, want)


def test_uneven_groups_store_only_kept_heads(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    mask = uneven_mask(s)
    plans = compact_plan(mask, s)
    # layer 0: group 1 alone, holding head 2; layer 1: group 0 holds heads 0, 1 and group 1 holds head 3
    assert [(p.kv_heads, p.query_heads, p.group_sizes) for p in plans] == [
        ([1], [2], [1]), ([0, 1], [0, 1, 3], [2, 1]), ([], [], []), ([0, 1], [0, 1, 2, 3], [2, 2])]
    compact, _ = compact_model(tiny_qwen3, mask, s)
    assert compact.config.layer_kv_group_sizes == [[1], [2, 1], [], [2, 2]]
    hd = s.head_dim
    base1, new1 = tiny_qwen3.model.layers[1].self_attn, compact.model.layers[1].self_attn
    assert new1.q_proj.weight.shape == (3 * hd, 24) and new1.o_proj.weight.shape == (24, 3 * hd)
    assert torch.equal(new1.q_proj.weight[2 * hd:], base1.q_proj.weight[3 * hd:4 * hd])      # slot 2 = head 3
    assert torch.equal(new1.o_proj.weight[:, 2 * hd:], base1.o_proj.weight[:, 3 * hd:4 * hd])
    # query slots 0, 1 read KV head 0 and slot 2 reads KV head 1; even layers repeat KV heads as stock models do
    assert new1.kv_index.tolist() == [0, 0, 1] and new1.num_key_value_groups == 1
    assert compact.model.layers[3].self_attn.kv_index is None
    assert compact.model.layers[3].self_attn.num_key_value_groups == 2
    assert torch.equal(new1.q_norm.weight, base1.q_norm.weight)                               # per head_dim, untouched
    base0, new0 = tiny_qwen3.model.layers[0].self_attn, compact.model.layers[0].self_attn
    assert new0.k_proj.weight.shape == (hd, 24)
    assert torch.equal(new0.k_proj.weight, base0.k_proj.weight[hd:2 * hd])                    # group 1's rows
    assert torch.equal(new0.v_proj.weight, base0.v_proj.weight[hd:2 * hd])
    assert compact.model.layers[2].self_attn.q_proj.weight.shape == (0, 24)
    assert compact.model.layers[2].self_attn.o_proj.weight.shape == (24, 0)
    assert compact.model.layers[3].mlp.down_proj.weight.shape == (24, 0)
    assert compact.model.layers[1].mlp.up_proj.weight.shape == (20, 24)
    assert torch.equal(compact.model.layers[1].mlp.up_proj.weight, tiny_qwen3.model.layers[1].mlp.up_proj.weight[::2])


def test_parameter_accounting_matches_hand_count(tiny_qwen3, tmp_path):
    s = structures_for(tiny_qwen3, "query_head", [])
    mask = uneven_mask(s)
    # Dense Qwen3 layer (hidden 24, head_dim 8, 4 q / 2 kv heads, 40 channels):
    #   q 32*24=768, k 16*24=384, v 384, o 24*32=768, q_norm+k_norm 8+8, MLP 3*24*40=2880, norms 2*24=48 -> 5248
    # Outside the layers: embed 300*24=7200, lm_head 7200 (untied), final norm 24 -> 14424
    # base = 4*5248 + 14424 = 35416
    # Compact layers: 0: 1 q head, 1 kv: 192+192+192+192+16+2880+48 = 3712
    #                 1: 3 q heads, 2 kv, 20 channels: 576+384+384+576+16+1440+48 = 3424
    #                 2: no heads: 16+2880+48 = 2944;  3: no channels: 768+384+384+768+16+48 = 2368
    # stored = 3712+3424+2944+2368 + 14424 = 26872, all of it effective (nothing is padded)
    # cross-check, base - pruned: 8 heads*(q rows + o columns = 2*8*24 = 384) + 3 dead kv groups*(k + v rows = 384)
    #   + 60 channels*(3*24) = 3072+1152+4320 = 8544; 35416 - 8544 = 26872
    compact = json.loads((export_model(tiny_qwen3, None, mask, s, "compact", tmp_path / "c", 8) / MANIFEST).read_text())
    masked = json.loads((export_model(tiny_qwen3, None, mask, s, "masked", tmp_path / "m", 8) / MANIFEST).read_text())
    assert compact["params"] == {"base": 35416, "stored": 26872, "effective": 26872}
    assert masked["params"] == {"base": 35416, "stored": 35416, "effective": 26872}
    assert compact["plan"][1] == {"kv_heads": 2, "query_heads": 3, "group_sizes": [2, 1], "intermediate_size": 20}
    assert compact["mask_digest"] == mask.digest() and compact["format"] == "compact"


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    imported = sorted(name for name in sys.modules if name == "resp" or name.startswith("resp."))
    torch.save({"logits": logits, "generated": generated, "class": type(model).__name__, "resp_modules": imported}, sys.argv[3])
""")


def test_compact_export_reloads_in_a_fresh_process_without_resp(tiny_qwen3, tiny_tokenizer, tmp_path):
    s = structures_for(tiny_qwen3, "query_head", [])
    mask = uneven_mask(s, dead_layer=0)
    out = export_model(tiny_qwen3, tiny_tokenizer, mask, s, "compact", tmp_path / "compact", 8,
                       manifest_extra={"base_model": {"name": "tiny"}})
    assert sorted(f.name for f in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "modeling_compact.py",
        "resp_manifest.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact"]   # no temporary or moved-aside directory
    ids = torch.randint(3, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "res.pt")],
                   check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                        "HF_HOME": str(tmp_path / "hf")})
    result = torch.load(tmp_path / "res.pt")
    masked = masked_model(tiny_qwen3, mask, s)
    with torch.no_grad():
        want = masked(ids).logits
    assert result["class"] == "RespCompactForCausalLM" and result["resp_modules"] == []
    torch.testing.assert_close(result["logits"], want, atol=1e-5, rtol=0)
    expected = masked.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(result["generated"], expected)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["base_model"] == {"name": "tiny"}
    assert manifest["plan"][0] == {"kv_heads": 0, "query_heads": 0, "group_sizes": [], "intermediate_size": 40}


def test_compact_keeps_tied_embeddings_and_dtype(tmp_path):
    base = make_qwen3(tie_word_embeddings=True).to(torch.bfloat16)
    s = structures_for(base, "query_head", [])
    mask = uneven_mask(s)
    out = export_model(base, None, mask, s, "compact", tmp_path / "compact", 8)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # tied: the 7200 lm_head weights are stored once (26872 - 7200 = 19672)
    assert json.loads((out / MANIFEST).read_text())["params"] == {"base": 28216, "stored": 19672, "effective": 19672}
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked_model(base, mask, s)(ids).logits, atol=2e-2, rtol=0)


def test_masked_export_loads_with_the_stock_class(tiny_llama, tmp_path):
    s = structures_for(tiny_llama, "query_head", [])
    mask = uneven_mask(s)
    out = export_model(tiny_llama, None, mask, s, "masked", tmp_path / "masked", 8)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(loaded.model.layers[2].self_attn.q_proj.weight, torch.zeros(32, 24))
    ids = torch.arange(3, 10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked_model(tiny_llama, mask, s)(ids).logits, atol=0, rtol=0)


def test_uniform_export_of_an_already_uniform_mask_equals_masked(tiny_model, tmp_path):
    """Every layer keeps 1 KV group x 2 heads and 16 channels: rounding changes nothing."""
    s = structures_for(tiny_model, "query_head", [])
    mask = Mask.dense(s)
    for i, group in enumerate([0, 1, 1, 0]):
        mask.heads[i] = torch.arange(4) // 2 == group
        mask.channels[i] = torch.zeros(40, dtype=torch.bool).index_fill(0, torch.arange(i, 40, 2)[:16], True)
    out = export_model(tiny_model, None, mask, s, "uniform", tmp_path / "uniform", 8)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is type(tiny_model)
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads, loaded.config.intermediate_size) == (2, 1, 16)
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, masked_model(tiny_model, mask, s)(ids).logits, atol=1e-5, rtol=0)
    manifest = json.loads((out / MANIFEST).read_text())
    assert all(row["heads_added"] == row["heads_dropped"] == row["channels_added"] == row["channels_dropped"] == 0
               for row in manifest["plan"])
    assert manifest["params"]["stored"] == manifest["params"]["effective"] == loaded.num_parameters()


def test_uniform_rounding_and_unit_choice(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [0])
    mask = uneven_mask(s)  # kept heads per layer 1, 3, 0, 4; alive groups 1, 2, 0, 2; channels 40, 20, 40, 0
    shape = uniform_shape(mask, s, channel_multiple=8)
    # groups: mean 5/4 = 1.25 -> 1; heads: mean 8/4 = 2 -> 2 per group; channels: mean 100/4 = 25 -> 25/8 = 3.125 -> 24
    assert {k: shape[k] for k in ("num_key_value_heads", "num_attention_heads", "intermediate_size")} == {
        "num_key_value_heads": 1, "num_attention_heads": 2, "intermediate_size": 24}
    model, plans, _ = uniform_model(tiny_qwen3, mask, s, channel_multiple=8)
    # layer 0 keeps head 2 only: group 1 wins; its other head 3 is added back
    assert (plans[0].kv_heads, plans[0].query_heads) == ([1], [2, 3])
    # layer 1: group 0 keeps 2 heads, group 1 keeps 1: group 0 wins, nothing added
    assert (plans[1].kv_heads, plans[1].query_heads) == ([0], [0, 1])
    # layer 1 kept the 20 even channels and needs 24: the 4 odd channels of largest magnitude come back
    gate, up, down = (getattr(tiny_qwen3.model.layers[1].mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj"))
    magnitude = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)
    odd = sorted(range(1, 40, 2), key=lambda c: -float(magnitude[c]))[:4]
    assert plans[1].channels == sorted(list(range(0, 40, 2)) + odd)
    # layer 2 kept all 40 channels and must drop 16: the 24 largest stay
    gate, up, down = (getattr(tiny_qwen3.model.layers[2].mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj"))
    magnitude = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)
    assert plans[2].channels == sorted(torch.argsort(magnitude, descending=True)[:24].tolist())
    assert isinstance(model.config, Qwen3Config) and model.model.layers[3].mlp.up_proj.weight.shape == (24, 24)


def test_another_models_mask_is_refused(tiny_qwen3, tmp_path):
    s = structures_for(tiny_qwen3, "query_head", [])
    wrong_shape = Mask(torch.ones(4, 8, dtype=torch.bool), torch.ones(4, 40, dtype=torch.bool))
    with pytest.raises(MaskError, match=r"mask shapes heads\[4, 8\]/channels\[4, 40\] do not fit this model"):
        export_model(tiny_qwen3, None, wrong_shape, s, "compact", tmp_path / "x", 8)
    with pytest.raises(MaskError, match="mask was made for model aaaaaaaaaaaaaaaa, not this model bbbbbbbbbbbbbbbb"):
        export_model(tiny_qwen3, None, Mask.dense(s), s, "compact", tmp_path / "x", 8,
                     mask_meta={"model": {"key": "a" * 64}}, model_key="b" * 64)
    with pytest.raises(ExportError, match=r"export format 'gguf' is not one of \['compact', 'masked', 'uniform'\]"):
        export_model(tiny_qwen3, None, Mask.dense(s), s, "gguf", tmp_path / "x", 8)
    assert list(tmp_path.iterdir()) == []


def test_compact_refuses_a_mask_without_any_attention(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    mask = Mask.dense(s)
    mask.heads[:] = False
    with pytest.raises(ExportError, match="the mask prunes every attention head of every layer"):
        compact_model(tiny_qwen3, mask, s)


def test_export_replaces_an_existing_directory(tiny_llama, tmp_path):
    s = structures_for(tiny_llama, "query_head", [])
    out = tmp_path / "e"
    export_model(tiny_llama, None, Mask.dense(s), s, "masked", out, 8)
    export_model(tiny_llama, None, uneven_mask(s), s, "compact", out, 8)
    assert json.loads((out / MANIFEST).read_text())["format"] == "compact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    assert isinstance(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True), torch.nn.Module)


def test_cli_export_writes_the_manifest_and_refuses_a_foreign_mask(tiny_tokenizer, tmp_path):
    base = make_qwen3()
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    identity = model_identity(str(model_dir))
    s = structures_for(base, "query_head", [])
    mask_path = uneven_mask(s).save(tmp_path / "mask.safetensors", {"model": {"key": identity.key}, "protected_layers": []})
    out = tmp_path / "export"
    args = ["export", "--mask", str(mask_path), "--model", str(model_dir), "--format", "compact", "--out", str(out),
            "--params", str(PARAMS), "--set", "model.device=cpu", "--set", "model.dtype=float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["base_model"]["key"] == identity.key and manifest["mask_digest"] == uneven_mask(s).digest()
    assert manifest["params"]["effective"] == 26872  # the hand count of test_parameter_accounting_matches_hand_count
    assert isinstance(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True), torch.nn.Module)

    foreign = uneven_mask(s).save(tmp_path / "foreign.safetensors", {"model": {"key": "f" * 64}})
    result = CliRunner().invoke(app, [*args[:2], str(foreign), *args[3:]])
    assert result.exit_code == 2
    assert "error: mask was made for model ffffffffffffffff, not this model" in result.output


def test_cli_export_never_deletes_what_it_did_not_write(tiny_tokenizer, tmp_path):
    """Issue 13, worst case 1: `--out` on a non-empty directory of user files was moved to DIR.old and
    deleted (exit 0). Now it is refused before the model loads, unless --overwrite; a previous export
    (recognised by its manifest) is replaced; `--out` on a file is one line and leaves nothing behind."""
    base = make_qwen3()
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    s = structures_for(base, "query_head", [])
    mask_path = uneven_mask(s).save(tmp_path / "mask.safetensors", {"model": {"key": model_identity(str(model_dir)).key},
                                                                     "protected_layers": []})
    out = tmp_path / "work"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    args = ["export", "--mask", str(mask_path), "--model", str(model_dir), "--format", "masked", "--out", str(out),
            "--params", str(PARAMS)]
    result = CliRunner().invoke(app, args)
    assert (result.exit_code, result.output) == (2, f"error: --out {out} is not empty and holds no {MANIFEST} (it is not "
                                                    "a resp export): choose a new or empty directory, or pass --overwrite "
                                                    "to replace its contents\n")
    assert [p.name for p in out.iterdir()] == ["thesis.tex"] and (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.safetensors", "mask.safetensors.json", "model", "work"]

    export = tmp_path / "export"
    assert CliRunner().invoke(app, [*args[:-3], str(export), *args[-2:]]).exit_code == 0
    (export / "note.txt").write_text("kept?")            # a previous export is replaced as a whole, without --overwrite
    result = CliRunner().invoke(app, [*args[:-3], str(export), *args[-2:]])
    assert result.exit_code == 0, result.output
    assert not (export / "note.txt").exists() and (export / MANIFEST).is_file()

    result = CliRunner().invoke(app, [*args, "--overwrite"])   # explicit: the user's directory is replaced
    assert result.exit_code == 0, result.output
    assert not (out / "thesis.tex").exists() and (out / MANIFEST).is_file()

    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, [*args[:-3], str(PARAMS), *args[-2:]])
    assert (result.exit_code, result.output) == (2, f"error: --out {PARAMS} is a file, not a directory: give a directory path\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and PARAMS.is_file()
    assert not list(PARAMS.parent.glob(f".{PARAMS.name}*")) and not PARAMS.with_name(PARAMS.name + ".old").exists()
