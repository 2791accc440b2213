import json

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
    from resp.export import export_model
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
