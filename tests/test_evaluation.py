"""resp.evaluation: metrics from scripted completions (exact arithmetic), agreement with
`generate` on a real tiny model, decode-only NLL against a per-token brute
force, and `evaluate_masks` / `resp evaluate` on a saved tiny Qwen3 with masks and held-out traces,
with Hugging Face generation and with evaluation.backend vllm (a stand-in vllm module)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
import torch
from conftest import ScriptedLM, make_qwen3
from typer.testing import CliRunner

from resp.artifacts import masks_in_dir
from resp.cli import app
from resp.evaluation import EvaluationError, decode_only_nll, evaluate_masks, evaluate_task, reported_nll, summarize
from resp.generation import GenerationError, SamplingSpec, VllmEngine, generate
from resp.masks import Mask, MaskError, apply_mask, prune_step
from resp.models import load_model, model_identity
from resp.structures import structures_for
from resp.tasks import Item, load_items, render_prompt
from resp.traces import Trace, TraceSet

IM_END = "<|im_end|>"


class ScriptedModel(ScriptedLM):
    """A causal LM that replies with a fixed text per user message, so evaluation arithmetic can be checked exactly."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        end = tokenizer.convert_tokens_to_ids(IM_END)
        super().__init__({tuple(tokenizer(render_prompt(tokenizer, message), add_special_tokens=False)["input_ids"]):
                          tokenizer(reply, add_special_tokens=False)["input_ids"] + [end]
                          for message, reply in replies.items()}, end, len(tokenizer))


ARITH = [Item("test-0", "Tom has 23 apples. He buys 14 more. He gives 9 away. How many?", "28", "", None),
         Item("test-1", "Ana has 5 pens. She buys 2 more. How many?", "7", "", None),
         Item("test-2", "Ben has 3 cards. He buys 1 more. How many?", "4", "", None)]
REPLIES = {ARITH[0].message: "<think>\n23+14=37\n37-9=28\n</think>\n\nThe answer is 28.",
           ARITH[1].message: "<think>\n5+2=8\n</think>\n\nThe answer is 8.",
           ARITH[2].message: "<think>\n" + "Tom has apples and Ben has cards.\n" * 20 + "</think>\n\nThe answer is 4."}
SPEC = SamplingSpec(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=60)
# Cut inside its thinking after the right number: right for the flexible extractor only.
CUT = Item("test-3", "Cal has 2 cups. He buys 3 more. How many?", "5", "", None)
REPLIES[CUT.message] = "<think>\n" + "Cal now has 5 cups.\n" * 20 + "</think>\n\nThe answer is 5."


def record(id, gold, strict, flexible, tokens, truncated, reflection=False) -> dict:
    return {"id": id, "gold": gold, "answer_strict": strict, "correct_strict": strict == gold,
            "answer_flexible": flexible, "correct_flexible": flexible == gold, "completion_tokens": tokens,
            "truncated": truncated, "reflection": reflection}


def test_metrics_from_scripted_completions(tiny_tokenizer):
    model = ScriptedModel(tiny_tokenizer, REPLIES)
    result = evaluate_task(model, tiny_tokenizer, ARITH + [CUT], "gsm8k", SPEC, batch_size=2, seed=0)
    lengths = [len(tiny_tokenizer(REPLIES[i.message], add_special_tokens=False)["input_ids"]) + 1 for i in ARITH[:2]]
    assert result["records"] == [
        record("test-0", "28", "28", "28", lengths[0], False),
        record("test-1", "7", "8", "8", lengths[1], False),
        # cut after 60 tokens inside a thinking without numbers: no answer
        record("test-2", "4", None, None, 60, True),
        # cut inside a thinking that repeats the right number: strict wrong, flexible right
        record("test-3", "5", None, "5", 60, True),
    ]
    assert [r["correct_flexible"] for r in result["records"]] == [True, False, False, True]
    assert result["n"] == 4
    assert (result["accuracy_strict"], result["accuracy_flexible"]) == (0.25, 0.5)
    assert "accuracy" not in result
    assert result["mean_completion_tokens"] == pytest.approx((lengths[0] + lengths[1] + 60 + 60) / 4)
    assert result["truncation_rate"] == 0.5
    assert result["reflection_rate"] == 0.0   # no markers given
    assert result["per_item"] == {"correct_strict": [1, 0, 0, 0], "correct_flexible": [1, 0, 0, 1],
                                  "completion_tokens": [lengths[0], lengths[1], 60, 60], "truncated": [0, 0, 1, 1],
                                  "reflection": [0, 0, 0, 0]}


def test_reflection_rate_counts_completions_with_a_marker(tiny_tokenizer):
    model = ScriptedModel(tiny_tokenizer, {**REPLIES, ARITH[1].message: "<think>\n5+2=8, wait, 5+2=7\n</think>\n\n"
                                                                         "The answer is 7."})
    result = evaluate_task(model, tiny_tokenizer, ARITH + [CUT], "gsm8k", SPEC, batch_size=2, seed=0,
                           markers=["wait,", "Tom has apples"])
    assert [r["reflection"] for r in result["records"]] == [False, True, True, False]
    assert result["reflection_rate"] == 0.5 and result["per_item"]["reflection"] == [0, 1, 1, 0]
    assert result["records"][1]["correct_strict"]     # the corrected answer counts


def test_mathqa_letters(tiny_tokenizer):
    items = [Item("test-0", "Question: q\nOptions: a ) 1 , b ) 2\nAnswer:", "b", "", "a ) 1 , b ) 2"),
             Item("test-1", "Question: r\nOptions: a ) 1 , b ) 2\nAnswer:", "a", "", "a ) 1 , b ) 2")]
    model = ScriptedModel(tiny_tokenizer, {items[0].message: "<think>\n1+1=2\n</think>\n\nThe answer is (b).",
                                           items[1].message: "<think>\n1+1=2\n</think>\n\nThe answer is (b)."})
    result = evaluate_task(model, tiny_tokenizer, items, "mathqa", SPEC, batch_size=4, seed=0)
    assert [(r["answer_strict"], r["correct_strict"], r["answer_flexible"], r["correct_flexible"])
            for r in result["records"]] == [("b", True, "b", True), ("b", False, "b", False)]
    assert (result["accuracy_strict"], result["accuracy_flexible"]) == (0.5, 0.5)


def test_agrees_with_generate_on_a_tiny_model(tiny_tokenizer):
    model = make_qwen3()
    spec = SamplingSpec(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=6)
    result = evaluate_task(model, tiny_tokenizer, ARITH, "gsm8k", spec, batch_size=2, seed=3)
    prompts = [render_prompt(tiny_tokenizer, i.message) for i in ARITH]
    completions = generate(model, tiny_tokenizer, prompts, spec, batch_size=2, seed=3, desc="g")
    assert [r["completion_tokens"] for r in result["records"]] == [len(c.completion_ids) for c in completions]
    assert [r["truncated"] for r in result["records"]] == [c.truncated for c in completions]


def test_no_items():
    with pytest.raises(EvaluationError, match=r"^no items to evaluate: check the task's split and --limit$"):
        evaluate_task(None, None, [], "gsm8k", SPEC, batch_size=1, seed=0)


# (prompt length, completion length): an empty completion is skipped, a prompt-less (text)
# trace has no prediction for its first token.
SHAPES = [(3, 4), (5, 2), (0, 6), (2, 0), (4, 7)]
N_SCORED = 4 + 2 + (6 - 1) + 0 + 7  # = 18


def shaped_traces(seed: int = 0) -> list[Trace]:
    g = torch.Generator().manual_seed(seed)
    traces = []
    for i, (p, c) in enumerate(SHAPES):
        ids = torch.randint(3, 290, (p + c,), generator=g).tolist()
        traces.append(Trace(f"t-{i}", ids[:p], ids[p:], "", False))
    return traces


def brute_force_nll(model, traces: list[Trace]) -> tuple[float, int]:
    """Each trace alone, unpadded: -log p(token | everything before it), over completion tokens."""
    total, n = 0.0, 0
    with torch.no_grad():
        for t in traces:
            ids = t.prompt_ids + t.completion_ids
            if not t.completion_ids:
                continue
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            for position in range(max(len(t.prompt_ids), 1), len(ids)):
                total -= logp[position - 1, ids[position]].item()
                n += 1
    return total / n, n


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_decode_only_nll_equals_brute_force(tiny_model, batch_size):
    traces = shaped_traces()
    expected, n = brute_force_nll(tiny_model, traces)
    assert n == N_SCORED
    result = decode_only_nll(tiny_model, traces, batch_size, pad_id=0)
    assert result["n_tokens"] == N_SCORED
    assert result["nll"] == pytest.approx(expected, rel=1e-5)


def test_reported_nll_keeps_four_significant_digits():
    """What metrics files hold: noise in the 7th digit (another CPU's reduction order) writes the same number."""
    assert reported_nll(0.146123456) == reported_nll(0.146123512) == 0.1461
    assert reported_nll(6.92649) == 6.926 and reported_nll(0.000199843) == 0.0001998


def test_decode_only_nll_needs_completion_tokens(tiny_qwen3):
    with pytest.raises(EvaluationError, match=r"^the held-out traces have no completion tokens to score: "
                                              r"regenerate them with `resp traces`$"):
        decode_only_nll(tiny_qwen3, [Trace("t-0", [5, 6], [], "", True)], 2, pad_id=0)


SAMPLES = 2


@pytest.fixture
def eval_params(tiny_params):
    """tiny_params with two samples per item and NLL batches that split the 4 held-out traces."""
    ev = tiny_params.evaluation.model_copy(update={"samples": SAMPLES, "sample_seed": 0, "nll_batch_size": 3})
    return tiny_params.model_copy(update={"evaluation": ev})


def save_heldout(path, tokenizer, model_key: str, n: int = 4):
    traces = []
    for i in range(n):
        prompt = tokenizer(render_prompt(tokenizer, f"Tom has {i + 2} apples. How many?"), add_special_tokens=False)["input_ids"]
        completion = tokenizer(f"<think>\n{i + 2}+1={i + 3}\n</think>\n\nThe answer is {i + 3}.", add_special_tokens=False)["input_ids"]
        traces.append(Trace(f"test-{i}", prompt, completion + [tokenizer.eos_token_id], "", False))
    # what `resp traces --split test` records: `resp evaluate --heldout` checks it is the eval split's
    TraceSet(traces, {"model": {"key": model_key}, "task": "arith", "split": "test", "mask_digest": None}).save(path)
    return path


def save_mask(directory, target: float, model, model_key: str, seed: int) -> tuple[Mask, object]:
    s = structures_for(model, "query_head", None)
    g = torch.Generator().manual_seed(seed)
    mask = prune_step(torch.rand(s.num_layers, s.num_heads, generator=g),
                      torch.rand(s.num_layers, s.intermediate_size, generator=g), Mask.dense(s), s, target)
    mask.save(directory / f"sparsity-{target:.2f}.safetensors", {"model": {"key": model_key}, "target": target})
    return mask, s


@pytest.fixture
def evaluation_inputs(eval_params, tmp_path):
    """Held-out traces and two non-nested masks (so a missing dense-weight restore would show)."""
    model, tokenizer = load_model(eval_params.model.name_or_path)
    key = model_identity(eval_params.model.name_or_path).key
    heldout = save_heldout(tmp_path / "heldout.jsonl", tokenizer, key)
    masks_dir = tmp_path / "masks"
    mask_a, s = save_mask(masks_dir, 0.1, model, key, seed=1)
    mask_b, _ = save_mask(masks_dir, 0.2, model, key, seed=2)
    assert not mask_a.contains(mask_b) and not mask_b.contains(mask_a)
    return {"heldout": heldout, "masks_dir": masks_dir, "masks": {"0.10": mask_a, "0.20": mask_b}, "s": s, "key": key}


def test_evaluate_masks(eval_params, evaluation_inputs, tmp_path):
    inputs = evaluation_inputs
    masks = masks_in_dir(inputs["masks_dir"])
    assert masks == {0.1: inputs["masks_dir"] / "sparsity-0.10.safetensors",
                     0.2: inputs["masks_dir"] / "sparsity-0.20.safetensors"}
    out = tmp_path / "metrics" / "arith" / "resp.json"
    evaluate_masks(eval_params, "arith", "resp", masks, inputs["heldout"], out, include_dense=True)
    report = json.loads(out.read_text())
    ev = eval_params.evaluation
    assert {k: report[k] for k in ("task", "method", "format", "split", "few_shot", "evaluation")} == {
        "task": "arith", "method": "resp", "format": "gsm8k", "split": "test", "few_shot": 0, "evaluation": ev.model_dump()}
    assert report["model"]["key"] == inputs["key"]
    heldout = TraceSet.load(inputs["heldout"])
    assert report["heldout"] == {"path": str(inputs["heldout"]), "digest": heldout.manifest["digest"], "n_traces": 4}
    results = report["results"]
    assert list(results) == ["dense", "0.10", "0.20"]

    # Reference numbers from a freshly loaded model, masked directly (no restore involved).
    items = load_items(eval_params.tasks["arith"], "test")[: ev.num_items]
    assert report["item_ids"] == [item.id for item in items]
    greedy_spec = SamplingSpec(0.0, ev.top_p, ev.top_k, ev.max_new_tokens)
    sampled_spec = SamplingSpec(ev.temperature, ev.top_p, ev.top_k, ev.max_new_tokens)
    summary = ("n", "accuracy_strict", "accuracy_flexible", "mean_completion_tokens", "truncation_rate",
               "reflection_rate", "per_item")
    markers = ev.reflection_markers
    for label in results:
        model, tokenizer = load_model(eval_params.model.name_or_path)
        r = results[label]
        if label == "dense":
            assert r["sparsity"] == 0.0 and "mask_digest" not in r
        else:
            mask = inputs["masks"][label]
            apply_mask(model, mask, inputs["s"])
            assert r["sparsity"] == mask.sparsity(inputs["s"])
            assert r["structure_ratio"] == mask.structure_ratio(inputs["s"])
            assert (r["target"], r["mask_digest"]) == (float(label), mask.digest())
        greedy = evaluate_task(model, tokenizer, items, "gsm8k", greedy_spec, ev.batch_size, seed=0, markers=markers)
        assert list(r["greedy"]) == list(summary) and r["greedy"] == {k: greedy[k] for k in summary}
        assert r["greedy"]["per_item"]["correct_strict"] == [int(x["correct_strict"]) for x in greedy["records"]]
        # all samples in one pass: rows are sample-major (row k*n + i is sample k of item i)
        every = evaluate_task(model, tokenizer, items * SAMPLES, "gsm8k", sampled_spec, ev.batch_size,
                              seed=ev.sample_seed, markers=markers)["records"]
        n = len(items)
        per_sample = [{"sample": k, **{key: v for key, v in summarize(every[k * n:(k + 1) * n]).items() if key in summary}}
                      for k in range(SAMPLES)]
        assert r["sampled"]["per_sample"] == per_sample
        assert [x["id"] for x in every[n:]] == [item.id for item in items]
        assert list(r["sampled"]) == ["accuracy_strict", "accuracy_flexible", "mean_completion_tokens",
                                      "truncation_rate", "reflection_rate", "per_sample"]
        for key in ("accuracy_strict", "accuracy_flexible", "mean_completion_tokens", "truncation_rate", "reflection_rate"):
            assert r["sampled"][key] == pytest.approx((per_sample[0][key] + per_sample[1][key]) / 2)
        nll = decode_only_nll(model, heldout.traces[:4], 3, tokenizer.pad_token_id)
        assert r["nll"] == {**nll, "nll": reported_nll(nll["nll"])}  # metrics files hold 4 significant digits
    assert results["dense"]["nll"]["n_tokens"] == sum(len(t.completion_ids) for t in heldout.traces)
    nlls = [results[label]["nll"]["nll"] for label in results]
    assert len(set(nlls)) == 3  # pruning changes the model

    first = out.read_bytes()
    assert first.decode() == json.dumps(report, indent=2) + "\n"   # the format metrics files have always had
    evaluate_masks(eval_params, "arith", "resp", masks, inputs["heldout"], out, include_dense=True)
    assert out.read_bytes() == first


def test_evaluate_masks_refuses_a_foreign_mask(eval_params, evaluation_inputs, tmp_path):
    model, _ = load_model(eval_params.model.name_or_path)
    save_mask(evaluation_inputs["masks_dir"], 0.3, model, "f" * 64, seed=3)
    masks = masks_in_dir(evaluation_inputs["masks_dir"])
    out = tmp_path / "resp.json"
    with pytest.raises(MaskError, match=r"sparsity-0\.30\.safetensors: mask was made for model ffffffffffffffff, "
                                        r"not this model [0-9a-f]{16}: prune this model or load the model the mask belongs to$"):
        evaluate_masks(eval_params, "arith", "resp", masks, evaluation_inputs["heldout"], out, include_dense=True)
    assert not out.exists()


def test_evaluate_masks_refuses_foreign_heldout_traces(eval_params, tmp_path):
    _, tokenizer = load_model(eval_params.model.name_or_path)
    heldout = save_heldout(tmp_path / "heldout.jsonl", tokenizer, "e" * 64)
    with pytest.raises(EvaluationError, match=rf"^held-out traces {heldout} were generated by model eeeeeeeeeeeeeeee, "
                                              r"not this model [0-9a-f]{16}: regenerate them with `resp traces` on this model$"):
        evaluate_masks(eval_params, "arith", "dense", {}, heldout, tmp_path / "dense.json", include_dense=True)


@pytest.mark.parametrize("update,masks,include_dense,message", [
    ({}, {}, False, "nothing to evaluate: give masks (--masks-dir) or include the dense model (--dense)"),
])
def test_evaluate_masks_bad_input(eval_params, tmp_path, update, masks, include_dense, message):
    params = eval_params.model_copy(update={"evaluation": eval_params.evaluation.model_copy(update=update)})
    with pytest.raises(EvaluationError, match="^" + re.escape(message) + "$"):
        evaluate_masks(params, "arith", "dense", masks, None, tmp_path / "dense.json", include_dense)


def test_cli_evaluate(eval_params, evaluation_inputs, tmp_path, monkeypatch):
    """`resp evaluate` writes what evaluate_masks writes, from a params file and --set overrides."""
    monkeypatch.chdir(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(eval_params.model_dump()))
    runner = CliRunner()
    dense_out, resp_out = tmp_path / "cli" / "dense.json", tmp_path / "cli" / "resp.json"
    result = runner.invoke(app, ["evaluate", "--task", "arith", "--dense", "--heldout", str(evaluation_inputs["heldout"]),
                                 "--out", str(dense_out), "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    expected = tmp_path / "expected.json"
    evaluate_masks(eval_params, "arith", "dense", {}, evaluation_inputs["heldout"], expected, include_dense=True)
    assert dense_out.read_bytes() == expected.read_bytes()
    assert result.stdout.startswith("arith dense dense: sparsity 0.0000, accuracy strict/flexible greedy ")
    assert result.stdout.endswith(f"wrote {dense_out}\n")

    result = runner.invoke(app, ["evaluate", "--task", "arith", "--method", "resp", "--masks-dir",
                                 str(evaluation_inputs["masks_dir"]), "--out", str(resp_out), "--params", str(params_file),
                                 "--set", "evaluation.nll_traces=0"])
    assert result.exit_code == 0, result.output
    report = json.loads(resp_out.read_text())
    assert list(report["results"]) == ["0.10", "0.20"]
    assert report["heldout"] is None and report["results"]["0.10"]["nll"] is None

    result = runner.invoke(app, ["evaluate", "--task", "arith", "--masks-dir", "m", "--out", "x.json", "--params", str(params_file)])
    assert (result.exit_code, result.stderr) == (2, "error: --masks-dir and --method go together: the method names who made the masks\n")


# ---- evaluation.backend vllm: each model generated from its masked export (vllm stood in for)

GONE = "vllm is not installed here: set RESP_VLLM_PYTHON to the python of a vLLM environment (README, GPU users), or set evaluation.backend: hf"


def test_evaluate_task_with_vllm_scores_its_completions(stand_in_vllm, tiny_model_dir, tiny_tokenizer):
    """The same replies through vLLM and through `generate` give the same records and metrics."""
    scripted = ScriptedModel(tiny_tokenizer, REPLIES)
    vllm = stand_in_vllm(lambda n, index, prompt_ids, sampling: scripted.replies[tuple(prompt_ids)][: sampling["max_tokens"]])
    with VllmEngine(tiny_model_dir, 0.3, revision="abc123") as engine:
        got = evaluate_task(None, tiny_tokenizer, ARITH, "gsm8k", SPEC, batch_size=2, seed=5, engine=engine)
    assert got == evaluate_task(scripted, tiny_tokenizer, ARITH, "gsm8k", SPEC, batch_size=2, seed=5)
    assert [r["truncated"] for r in got["records"]] == [False, False, True]
    [llm] = vllm.llms
    assert llm["llm"] == {"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir), "revision": "abc123",
                          "tokenizer_revision": "abc123", "gpu_memory_utilization": 0.3}
    [call] = llm["passes"]
    assert [s["seed"] for s in call["sampling"]] == [5, 6, 7]
    assert engine.llm is None  # closed on leaving the block


@pytest.fixture
def vllm_params(eval_params):
    """eval_params with evaluation.backend vllm and room for the scripted replies."""
    ev = eval_params.evaluation.model_copy(update={"backend": "vllm", "max_new_tokens": 64})
    return eval_params.model_copy(update={"evaluation": ev})


def scripted_reply(tokenizer, call: int, index: int, gold: str) -> list[int]:
    """The reply to item `index` in the `call`-th generate call: right when (index + call) % 5 == 0,
    no EOS (truncated) when (index + call) % 4 == 3, longer for later calls."""
    answer = gold if (index + call) % 5 == 0 else "unknown"
    ids = tokenizer("<think>\n" + "ok\n" * call + f"</think>\n\nThe answer is {answer}.", add_special_tokens=False)["input_ids"]
    return ids if (index + call) % 4 == 3 else ids + [tokenizer.convert_tokens_to_ids(IM_END)]


def scripted_summary(tokenizer, call: int, golds: list[str], offset: int = 0) -> dict:
    """The metrics of replies offset..offset+n-1 of a call (row offset + i answers item i)."""
    n = len(golds)
    rows = range(offset, offset + n)
    replies = [scripted_reply(tokenizer, call, row, gold) for row, gold in zip(rows, golds)]
    correct = [int((row + call) % 5 == 0) for row in rows]   # every reply states its answer after </think>
    truncated = [int((row + call) % 4 == 3) for row in rows]
    return {"n": n, "accuracy_strict": sum(correct) / n, "accuracy_flexible": sum(correct) / n,
            "mean_completion_tokens": sum(len(r) for r in replies) / n, "truncation_rate": sum(truncated) / n,
            "reflection_rate": 0.0,
            "per_item": {"correct_strict": correct, "correct_flexible": correct,
                         "completion_tokens": [len(r) for r in replies], "truncated": truncated, "reflection": [0] * n}}


def test_evaluate_masks_with_vllm_generates_from_each_masked_export(vllm_params, evaluation_inputs, stand_in_vllm, tmp_path):
    inputs, ev, s = evaluation_inputs, vllm_params.evaluation, evaluation_inputs["s"]
    model, tokenizer = load_model(vllm_params.model.name_or_path)
    items = load_items(vllm_params.tasks["arith"], "test")[: ev.num_items]
    golds = [item.gold for item in items]

    def inspect_export(model_dir):
        """What the directory vLLM is asked to load holds, read while it exists."""
        from safetensors.torch import load_file

        directory = Path(model_dir)
        weights = load_file(directory / "model.safetensors")
        layers = range(s.num_layers)
        heads = torch.stack([weights[f"model.layers.{i}.self_attn.q_proj.weight"].view(s.num_heads, s.head_dim, -1)
                             .ne(0).flatten(1).any(1) for i in layers])
        channels = torch.stack([weights[f"model.layers.{i}.mlp.up_proj.weight"].ne(0).any(1) for i in layers])
        manifest = json.loads((directory / "resp_manifest.json").read_text())
        return {"dir": directory, "heads": heads, "channels": channels, "format": manifest["format"],
                "mask_digest": manifest["mask_digest"]}

    vllm = stand_in_vllm(lambda call, index, prompt_ids, sampling: scripted_reply(tokenizer, call, index,
                                                                                  golds[index % len(golds)]),
                         inspect_export)
    out = tmp_path / "resp.json"
    evaluate_masks(vllm_params, "arith", "resp", masks_in_dir(inputs["masks_dir"]), inputs["heldout"], out, include_dense=True)
    report = json.loads(out.read_text())
    assert report["evaluation"] == {**ev.model_dump(), "backend": "vllm"}
    results = report["results"]
    variants = {"dense": Mask.dense(s), **inputs["masks"]}
    assert list(results) == list(variants) == ["dense", "0.10", "0.20"]

    # One LLM per variant, serving its two passes: greedy, then every sample of every item.
    n_passes = 2
    assert [len(llm["passes"]) for llm in vllm.llms] == [n_passes] * len(variants)
    prompts = [{"prompt_token_ids": tokenizer(render_prompt(tokenizer, item.message), add_special_tokens=False)["input_ids"]}
               for item in items]
    eos = sorted({tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id})
    export_dirs = []
    for v, (label, mask) in enumerate(variants.items()):
        llm = vllm.llms[v]
        export = llm["loaded"]
        export_dirs.append(export["dir"])
        assert (export["format"], export["mask_digest"]) == ("masked", mask.digest())
        assert torch.equal(export["heads"], mask.heads) and torch.equal(export["channels"], mask.channels)
        assert llm["llm"] == {"model": str(export["dir"]), "tokenizer": str(export["dir"]), "revision": None,
                              "tokenizer_revision": None,
                              "gpu_memory_utilization": vllm_params.scale.vllm_gpu_memory_utilization}
        for c, (temperature, rows) in zip(llm["passes"], [(0.0, prompts), (ev.temperature, prompts * SAMPLES)]):
            assert c["prompts"] == rows
            assert c["sampling"] == [{"temperature": temperature, "top_p": ev.top_p, "top_k": ev.top_k,
                                      "max_tokens": ev.max_new_tokens, "seed": ev.sample_seed + i, "stop_token_ids": eos,
                                      "skip_special_tokens": False} for i in range(len(rows))]
        # The metrics are those of the stand-in's completions; NLL is the Hugging Face model's.
        r = results[label]
        first = v * n_passes
        assert r["greedy"] == scripted_summary(tokenizer, first, golds)
        assert r["sampled"]["per_sample"] == [{"sample": k, **scripted_summary(tokenizer, first + 1, golds, k * len(golds))}
                                              for k in range(SAMPLES)]
        fresh, _ = load_model(vllm_params.model.name_or_path)
        apply_mask(fresh, mask, s)
        heldout = TraceSet.load(inputs["heldout"]).traces[:ev.nll_traces]
        nll = decode_only_nll(fresh, heldout, ev.nll_batch_size, tokenizer.pad_token_id)
        assert r["nll"] == {**nll, "nll": reported_nll(nll["nll"])}
    assert len(set(export_dirs)) == len(variants)
    assert not any(d.exists() or d.parent.exists() for d in export_dirs)  # temporary directories removed
    # the script varies per call
    assert len({tuple(results[label]["greedy"]["per_item"]["correct_strict"]) for label in results}) > 1


def test_evaluate_masks_without_vllm_says_how_to_fix_before_loading(vllm_params, monkeypatch, tmp_path):
    import sys

    import resp.evaluation as evaluate

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded before vllm was checked"))
    out = tmp_path / "dense.json"
    with pytest.raises(GenerationError, match="^" + re.escape(GONE) + "$"):
        evaluate_masks(vllm_params, "arith", "dense", {}, None, out, include_dense=True)
    assert not out.exists()


def test_no_samples_skips_the_sampled_pass(eval_params, evaluation_inputs, tmp_path):
    params = eval_params.model_copy(update={"evaluation": eval_params.evaluation.model_copy(update={"samples": 0})})
    evaluate_masks(params, "arith", "resp", {}, evaluation_inputs["heldout"], tmp_path / "none.json", include_dense=True)
    evaluate_masks(eval_params, "arith", "resp", {}, evaluation_inputs["heldout"], tmp_path / "seeds.json", include_dense=True)
    without = json.loads((tmp_path / "none.json").read_text())["results"]["dense"]
    with_seeds = json.loads((tmp_path / "seeds.json").read_text())["results"]["dense"]
    assert without["sampled"] is None and with_seeds["sampled"] is not None
    assert without["greedy"] == with_seeds["greedy"] and without["nll"] == with_seeds["nll"]   # greedy ignores the seed
