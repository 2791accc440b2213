"""End-to-end method runs on a tiny random Qwen3 with real generation (seconds on CPU)."""

import json

import pytest

from resp.config import ParamsError, declared_method
from resp.masks import Mask
from resp.recipe import RecipeError, make_traces, prune
from resp.structures import StructureError
from resp.traces import TraceError, TraceSet


@pytest.fixture
def dense_traces(tiny_params, tmp_path):
    return make_traces(tiny_params, "arith", "train", None, tmp_path / "dense.jsonl")


def test_make_traces_manifest(tiny_params, dense_traces):
    ts = TraceSet.load(dense_traces)
    assert len(ts.traces) == 6
    m = ts.manifest
    assert m["sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 12, "seed": 0,
                             "backend": "hf"}
    assert m["mask_digest"] is None and m["model"]["content_hash"] and m["n"] == 6
    assert m["prompt_ids"] == [t.prompt_id for t in ts.traces]
    # decode-only: every completion ends in <|im_end|> or is truncated at max_new_tokens
    assert all(t.truncated == (len(t.completion_ids) == 12 and t.completion_ids[-1] != 2) for t in ts.traces)


def test_resp_regenerates_at_milestones_and_saves_nested_masks(tiny_params, dense_traces, tmp_path):
    written = prune(tiny_params, "arith", declared_method(tiny_params, "resp"), tmp_path / "run", str(dense_traces))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    tags = [t["tag"] for t in summary["trace_sets"]]
    assert tags == ["initial", "milestone-0.05", "milestone-0.10"]       # each milestone exactly once
    assert len(summary["steps"]) == 4
    masks = {t: Mask.load(p) for t, p in written.items()}
    (m1, meta1), (m2, meta2) = masks[0.1], masks[0.2]
    assert m1.contains(m2)
    assert meta2["sparsity"] >= 0.2 and meta1["sparsity"] >= 0.1
    assert [t["digest"] for t in meta2["trace_sets"]] == [t["digest"] for t in summary["trace_sets"]]
    assert meta2["trace_sets"][0]["digest"] == TraceSet.load(dense_traces).manifest["digest"]
    # the 0.1 mask was saved at step 2, before the 0.10 regeneration: only the traces it used
    assert [t["tag"] for t in meta1["trace_sets"]] == ["initial", "milestone-0.05"]
    regenerated = TraceSet.load(tmp_path / "run" / "traces" / "milestone-0.10.jsonl")
    assert regenerated.manifest["mask_digest"] is not None
    assert m2.heads[-1].all() and m2.channels[-1].all()          # last layer protected


def test_same_params_same_masks(tiny_params, dense_traces, tmp_path):
    a = prune(tiny_params, "arith", declared_method(tiny_params, "resp"), tmp_path / "a", str(dense_traces))
    b = prune(tiny_params, "arith", declared_method(tiny_params, "resp"), tmp_path / "b", str(dense_traces))
    assert [Mask.load(a[t])[0].digest() for t in a] == [Mask.load(b[t])[0].digest() for t in b]
    # the summaries hold no wall-clock time: equal bytes once each run's own directory is factored out
    summaries = [(tmp_path / run / "summary.json").read_text().replace(str(tmp_path / run), "RUN") for run in "ab"]
    assert summaries[0] == summaries[1] and "seconds" not in summaries[0]


# By hand from params.yaml: what each method calibrates on ("dense": the dense traces themselves, else the kind
# of the traces/calibration.jsonl it writes, None: nothing) and the tags of its trace sets (taylor: "initial",
# one-shot baselines: "calibration").
EVERY_METHOD = [("resp_noregen", "dense", ["initial"]), ("gisp", "gold", ["initial"]), ("generic", "text", ["initial"]),
                ("wanda_sp", "gold", ["calibration"]), ("owl_sp", "gold", ["calibration"]),
                ("flap", "gold", ["calibration"]), ("flap_nobias", "gold", ["calibration"]),
                ("magnitude", None, []), ("random", None, []), ("wanda_sp_self", "dense", ["calibration"])]


@pytest.mark.parametrize("method, calibrated_on, tags", EVERY_METHOD)
def test_every_method_writes_masks_at_targets(tiny_params, dense_traces, tmp_path, method, calibrated_on, tags):
    written = prune(tiny_params, "arith", declared_method(tiny_params, method), tmp_path / method,
                    str(dense_traces) if calibrated_on == "dense" else None)
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert [t["tag"] for t in summary["trace_sets"]] == tags
    for target, path in written.items():
        mask, meta = Mask.load(path)
        assert meta["method"] == method and meta["sparsity"] >= target
        assert meta["declaration"] == tiny_params.methods[method].model_dump()
        assert meta["label"] == method
        assert (mask.biases is not None) == (method == "flap")   # FLAP carries its compensation
    calibration = tmp_path / method / "traces" / "calibration.jsonl"
    assert calibration.exists() == (calibrated_on in ("gold", "text"))
    if calibrated_on == "dense":   # calibrated on the dense traces themselves, not a copy
        assert summary["trace_sets"][0]["digest"] == TraceSet.load(dense_traces).manifest["digest"]
    elif calibrated_on is not None:
        assert TraceSet.load(calibration).manifest["kind"] == calibrated_on


def test_calibration_source_is_an_axis_of_its_own(tiny_params, dense_traces, tmp_path):
    """The same scorer on self-generated and gold calibration gives different masks, and the
    self-calibrated Wanda-sp reads exactly the dense traces RESP reads."""
    gold = prune(tiny_params, "arith", declared_method(tiny_params, "wanda_sp"), tmp_path / "gold")
    own = prune(tiny_params, "arith", declared_method(tiny_params, "wanda_sp_self"), tmp_path / "self",
                str(dense_traces))
    assert any(Mask.load(gold[t])[0].digest() != Mask.load(own[t])[0].digest() for t in gold)
    assert Mask.load(own[0.2])[1]["trace_sets"][0]["path"] == str(dense_traces)


def test_bad_inputs(tiny_params, tmp_path, dense_traces):
    with pytest.raises(RecipeError, match="this method calibrates on the dense model's own traces: pass --traces"):
        prune(tiny_params, "arith", declared_method(tiny_params, "resp"), tmp_path / "x")
    with pytest.raises(ParamsError, match="method 'obs' is not declared; declare it under `methods` in params.yaml"):
        declared_method(tiny_params, "obs")
    bad = tiny_params.model_copy(update={"prune": tiny_params.prune.model_copy(update={"protected_layers": [0, 1, 2, 3]})})
    with pytest.raises(StructureError, match="nothing is left to prune"):
        prune(bad, "arith", declared_method(bad, "magnitude"), tmp_path / "x")
    ts = TraceSet.load(dense_traces)
    for t in ts.traces:
        t.truncated = True
    ts.save(tmp_path / "trunc.jsonl")
    with pytest.raises(TraceError, match="all 6 traces are truncated"):
        prune(tiny_params, "arith", declared_method(tiny_params, "resp"), tmp_path / "y",
          str(tmp_path / "trunc.jsonl"))
    assert not (tmp_path / "y" / "masks").exists()                  # nothing half-written
    TraceSet([], TraceSet.load(dense_traces).manifest).save(tmp_path / "empty.jsonl")   # same lineage, no traces
    with pytest.raises(TraceError, match="the trace set is empty"):
        prune(tiny_params, "arith", declared_method(tiny_params, "resp"), tmp_path / "z",
          str(tmp_path / "empty.jsonl"))


def test_vllm_backend_generates_from_model_dirs(tiny_params, tmp_path, monkeypatch, dense_traces):
    """generation.backend=vllm: dense traces come from the model directory, regenerations from a
    masked export of the current mask; the backend is recorded. (vLLM itself is stood in for.)"""
    import resp.generation as generation

    calls = []

    def fake_vllm(model_dir, prompts, spec, seed, gpu_memory_utilization, backend_knob):
        assert backend_knob == "generation.backend"  # what a missing-vllm error would tell the user to set
        calls.append(str(model_dir))
        model, tokenizer = __import__("resp.models", fromlist=["load_model"]).load_model(str(model_dir))
        return generation.generate(model, tokenizer, prompts, spec, batch_size=4, seed=seed, desc="fake vllm")

    monkeypatch.setattr(generation, "generate_vllm", fake_vllm)
    params = tiny_params.model_copy(update={"generation": tiny_params.generation.model_copy(update={"backend": "vllm"})})
    path = make_traces(params, "arith", "train", None, tmp_path / "v.jsonl")
    assert calls == [str(tiny_params.model.name_or_path)]
    assert TraceSet.load(path).manifest["sampling"]["backend"] == "vllm"
    prune(params, "arith", declared_method(params, "resp"), tmp_path / "run", str(dense_traces))
    assert calls[1:] == [str(tmp_path / "run" / "masked" / tag) for tag in ("milestone-0.05", "milestone-0.10")]
    regenerated = TraceSet.load(tmp_path / "run" / "traces" / "milestone-0.10.jsonl")
    assert regenerated.manifest["sampling"]["backend"] == "vllm"


@pytest.mark.parametrize("scorer", ["taylor", "wanda_sp", "owl_sp", "flap"])
@pytest.mark.parametrize("calibration", ["self", "gold", "generic"])
def test_every_scorer_runs_on_every_calibration_source(tiny_params, dense_traces, tmp_path, scorer, calibration):
    from resp.config import MethodParams

    methods = {**tiny_params.methods, "probe": MethodParams(scorer=scorer, calibration=calibration)}
    params = tiny_params.model_copy(update={"methods": methods})
    written = prune(params, "arith", declared_method(params, "probe"), tmp_path / "probe",
                    str(dense_traces) if calibration == "self" else None)
    meta = Mask.load(written[0.2])[1]
    used = TraceSet.load(meta["trace_sets"][0]["path"]).manifest
    assert used["kind"] == {"self": "self_generated", "gold": "gold", "generic": "text"}[calibration]
    assert meta["declaration"] == {"scorer": scorer, "calibration": calibration, "regenerate": "none",
                                   "verify_select": False, "trace_filter": "none", "regeneration_stream": "fresh",
                                   "bias_compensation": True}


def test_selective_calibration_keeps_challenging_traces_and_regenerates_their_prompts(tiny_params, tmp_path):
    params = tiny_params.model_copy(update={"calibration": tiny_params.calibration.model_copy(
        update={"num_prompts": 4, "select_candidates": 8, "select_samples": 2})})
    written = prune(params, "arith", declared_method(params, "resp_selective"), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    chosen = TraceSet.load(summary["trace_sets"][0]["path"])
    selection = chosen.manifest["selection"]
    assert len(chosen.traces) == 4 and selection["candidates"] == 8 and selection["samples"] == 2
    from resp.tasks import calibration_items
    candidates = [i.id for i in calibration_items(params.tasks["arith"], 8, params.calibration.seed)]
    assert set(chosen.manifest["prompt_ids"]) <= set(candidates) and len(set(chosen.manifest["prompt_ids"])) == 4
    assert chosen.manifest["prompt_ids"] == [t.prompt_id for t in chosen.traces]
    regenerated = TraceSet.load(tmp_path / "run" / "traces" / "milestone-0.10.jsonl")
    assert [t.prompt_id for t in regenerated.traces] == [t.prompt_id for t in chosen.traces]
    assert Mask.load(written[0.2])[1]["declaration"]["calibration"] == "self_selected"


@pytest.mark.parametrize("method, rule", [("resp_filter_correct", "correct"), ("resp_filter_agree", "correct_or_agree")])
def test_trace_filter_is_a_method_option(tiny_params, dense_traces, tmp_path, method, rule, monkeypatch):
    import resp.traces

    seen = []
    real = resp.traces.filter_traces

    def spy(traces, keep_rule, dense_answers=None):
        seen.append(keep_rule)
        return real(traces, "none", dense_answers)   # the random tiny model answers nothing right: score on all

    monkeypatch.setattr(resp.traces, "filter_traces", spy)
    prune(tiny_params, "arith", declared_method(tiny_params, method), tmp_path / "run", str(dense_traces))
    assert seen and set(seen) == {rule}
    prune(tiny_params, "arith", declared_method(tiny_params, "resp"), tmp_path / "plain", str(dense_traces))
    assert set(seen[-4:]) == {"none"}


def test_drift_method_logs_drift_and_counts_regenerations(tiny_params, dense_traces, tmp_path):
    params = tiny_params.model_copy(update={"prune": tiny_params.prune.model_copy(update={"drift_threshold": 1e-6})})
    prune(params, "arith", declared_method(params, "resp_drift"), tmp_path / "run", str(dense_traces))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    regenerated = [s for s in summary["steps"] if s["regenerated"]]
    assert len(summary["trace_sets"]) - 1 == len(regenerated) >= 1
    assert all(s["drift_before_regeneration"] > 1e-6 and s["drift"] == 0.0 for s in regenerated)
    assert all(t["tag"].startswith("drift-step") for t in summary["trace_sets"][1:])
    assert summary["steps"][0]["scored_sparsity"] == 0.0 and summary["steps"][0]["drift"] == 0.0
