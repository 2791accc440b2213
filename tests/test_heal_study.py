"""benchmarks/heal_study.py: the run order, the ratio interval, re-keying a legacy mask, and one unit end to end
(heal a study mask, evaluate it as the study does, pair it with the study cell) on the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from resp import artifacts
from resp.masks import Mask
from resp.models import LEGACY_IDENTITY_FILES, content_hash, load_model, model_identity
from resp.stats import cluster_bootstrap
from resp.structures import structures_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hs():
    spec = importlib.util.spec_from_file_location("heal_study", ROOT / "benchmarks" / "heal_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_runs_the_first_methods_on_the_first_task_and_target_first(hs):
    units = hs.plan(tasks=("arith", "choice"), targets=(0.5, 0.3), seeds=(0, 1), first=("resp", "gisp"),
                    later=("generic",))
    assert units[:4] == [("arith", "resp", 0, 0.5), ("arith", "resp", 1, 0.5), ("arith", "gisp", 0, 0.5),
                         ("arith", "gisp", 1, 0.5)]
    assert units[4] == ("arith", "resp", 0, 0.3)
    assert units[8] == ("choice", "resp", 0, 0.5)
    assert units[16:] == [(t, "generic", s, x) for t in ("arith", "choice") for x in (0.5, 0.3) for s in (0, 1)]
    assert len(set(units)) == len(units) == 2 * 2 * 2 * 3


def test_cluster_ratio_uses_the_resamples_of_cluster_bootstrap(hs):
    rng = np.random.default_rng(3)
    num = rng.integers(0, 2, size=(3, 50)).astype(float)
    # over a denominator of ones the ratio is the mean itself: the same draws give the same interval
    assert hs.cluster_ratio(num, np.ones_like(num), 500, 0.95, 7) == pytest.approx(cluster_bootstrap(num, 500, 0.95, 7))
    # a constant denominator scales every resample, so the interval scales too
    mean, low, high = cluster_bootstrap(num, 500, 0.95, 7)
    assert hs.cluster_ratio(num, np.full_like(num, 0.5), 500, 0.95, 7) == pytest.approx((2 * mean, 2 * low, 2 * high))
    with pytest.raises(ValueError, match="same shape|one shape"):
        hs.cluster_ratio(num, num[:2], 10, 0.95, 0)


def _result(correct: list[int]) -> dict:
    """A record/cell result as the study and this benchmark write them (greedy only)."""
    return {"item_ids": [f"i{k}" for k in range(len(correct))], "greedy": {"per_item": {"correct_strict": correct}}}


def test_versus_reference_pairs_each_method_with_resp_by_seed_and_item(hs, tiny_params):
    """gisp minus resp per item: before healing (cells) and after (records), on the seeds both have."""
    resp = {0: ([1, 1, 0, 1], [1, 0, 0, 0]), 1: ([1, 0, 1, 1], [0, 0, 1, 0])}     # seed: (healed, unhealed)
    gisp = {0: ([1, 0, 0, 1], [0, 0, 0, 0]), 1: ([0, 0, 1, 1], [0, 0, 0, 0]), 2: ([1, 1, 1, 1], [1, 1, 1, 1])}

    def pairs(by_seed):
        return [({**_result(h), "seed": s}, _result(u)) for s, (h, u) in by_seed.items()]

    report = tiny_params.report
    [entry] = hs.versus_reference({("arith", 0.5, "resp"): pairs(resp), ("arith", 0.5, "gisp"): pairs(gisp)}, report)
    assert (entry["method"], entry["seeds"]) == ("gisp", [0, 1])            # seed 2 has no resp to pair with
    healed = np.array([[0, -1, 0, 0], [-1, 0, 0, 0]], dtype=float)          # gisp - resp, by hand
    unhealed = np.array([[-1, 0, 0, 0], [0, 0, -1, 0]], dtype=float)
    args = (report.bootstrap_samples, report.confidence, report.seed)
    assert entry["greedy"]["healed"] == pytest.approx(cluster_bootstrap(healed, *args))
    assert entry["greedy"]["unhealed"] == pytest.approx(cluster_bootstrap(unhealed, *args))
    assert entry["greedy"]["healed"][0] == pytest.approx(-0.25) and entry["sampled"] is None


def _study_mask(path: Path, model_dir: Path, key: str, params) -> Mask:
    model, _ = load_model(str(model_dir))
    s = structures_for(model, params.prune.attention_unit, params.prune.protected_layers)
    mask = Mask.dense(s)
    layer = s.prunable_layers[0]
    mask.heads[layer, 0] = False
    mask.channels[layer, :7] = False
    mask.save(path, {"model": {"name": str(model_dir), "revision": None, "content_hash": key, "key": key},
                     "method": "resp", "target": 0.3, "label": "resp", "attention_unit": s.attention_unit,
                     "protected_layers": list(s.protected)})
    return mask


def test_a_legacy_keyed_mask_is_rekeyed_only_for_its_own_model(hs, tmp_path, tiny_model_dir, tiny_params):
    legacy = content_hash(tiny_model_dir, LEGACY_IDENTITY_FILES)
    assert legacy != model_identity(str(tiny_model_dir)).key   # the case the re-keying exists for
    mask = _study_mask(tmp_path / "study.safetensors", tiny_model_dir, legacy, tiny_params)
    out = hs.rekeyed_mask(tmp_path / "study.safetensors", tmp_path / "copy.safetensors", str(tiny_model_dir))
    copy, meta = Mask.load(out)
    assert copy.digest() == mask.digest()
    assert meta["model"]["key"] == model_identity(str(tiny_model_dir)).key
    assert meta["rekeyed_from"]["model_key"] == legacy
    _study_mask(tmp_path / "other.safetensors", tiny_model_dir, "f" * 64, tiny_params)
    with pytest.raises(SystemExit, match="was made for model ffffffffffffffff"):
        hs.rekeyed_mask(tmp_path / "other.safetensors", tmp_path / "other-copy.safetensors", str(tiny_model_dir))
    assert not (tmp_path / "other-copy.safetensors").exists()


def test_one_unit_heals_a_study_mask_and_pairs_with_its_cell(hs, tmp_path, tiny_model_dir, tiny_params, monkeypatch):
    from resp.config import Params
    from resp.study import cell_params

    monkeypatch.chdir(tmp_path)
    tree = tiny_params.model_dump(mode="json")
    tree["methods"]["resp_heal"]["heal"].update(steps=3, warmup_steps=1, num_prompts=4, batch_size=2, checkpoint_every=0)
    tree["study"].update(dir="study", work_dir="study-work", num_items=6)
    params = Params.model_validate(tree)
    checkout = tmp_path / "checkout"
    root, work = checkout / "study", checkout / "study-work"
    artifacts.write_json(root / "study.json", {"format": 1})
    mask_path = artifacts.mask_file(work / "runs" / "arith" / "resp" / "seed-1" / "masks", 0.3)
    mask = _study_mask(mask_path, tiny_model_dir, content_hash(tiny_model_dir, LEGACY_IDENTITY_FILES), params)
    ev = cell_params(params, 1).evaluation.model_dump(mode="json")

    def result(correct):
        block = {"accuracy_strict": float(np.mean(correct)), "accuracy_flexible": float(np.mean(correct)),
                 "mean_completion_tokens": 5.0, "truncation_rate": 0.0, "reflection_rate": 0.0,
                 "per_item": {"correct_strict": correct}}
        return {"sparsity": 0.1, "greedy": block, "sampled": {**block, "per_sample": [{**block, "sample": 0}]}}

    unhealed = [0, 1, 0, 0, 1, 0]
    artifacts.write_json(root / "cells" / "arith" / "resp" / "seed-1.json",
                         {"inputs": {"evaluation": ev}, "results": {"0.30": result(unhealed)}})
    study = hs.StudyInput(checkout, params)
    out = tmp_path / "heal-work"
    record = hs.run_unit(params, study, out, "arith", "resp", 1, 0.3, None, False)

    assert record["mask_digest"] == mask.digest() and record["seed"] == 1
    assert record["heal"]["steps"] == 3 and record["cost"]["trained_tokens"] > 0
    traces = json.loads(artifacts.manifest_path(Path(record["healing_traces"]["path"])).read_text())
    assert traces["sampling"]["seed"] == 1 and traces["n"] == 4   # the seed's own healing data
    assert len(record["item_ids"]) == 6 and len(record["greedy"]["per_item"]["correct_strict"]) == 6
    assert "records" not in record["greedy"]
    assert (out / "records" / "arith-resp-seed1-0.30.json").is_file()
    # a rerun reads the record instead of healing again
    assert hs.run_unit(params, study, out, "arith", "resp", 1, 0.3, None, False) == record

    dense = result([1, 1, 1, 0, 1, 1])
    row = hs.summarize_row([record], [study.cell("arith", "resp", 1)["results"]["0.30"]], dense, params.report)
    healed = np.asarray(record["greedy"]["per_item"]["correct_strict"], dtype=float)
    assert row["greedy"]["healed_minus_unhealed"][0] == pytest.approx(healed.mean() - np.mean(unhealed))
    assert row["greedy"]["healed_over_dense"][0] == pytest.approx(healed.mean() / (5 / 6))
    assert row["greedy"]["failure"]["unhealed"]["mean_completion_tokens"] == 5.0

    # a cell evaluated under other settings is refused, not paired
    artifacts.write_json(root / "cells" / "arith" / "resp" / "seed-1.json",
                         {"inputs": {"evaluation": {**ev, "num_items": 7}}, "results": {"0.30": result(unhealed)}})
    with pytest.raises(SystemExit, match="other evaluation settings"):
        hs.run_unit(params, study, tmp_path / "other-work", "arith", "resp", 1, 0.3, None, False)
