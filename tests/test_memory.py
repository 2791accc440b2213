"""resp.memory: hand-computed predictions of the scoring memory model, parameter counts against
real models, config loading and error messages, and `resp memory`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, make_llama, make_qwen3
from typer.testing import CliRunner

from resp.cli import app
from resp.importance import scored_weights
from resp.memory import MemoryModelError, predict_scoring_memory
from resp.structures import structures_for

ROOT = Path(__file__).resolve().parents[1]

# V=10, h=4, I=6, L=1, H=2 query heads, KV=1, d=3 (H*d = 6 != h), untied embeddings.
HAND = dict(model_type="qwen3", vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=3, max_position_embeddings=16,
            tie_word_embeddings=False)


def test_hand_computed_float32_batch():
    m = predict_scoring_memory(HAND, "float32", seq_len=5, batch_size=2)
    # parameters: embed 10*4=40, lm_head 40, final norm 4; layer: q 6*4=24, k 3*4=12, v 12, o 24,
    # q_norm 3, k_norm 3, two norms 4+4, gate/up/down 3*24=72 -> 158; total 242 -> 242*4 bytes
    assert m.weights == 968
    # scored: q, o, gate, up, down = 5*24 = 120 elements in fp32
    assert m.accumulators == 480
    # 10 tokens, padded (batch 2), b=4; per token: norms 2*(4*(4+4)+4)=72, q/k norm inputs+rsqrt
    # (2+1)*(3*4+4)=48, q and output 2*6*4=48, k/v repeated to 2 heads 2*6*4=48, logsumexp 2*4=8,
    # MLP 4*6*4=96 -> 320; layer = 10*320 + float mask 2*5*5*4=200 = 3400;
    # shared: final norm fp32 input 10*4*4=160 + bool mask 2*5*5=50 -> saved 210 + 3400
    assert m.saved_activations == 3610
    # logits 10*10*4 + three fp32 [10, 10] buffers 3*400 = 1600
    assert m.loss_buffers == 1600
    # logits 400 + MLP grads 3*10*6*4 + 10*4*4 = 880 + one weight gradient 24*4 = 96 -> 1376
    assert m.layer_buffers == 1376 and m.other_grads == 0
    assert m.peak == 968 + 480 + 3610 + max(1600, 1376) == 6658


def test_hand_computed_bfloat16_per_sample_abs_all_grads_checkpointed():
    m = predict_scoring_memory(HAND, "bfloat16", seq_len=5, batch_size=2, per_sample_abs=True,
                               grads_only_scored=False, grad_checkpointing=True)
    assert m.weights == 242 * 2 and m.accumulators == 0  # per-sample-abs keeps unit sums only
    # one sequence per backward: 5 tokens, unpadded, b=2; per token: norms 2*(4*(4+2)+4)=56,
    # q/k norms 3*16=48, q and output 2*6*2=24, k/v unrepeated 2*3*2=12, logsumexp 8, MLP 4*6*2=48,
    # normalised inputs kept for norm weights 2*4*2 + 3*3*2 = 34 -> 230; layer = 5*230 = 1150
    # saved: final norm input 5*4*4=80 + its normalised input and output 2*5*4*2=80 + layer input 5*4*2=40
    assert m.saved_activations == 200
    assert m.loss_buffers == 5 * 10 * (2 + 12) == 700
    # logits 100 + recomputed layer 1150 + MLP grads 3*5*6*2 + 5*4*2 = 220
    # + weight gradient 24*(2 + fp32 copies of weight and grad 8 + product 4 + abs 4) = 432
    assert m.layer_buffers == 100 + 1150 + 220 + 432 == 1902
    assert m.other_grads == (242 - 120) * 2 == 244
    assert m.peak == 484 + 0 + 200 + max(700, 1902 + 244) == 2830


def test_hand_computed_chunked_loss():
    """The chunked loss keeps no logits past a chunk: loss buffers of 3 tokens plus the gathered
    hidden states and their gradient; the layer buffers lose the logits (400 bytes)."""
    full = predict_scoring_memory(HAND, "float32", seq_len=5, batch_size=2)
    m = predict_scoring_memory(HAND, "float32", seq_len=5, batch_size=2, loss_chunk_tokens=3)
    # 3 tokens x 10 vocab x (4 + 12) + hidden states and gradient 2 * 10 tokens * 4 * 4 = 480 + 320
    assert m.loss_buffers == 800
    assert m.layer_buffers == full.layer_buffers - 400 == 976
    assert (m.weights, m.accumulators, m.saved_activations) == (full.weights, full.accumulators, full.saved_activations)
    big = predict_scoring_memory(HAND, "float32", seq_len=5, batch_size=2, loss_chunk_tokens=1000)
    assert big.loss_buffers == 10 * 10 * 16 + 320   # a chunk is never more than the batch's tokens
    with pytest.raises(MemoryModelError, match="loss_chunk_tokens 3 must be >= 1 and needs nproc 1"):
        predict_scoring_memory(HAND, "float32", seq_len=5, batch_size=2, loss_chunk_tokens=3, nproc=2)


@pytest.mark.parametrize("make, model_type", [(make_qwen3, "qwen3"), (make_llama, "llama")])
def test_weights_and_accumulators_match_real_models(make, model_type):
    model = make()
    m = predict_scoring_memory({"model_type": model_type, **TINY}, "float32", seq_len=8, batch_size=1,
                               attention_unit="kv_group")
    assert m.weights == sum(p.numel() for p in model.parameters()) * 4
    scored = scored_weights(model, structures_for(model, "kv_group", []))
    assert m.accumulators == sum(w.numel() for w in scored.values()) * 4


def test_config_sources_agree(tmp_path, tiny_model_dir):
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(HAND))
    from_dict = predict_scoring_memory(HAND, "float32", 5, 2)
    assert predict_scoring_memory(config_json, "float32", 5, 2) == from_dict
    by_dir = predict_scoring_memory(tiny_model_dir, "float32", 8, 1)
    assert by_dir == predict_scoring_memory({"model_type": "qwen3", **TINY}, "float32", 8, 1)


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(MemoryModelError, match=r"dtype 'int8' is not one of \['bfloat16', 'float16', 'float32'\]"):
        predict_scoring_memory(HAND, "int8", 5, 2)
    with pytest.raises(MemoryModelError, match="seq_len 1 must be >= 2 and batch_size 2 >= 1"):
        predict_scoring_memory(HAND, "float32", 1, 2)
    with pytest.raises(MemoryModelError, match="the config dict has no model_type"):
        predict_scoring_memory({k: v for k, v in HAND.items() if k != "model_type"}, "float32", 5, 2)
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    with pytest.raises(MemoryModelError, match="is not a JSON config"):
        predict_scoring_memory(broken, "float32", 5, 2)


def test_cli_prints_the_breakdown(tmp_path):
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(HAND))
    result = CliRunner().invoke(app, ["memory", "--config", str(config_json), "--seq-len", "5", "--batch-size", "2",
                                      "--dtype", "float32", "--no-grad-checkpointing", "--no-per-sample-abs",
                                      "--grads-only-scored", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1] for line in result.output.splitlines() if line[:1].isalpha()}
    assert lines["weights"] == "968" and lines["accumulators"] == "480" and lines["peak"] == "6658"
    bad = CliRunner().invoke(app, ["memory", "--config", str(config_json), "--seq-len", "5", "--dtype", "int8",
                                   "--params", str(ROOT / "params.yaml")])
    assert bad.exit_code == 2 and "error: dtype 'int8' is not one of" in bad.output


def test_hand_computed_sharded_over_two_workers():
    m = predict_scoring_memory(HAND, "float32", seq_len=5, batch_size=2, nproc=2)
    assert m.weights == 968 // 2 and m.accumulators == 480 // 2
    # unsharded: root (embed 40 + lm_head 40 + final norm 4) and two layers (158 each) in fp32,
    # one layer's scored gradients (120) in the model dtype and their fp32 reduce-scatter copy,
    # one gathered fp32 weight score (24 elements)
    assert m.unsharded == (84 + 2 * 158) * 4 + 120 * (4 + 4) + 24 * 4 == 2656
    one = predict_scoring_memory(HAND, "float32", seq_len=5, batch_size=2)
    assert (m.saved_activations, m.loss_buffers, m.layer_buffers) == (one.saved_activations, one.loss_buffers,
                                                                      one.layer_buffers)
    assert m.peak == 484 + 240 + 3610 + 2656 + 1600 == 8590
    with pytest.raises(MemoryModelError, match="sharded scoring .* mean mode only"):
        predict_scoring_memory(HAND, "float32", 5, 2, per_sample_abs=True, nproc=2)


def test_fit_verdicts_say_by_how_much_and_what_fits():
    from resp.memory import fit_verdict

    predict = lambda n: predict_scoring_memory(HAND, "float32", 5, 2, nproc=n)  # noqa: E731
    assert fit_verdict(predict, 2, 8590).startswith("fits: per-worker peak 0.0 GiB")
    # 7866 bytes do not shrink with workers; the sharded 968 + 480 do: 11 workers need 88 + 44
    with pytest.raises(MemoryModelError, match=r"exceeds 0.0 GiB by 0.0 GiB; it fits sharded over 11 devices"):
        fit_verdict(predict, 2, 8000)
    assert predict(11).peak == 7866 + 88 + 44 <= 8000 < predict(10).peak
    with pytest.raises(MemoryModelError, match="not even sharded over 64 devices"):
        fit_verdict(predict, 2, 7000)


def test_cli_nproc_per_worker_and_device_checks(tmp_path, monkeypatch):
    import torch

    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(HAND))
    args = ["memory", "--config", str(config_json), "--seq-len", "5", "--batch-size", "2", "--dtype", "float32",
            "--no-grad-checkpointing", "--no-per-sample-abs", "--grads-only-scored", "--params", str(ROOT / "params.yaml")]
    result = CliRunner().invoke(app, [*args, "--nproc", "2"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1] for line in result.output.splitlines() if line[:1].isalpha()}
    assert lines["unsharded"] == "2656" and lines["peak"] == "8590" and "sharded over 2 workers" in result.output
    too_small = CliRunner().invoke(app, [*args, "--nproc", "2", "--gpu-memory", "0.000007"])
    assert too_small.exit_code == 2 and "error: does not fit: per-worker peak" in too_small.output
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    more = CliRunner().invoke(app, [*args, "--nproc", "2"])
    assert more.exit_code == 2
    assert "error: --nproc 2 exceeds the 1 CUDA device(s) here: use at most 1, or pass --gpu-memory GIB" in more.output
