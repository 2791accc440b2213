"""resp.study and resp.study_report: cells over calibration seeds, resumable, refusing changed inputs and
foreign directories; the analysis pairs by seed and item."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from resp import study as study_mod
from resp.config import ParamsError, load_params
from resp.study import Study, StudyError, cell_params, cells, run_study
from resp.study_report import analyse, write_study_report


def study_params(tiny_params, tmp_path, **extra):
    overrides = {"study.dir": str(tmp_path / "study"), "study.work_dir": str(tmp_path / "work"),
                 "study.seeds": "[0, 1]", "study.tasks": "[arith]", "study.methods": "[resp_noregen, magnitude, random]",
                 "study.targets": "[0.1, 0.2]", "study.num_items": "4", "study.samples": "1",
                 "study.reference": "resp_noregen", **extra}
    tree = tiny_params.model_dump(mode="json")
    for key, value in overrides.items():
        section, name = key.split(".")
        tree[section][name] = yaml.safe_load(value)
    return type(tiny_params).model_validate(tree)


@pytest.mark.parametrize("seeds, message", [
    ("[0, 1, 0]", "study.seeds: Value error, seeds [0, 1, 0] repeat [0]: a repeated seed would count one calibration "
                  "twice; list each seed once"),
    ("[0, 1.5]", "study.seeds.1: Input should be a valid integer"),
    ("[0, '1']", "study.seeds.1: Input should be a valid integer"),
    ("[]", "study.seeds: Value error, seeds is empty"),
])
def test_seed_lists_are_validated(seeds, message):
    with pytest.raises(ParamsError, match="^params.yaml is invalid: " + message.replace("[", r"\[").replace("]", r"\]")
                       .replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_params("params.yaml", [f"study.seeds={seeds}"])


def test_cells_run_data_free_methods_once_and_follow_the_priority_order(tiny_params, tmp_path):
    p = study_params(tiny_params, tmp_path)
    assert cells(p) == [("arith", "resp_noregen", 0), ("arith", "resp_noregen", 1), ("arith", "magnitude", 0),
                        ("arith", "random", 0), ("arith", "random", 1)]
    seeded = cell_params(p, 1)
    assert (seeded.calibration.seed, seeded.generation.seed, seeded.prune.seed) == (1, 1, 1)
    assert seeded.prune.targets == [0.1, 0.2] and seeded.evaluation.num_items == 4 and seeded.evaluation.nll_traces == 0


def test_a_study_resumes_cell_by_cell_and_refuses_changed_inputs(tiny_params, tmp_path, monkeypatch):
    p = study_params(tiny_params, tmp_path)
    first = run_study(p, limit=2)
    assert [(r["method"], r["seed"]) for r in first] == [("resp_noregen", 0), ("resp_noregen", 1)]
    done = sorted(str(f.relative_to(tmp_path / "study")) for f in (tmp_path / "study" / "cells").rglob("*.json"))
    assert done == ["cells/arith/resp_noregen/seed-0.json", "cells/arith/resp_noregen/seed-1.json"]
    # the two seeds calibrated on different traces, so their masks differ
    masks = [r["results"]["0.20"]["mask_digest"] for r in first]
    assert masks[0] != masks[1]

    # resuming runs only what is missing: finished cells are read back, not pruned again
    import resp.recipe

    pruned = []
    real_prune = resp.recipe.prune
    monkeypatch.setattr(resp.recipe, "prune", lambda *a, **k: pruned.append(a[2].name) or real_prune(*a, **k))
    again = run_study(p)
    assert pruned == ["magnitude", "random", "random"]
    assert again[:2] == first
    # random's masks depend on the seed, magnitude's do not (one cell stands for every seed)
    by = {(r["method"], r["seed"]): r for r in again}
    assert by["random", 0]["results"]["0.20"]["mask_digest"] != by["random", 1]["results"]["0.20"]["mask_digest"]

    changed = study_params(tiny_params, tmp_path, **{"study.num_items": "3"})
    with pytest.raises(StudyError, match=r"^study cell dense/arith was made from other inputs \(evaluation.num_items "
                                         r"changed\): delete its file to recompute it"):
        run_study(changed)
    tree = p.model_dump(mode="json")
    tree["prune"]["steps"] = 3
    steps = type(p).model_validate(tree)
    with pytest.raises(StudyError, match=r"^study cell arith/resp_noregen/seed-0 was made from other inputs "
                                         r"\(prune.prune.steps changed\)"):
        run_study(steps)


def test_a_study_directory_of_another_format_or_owner_is_refused(tiny_params, tmp_path, monkeypatch):
    p = study_params(tiny_params, tmp_path)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="is not empty and holds no study.json: resp writes a study only into an empty "
                                         "or its own directory"):
        Study(p).open()
    (tmp_path / "study" / "study.json").write_text(json.dumps({"format": 0}))
    with pytest.raises(StudyError, match=f"was written by study format 0, this resp writes format "
                                         f"{study_mod.STUDY_FORMAT}: use a new study.dir"):
        Study(p).open()
    assert (tmp_path / "study" / "notes.txt").read_text() == "mine"


def test_the_analysis_pairs_by_seed_and_item(tiny_params, tmp_path):
    p = study_params(tiny_params, tmp_path, **{"study.methods": "[resp_noregen, magnitude]"})
    run_study(p)
    out = analyse(p)
    task = out["tasks"]["arith"]
    records = {seed: json.loads((tmp_path / "study" / "cells" / "arith" / "resp_noregen" / f"seed-{seed}.json").read_text())
               for seed in (0, 1)}
    magnitude = json.loads((tmp_path / "study" / "cells" / "arith" / "magnitude" / "seed-0.json").read_text())
    ref = np.array([records[s]["results"]["0.20"]["greedy"]["per_item"]["correct_strict"] for s in (0, 1)], dtype=float)
    mag = np.array(magnitude["results"]["0.20"]["greedy"]["per_item"]["correct_strict"], dtype=float)
    iv = task["methods"]["resp_noregen"]["0.20"]["greedy"]
    assert iv["mean"] == pytest.approx(ref.mean()) and iv["per_seed"] == pytest.approx(ref.mean(axis=1).tolist())
    diff = task["differences"]["magnitude - resp_noregen"]
    assert diff["seeds"] == [0, 1]   # the one magnitude cell pairs with every seed of the reference
    assert diff["0.20"]["greedy"]["mean"] == pytest.approx((mag[None, :] - ref).mean())
    comp = task["methods"]["magnitude"]["0.20"]["composition"]
    assert comp == magnitude["results"]["0.20"]["composition"] | {"per_layer": comp["per_layer"]}
    written = write_study_report(p)
    text = written.read_text()
    assert "| magnitude | 1 |" in text and "| resp_noregen | 2 |" in text
    assert (tmp_path / "study" / "plots" / "accuracy_arith.png").stat().st_size > 0
    assert json.loads((tmp_path / "study" / "metrics.json").read_text())["cells_done"] == 3
