"""params.yaml and dvc.yaml agree on the declared methods, and every stage's `params:` and code `deps:`
are what its stage declares in `resp.stages.table.STAGES` (the DVC lists are literal, so a test keeps them honest)."""

from pathlib import Path

import pytest
import yaml

from resp.stages import table
from resp.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent


def test_dvc_prunes_and_evaluates_every_method_of_the_run():
    """One prune and one evaluate stage per (task, method) of params.yaml `run`: no list of methods in dvc.yaml."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("prune", "evaluate"):
        assert stages[name]["matrix"] == {"task": "${run.tasks}", "method": "${run.methods}"}
    assert "--traces data/runs/${item.task}/traces/dense.jsonl" in stages["prune"]["cmd"]


# By hand: the stage names DVC gives dvc.yaml's stages for params.yaml's run (RUN: tasks, methods): a `foreach`
# over run.tasks is name@task, a `matrix` over tasks x methods name@task-method, any other stage its name.
RUN = (["arith"], ["resp", "resp_noregen", "gisp", "wanda_sp", "flap"])
STAGE_NAMES = {"world", "embedded_model", "world_check", "report",
               "dense_traces@arith", "heldout@arith", "heal_traces@arith", "heal@arith", "evaluate_dense@arith",
               "export@arith", "register@arith",
               "prune@arith-resp", "prune@arith-resp_noregen", "prune@arith-gisp", "prune@arith-wanda_sp",
               "prune@arith-flap",
               "evaluate@arith-resp", "evaluate@arith-resp_noregen", "evaluate@arith-gisp", "evaluate@arith-wanda_sp",
               "evaluate@arith-flap"}


def test_the_lock_records_only_the_stages_dvc_yaml_defines():
    """DVC keeps a lock entry for a stage that no longer exists and re-reads and re-writes the whole lock
    around every stage it runs (43 stale entries made each stage of the main job ~3 s slower)."""
    params = load_params(ROOT / "params.yaml")
    assert (params.run.tasks, params.run.methods) == RUN, "params.yaml's run changed: write STAGE_NAMES for it"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name.split("@")[0] for name in STAGE_NAMES} == set(stages), "dvc.yaml's stages changed: update STAGE_NAMES"
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    stale = sorted(locked - STAGE_NAMES)
    assert not stale, f"dvc.lock records stages dvc.yaml does not define for params.yaml's run: {stale}; delete them"


# dvc.yaml stage -> the declared stage it runs (the heal stages run methods.resp_heal's settings)
DVC_STAGES = {"dense_traces": "dense_traces", "heldout": "heldout_traces", "heal_traces": "heal_traces",
              "heal": "heal", "prune": "prune", "evaluate_dense": "evaluate", "evaluate": "evaluate",
              "export": "export", "register": "register", "report": "report"}


def test_every_dvc_stage_runs_a_declared_stage():
    assert set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]) - set(DVC_STAGES) == {
        "world", "embedded_model", "world_check"}   # the embedded world's own stages
    assert set(DVC_STAGES.values()) <= set(table.STAGES)


@pytest.mark.parametrize("dvc_stage, stage", sorted(DVC_STAGES.items()))
def test_every_dvc_stage_reads_what_its_stage_declares(dvc_stage, stage):
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][dvc_stage]
    if "foreach" in body:
        body, fill = body["do"], {"task": "${item}", "method": "resp_heal"}
    else:
        fill = {"task": "${item.task}", "method": "${item.method}"}
    params = table.stage_sections(stage, **fill)
    code = table.code_files(table.STAGES[stage].module)
    assert sorted(body.get("params", [])) == sorted(params), f"dvc.yaml {dvc_stage} params: should be {list(params)}"
    listed = sorted(d for d in body["deps"] if d.startswith("resp/"))
    assert listed == list(code), f"dvc.yaml {dvc_stage} deps on code should be {list(code)}"


def test_the_registry_hashes_the_params_a_pruning_run_reads():
    params = load_params(ROOT / "params.yaml")
    other_eval = load_params(ROOT / "params.yaml", ["evaluation.num_items=7", "methods.gisp.calibration=generic"])
    other_prune = load_params(ROOT / "params.yaml", ["prune.steps=3"])
    assert table.params_hash(params, "arith", "resp") == table.params_hash(other_eval, "arith", "resp")
    assert table.params_hash(params, "arith", "resp") != table.params_hash(other_prune, "arith", "resp")
    assert table.params_hash(params, "arith", "resp") != table.params_hash(params, "arith", "gisp")


@pytest.mark.parametrize("declaration, message", [
    ("{scorer: magnitude, calibration: gold}", "scorer magnitude reads no calibration data: set calibration: none"),
    ("{scorer: flap, calibration: none}", "scorer flap needs calibration data: set calibration to self, gold or generic"),
    ("{scorer: wanda_sp, calibration: self, regenerate: milestones}", "regenerate needs the iterative taylor scorer"),
    ("{scorer: taylor, calibration: gold, regenerate: drift}", "regenerate needs the iterative taylor scorer"),
    ("{scorer: taylor, calibration: self, regenerate: true}", "methods.x.regenerate"),
    ("{scorer: taylor, calibration: self, verify_select: true}", "verify_select branches at regeneration milestones: "
                                                                  "set regenerate: milestones"),
    ("{scorer: taylor, calibration: gold, trace_filter: correct}", "trace_filter keeps self-generated traces"),
    ("{scorer: obs, calibration: gold}", "methods.x.scorer"),
    ("{scorer: taylor, calibration: c4}", "methods.x.calibration"),
])
def test_a_method_declaration_a_scorer_cannot_use_is_one_line(declaration, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(")) as info:
        load_params(ROOT / "params.yaml", [f"methods.x={declaration}"])
    assert "\n" not in str(info.value)


def test_run_methods_must_be_declared():
    with pytest.raises(ParamsError, match=r"run.methods names undeclared methods \['sparsegpt'\]"):
        load_params(ROOT / "params.yaml", ["run.methods=[resp, sparsegpt]"])


@pytest.mark.parametrize("override, message", [
    ("world.train_items=100", r"train_items \(100\) is below test_items \(500\)"),
    ("world.check_items=600", r"check_items \(600\) exceeds test_items \(500\)"),
    ("calibration.select_candidates=8", r"select_candidates \(8\) is below num_prompts \(32\)"),
    ("calibration.select_length_quantiles=[0.9, 0.2]", r"select_length_quantiles \[0.9, 0.2\] must satisfy"),
    ("report.ablations=[resp_magic]", r"report names undeclared methods \['resp_magic'\]"),
    ("prune.targets=[0.125, 0.5]", r"targets \[0.125\] have more than two decimals"),
])
def test_world_calibration_and_report_params_that_cannot_work_are_one_line(override, message):
    with pytest.raises(ParamsError, match=message) as info:
        load_params(ROOT / "params.yaml", [override])
    assert "\n" not in str(info.value)
