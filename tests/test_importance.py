import pytest
import torch

from conftest import make_llama, make_qwen3
from resp.importance import ImportanceError, taylor_scores
from resp.masks import Mask, apply_mask, prune_step
from resp.structures import structures_for
from resp.traces import Trace


def random_traces(n=6, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    traces = []
    for i in range(n):
        p = int(torch.randint(2, 7, (1,), generator=g))
        c = int(torch.randint(1, 9, (1,), generator=g))
        ids = torch.randint(1, vocab, (p + c,), generator=g).tolist()
        traces.append(Trace(f"t{i}", ids[:p], ids[p:], "", False))
    return traces


def brute_force_scores(model, traces, s, per_sample_abs=False):
    """Per-sample loop with explicit slicing: an independent implementation of the unit sums."""
    layers = model.model.layers
    names = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] + (["k_proj", "v_proj"] if s.attention_unit == "kv_group" else [])
    params = {(i, n): (getattr(l.self_attn, n) if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else getattr(l.mlp, n)).weight
              for i, l in enumerate(layers) for n in names}
    grads = [{k: torch.zeros_like(w, dtype=torch.float64) for k, w in params.items()} for _ in traces]
    for n, t in enumerate(traces):
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        logits = model(input_ids=ids).logits[0]
        p = len(t.prompt_ids)
        # completion token j (position p+j) is predicted from position p+j-1; the first token needs p >= 1
        targets = [(pos - 1, ids[0, pos]) for pos in range(max(p, 1), ids.shape[1])]
        loss = sum(torch.nn.functional.cross_entropy(logits[i:i + 1], tok.view(1)) for i, tok in targets) / len(targets)
        gs = torch.autograd.grad(loss, list(params.values()))
        for k, g in zip(params, gs):
            grads[n][k] = g.double()
    hd, H = s.head_dim, s.num_heads
    att = torch.zeros(s.num_layers, s.attention_units, dtype=torch.float64)
    ch = torch.zeros(s.num_layers, s.intermediate_size, dtype=torch.float64)
    elems = ([{k: (params[k].double() * g[k]).abs() for k in params} for g in grads] if per_sample_abs else
             [{k: (params[k].double() * sum(g[k] for g in grads) / len(traces)).abs() for k in params}])
    for e in elems:
        for i in range(s.num_layers):
            for h in range(H):
                unit = h if s.attention_unit == "query_head" else h // s.n_rep
                att[i, unit] += e[(i, "q_proj")][h * hd:(h + 1) * hd, :].sum() + e[(i, "o_proj")][:, h * hd:(h + 1) * hd].sum()
            if s.attention_unit == "kv_group":
                for j in range(s.num_kv_heads):
                    att[i, j] += e[(i, "k_proj")][j * hd:(j + 1) * hd].sum() + e[(i, "v_proj")][j * hd:(j + 1) * hd].sum()
            for c in range(s.intermediate_size):
                ch[i, c] += e[(i, "gate_proj")][c].sum() + e[(i, "up_proj")][c].sum() + e[(i, "down_proj")][:, c].sum()
    return att, ch


@pytest.mark.parametrize("unit", ["query_head", "kv_group"])
@pytest.mark.parametrize("per_sample_abs", [False, True])
def test_batched_scores_equal_per_sample_loop(tiny_model, unit, per_sample_abs):
    s = structures_for(tiny_model, unit, [])
    traces = random_traces()
    got = taylor_scores(tiny_model, traces, s, batch_size=4, pad_id=0, per_sample_abs=per_sample_abs)
    att, ch = brute_force_scores(tiny_model, traces, s, per_sample_abs)
    assert got.n_samples == len(traces)
    torch.testing.assert_close(got.attention, att, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got.channels, ch, rtol=1e-4, atol=1e-9)


def test_batch_size_does_not_change_scores(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    traces = random_traces(n=7)
    a = taylor_scores(tiny_qwen3, traces, s, batch_size=1, pad_id=0)
    b = taylor_scores(tiny_qwen3, traces, s, batch_size=7, pad_id=0)
    torch.testing.assert_close(a.attention, b.attention, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(a.channels, b.channels, rtol=1e-4, atol=1e-10)


def test_grads_only_scored_and_checkpointing_give_same_scores(tiny_llama):
    s = structures_for(tiny_llama, "query_head", [])
    traces = random_traces()
    a = taylor_scores(tiny_llama, traces, s, batch_size=3, pad_id=0, grads_only_scored=True)
    b = taylor_scores(tiny_llama, traces, s, batch_size=3, pad_id=0, grads_only_scored=False, grad_checkpointing=True)
    torch.testing.assert_close(a.attention, b.attention, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(a.channels, b.channels, rtol=1e-5, atol=1e-10)
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert all(p.requires_grad for p in tiny_llama.parameters())  # flags restored


def test_pruned_units_score_zero(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    mask = Mask.dense(s)
    mask.heads[1, 2] = False
    mask.channels[2, [0, 5]] = False
    apply_mask(tiny_qwen3, mask, s)
    scores = taylor_scores(tiny_qwen3, random_traces(), s, batch_size=4, pad_id=0)
    assert scores.attention[1, 2] == 0 and scores.channels[2, 0] == 0 and scores.channels[2, 5] == 0
    assert (scores.attention > 0).sum() == s.num_layers * s.num_heads - 1


def test_non_finite_loss_is_refused(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    with torch.no_grad():
        tiny_qwen3.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ImportanceError, match="non-finite loss"):
        taylor_scores(tiny_qwen3, random_traces(), s, batch_size=4, pad_id=0)


def test_empty_traces_are_refused(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    with pytest.raises(ImportanceError, match="no trace had a completion token"):
        taylor_scores(tiny_qwen3, [Trace("x", [1, 2], [], "", True)], s, batch_size=4, pad_id=0)


# ---- the chunked loss (importance.loss_chunk_tokens): LM head and cross-entropy on completion tokens only


@pytest.mark.parametrize("unit", ["query_head", "kv_group"])
@pytest.mark.parametrize("per_sample_abs", [False, True])
def test_chunked_loss_gives_the_same_scores_and_masks(tiny_model, unit, per_sample_abs):
    s = structures_for(tiny_model, unit, [])
    traces = random_traces(n=7)
    full = taylor_scores(tiny_model, traces, s, batch_size=3, pad_id=0, per_sample_abs=per_sample_abs)
    for chunk, checkpointing in [(1, False), (5, True), (10_000, False)]:
        chunked = taylor_scores(tiny_model, traces, s, batch_size=3, pad_id=0, per_sample_abs=per_sample_abs,
                                grad_checkpointing=checkpointing, loss_chunk_tokens=chunk)
        torch.testing.assert_close(chunked.attention, full.attention, rtol=2e-6, atol=1e-12)
        torch.testing.assert_close(chunked.channels, full.channels, rtol=2e-6, atol=1e-12)
        assert (chunked.n_samples, chunked.n_tokens) == (full.n_samples, full.n_tokens)
        assert chunked.mean_loss == pytest.approx(full.mean_loss, rel=1e-6)
        for target in (0.2, 0.4):
            masks = [prune_step(*scores.normalized(s, "paper"), Mask.dense(s), s, target) for scores in (full, chunked)]
            assert masks[0].digest() == masks[1].digest()


def test_chunked_loss_with_all_gradients_leaves_no_grads(tiny_llama):
    """grads_only_scored false: the LM head's gradient flows through the checkpointed chunks too."""
    s = structures_for(tiny_llama, "query_head", [])
    traces = random_traces()
    full = taylor_scores(tiny_llama, traces, s, batch_size=4, pad_id=0, grads_only_scored=False)
    chunked = taylor_scores(tiny_llama, traces, s, batch_size=4, pad_id=0, grads_only_scored=False, loss_chunk_tokens=4)
    torch.testing.assert_close(chunked.attention, full.attention, rtol=2e-6, atol=1e-12)
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_chunked_loss_bad_settings(tiny_qwen3):
    s = structures_for(tiny_qwen3, "query_head", [])
    with pytest.raises(ImportanceError, match=r"^loss_chunk_tokens 0 must be positive \(or None: the full logits\)$"):
        taylor_scores(tiny_qwen3, random_traces(), s, batch_size=2, pad_id=0, loss_chunk_tokens=0)
    with pytest.raises(ImportanceError, match="loss_chunk_tokens is not implemented for sharded parameters"):
        taylor_scores(tiny_qwen3, random_traces(), s, batch_size=2, pad_id=0, sharded=True, loss_chunk_tokens=8)
