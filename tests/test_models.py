import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_llama
from resp.adapters import UnsupportedArchitecture
from resp.models import ModelLoadError, content_hash, load_model, model_identity


def test_load_local_model_left_pads_and_identity_is_content_hash(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert tokenizer.padding_side == "left" and not model.training
    ident = model_identity(str(tiny_model_dir))
    assert ident.revision is None and ident.key == ident.content_hash == content_hash(tiny_model_dir)


def test_content_hash_changes_with_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_llama(seed=0).save_pretrained(a)
    make_llama(seed=0).save_pretrained(b)
    assert content_hash(a) == content_hash(b)
    make_llama(seed=1).save_pretrained(b)
    assert content_hash(a) != content_hash(b)


def test_hub_identity_is_the_revision_sha(monkeypatch):
    class Info:
        sha = "0123abcd" * 5

    calls = []
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda self, repo, revision=None: calls.append((repo, revision)) or Info())
    ident = model_identity("Qwen/Qwen3-8B", "main")
    assert calls == [("Qwen/Qwen3-8B", "main")] and ident.key == Info.sha and ident.content_hash is None


def test_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^model directory .*/nope does not exist: check model.name_or_path$"):
        load_model(str(tmp_path / "nope"))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    with pytest.raises(UnsupportedArchitecture, match=r"model_type 'gpt2' has no pruning adapter; supported families: "
                                                     r"llama, mistral, qwen2, qwen3 \(Qwen3, Qwen2, Llama, Mistral\)"):
        load_model(str(gpt2))
    enc = tmp_path / "enc"
    enc.mkdir()
    config = make_llama().config.to_dict()
    config["architectures"] = ["LlamaForSequenceClassification"]
    (enc / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="is a LlamaForSequenceClassification, not a causal language model"):
        load_model(str(enc))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="holds no weight files"):
        model_identity(str(empty))


def test_compact_export_loads_for_inference(tiny_model_dir, tmp_path):
    from resp.checkpoints import export_model
    from resp.masks import Mask
    from resp.structures import structures_for

    model, tokenizer = load_model(str(tiny_model_dir))
    s = structures_for(model, "query_head", None)
    mask = Mask.dense(s)
    mask.heads[1, 0] = False
    mask.channels[2, :10] = False
    out = export_model(model, tokenizer, mask, s, "compact", tmp_path / "compact", 8)
    compact, _ = load_model(str(out))
    ids = torch.tensor([[1, 5, 9, 11]])
    masked = export_model(model, tokenizer, mask, s, "masked", tmp_path / "masked", 8)
    reference, _ = load_model(str(masked))
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_code_in_a_model_directory_never_runs_unasked(tiny_model_dir, tmp_path):
    """Issue 13: an edited modeling_compact.py in a compact export ran on `resp eval` (trust_remote_code
    came from resp_manifest.json). Now a compact export loads with resp's own class, and any other
    model that ships code is refused unless trust_remote_code is given (never a prompt)."""
    import json

    from resp.checkpoints import export_model
    from resp.masks import Mask
    from resp.structures import structures_for

    model, tokenizer = load_model(str(tiny_model_dir))
    s = structures_for(model, "query_head", None)
    out = export_model(model, tokenizer, Mask.dense(s), s, "compact", tmp_path / "compact", 8)
    marker = tmp_path / "ran"
    (out / "modeling_compact.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit(3)\n")
    compact, _ = load_model(str(out))
    assert type(compact).__module__ == "resp.checkpoints.modeling_compact" and not marker.exists()

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "modeling_x.XConfig"}}))
    (custom / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError, match=r"ships its own modeling code \(auto_map in config.json\): pass "
                                             r"--trust-remote-code \(model.trust_remote_code=true\) only if you trust"):
        load_model(str(custom))
    assert not marker.exists()


def test_device_and_damaged_weights_are_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"^model.device is cuda:0 but no CUDA device is available here: set "
                                             r"model.device=cpu$"):
        load_model(str(tiny_model_dir), device="cuda:0")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=rf"^model {broken} cannot be loaded \(.*\): its files are truncated or "
                                             "corrupt; re-save or re-download the model$"):
        load_model(str(broken))
