"""What DVC tracks of a pruning run and of a healed model holds no float whose digits depend on the CPU's
float reduction order (thread count, SIMD width): `dvc repro` on another machine must leave dvc.lock, and
so git, as committed. The run directory and the healed models are the outputs dvc.yaml's prune and heal
stages declare; which of their files DVC hashes is asked of DVC itself (`dvc add` in a scratch project
with this repository's .dvcignore), as a user's `dvc repro` would hash them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from conftest import dvc, dvc_project, tiny_overrides
from typer.testing import CliRunner

from resp.artifacts import reported_change, reported_loss
from resp.cli import app
from resp.config import declared_method
from resp.recipe import make_traces, prune
from resp.schedule import reported_steps

ROOT = Path(__file__).resolve().parents[1]


def declared_out(stage: str, **items: str) -> Path:
    """The one output dvc.yaml declares for `stage`, its ${item...} filled in."""
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    outs = (body.get("do") or body)["outs"]
    assert len(outs) == 1, f"dvc.yaml {stage}: expected one output, found {outs}"
    path = outs[0] if isinstance(outs[0], str) else next(iter(outs[0]))
    for key, value in items.items():
        path = path.replace("${" + key + "}", value)
    assert "${" not in path, path
    return Path(path)


def scratch_project(path: Path) -> Path:
    """A git + DVC project with this repository's .dvcignore."""
    shutil.copy(ROOT / ".dvcignore", dvc_project(path) / ".dvcignore")
    return path


def tracked(project: Path, out: Path) -> dict[str, bytes]:
    """The files of the directory `out` that DVC hashes (what dvc.lock's md5 of `out` covers), by relative path."""
    dvc(project, "add", "--quiet", out.as_posix())
    (entry,) = yaml.safe_load((project / f"{out}.dvc").read_text())["outs"]
    digest = entry["md5"].removesuffix(".dir")
    listing = json.loads((project / ".dvc" / "cache" / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir").read_text())
    return {f["relpath"]: (project / out / f["relpath"]).read_bytes() for f in listing}


def test_reported_steps_write_the_same_bytes_whatever_the_7th_digit():
    """Two CPUs' step logs of one run, apart in the 7th digit (a drift of ~0 changing sign with it), give
    one summary."""
    def log(noise: float) -> list[dict]:
        return [{"step": 1, "loss": 0.146594912 * (1 + noise), "drift": 0.0, "sparsity": 0.0500758725341426},
                {"step": 2, "loss": 0.146585248 * (1 - noise), "drift": -9.66340e-06 * (1 + 300 * noise)},
                {"step": 3, "loss": 0.1581231 * (1 + noise), "drift": noise, "drift_threshold_nats": 0.0073297456 * (1 - noise),
                 "drift_before_regeneration": 0.0114713 * (1 + noise), "regenerated": True},
                {"verify_select": {"refresh": 0.5, "keep": 0.25}, "chosen": "refresh", "at_step": 3}]

    here, there = json.dumps(reported_steps(log(0.0))), json.dumps(reported_steps(log(3e-7)))
    assert here == there and json.dumps(reported_steps(log(-3e-7))) == here
    assert json.loads(here) == [
        {"step": 1, "loss": 0.1466, "drift": 0.0, "sparsity": 0.0500758725341426},   # a ratio of counts: exact
        {"step": 2, "loss": 0.1466, "drift": 0.0},
        {"step": 3, "loss": 0.1581, "drift": 0.0, "drift_threshold_nats": 0.00733, "drift_before_regeneration": 0.0115,
         "regenerated": True},
        {"verify_select": {"refresh": 0.5, "keep": 0.25}, "chosen": "refresh", "at_step": 3}]
    assert "-0.0" not in json.dumps(reported_steps([{"loss": 0.15, "drift": -1e-9}]))
    assert reported_change(0.00123456, 0.000199) == 0.0012346   # a tiny loss keeps its own digits


def test_dvc_tracks_no_raw_scores_or_unrounded_losses_of_a_run_or_a_healed_model(tiny_params, tiny_model_dir,
                                                                                  tiny_world_dir, tmp_path):
    project = scratch_project(tmp_path / "project")
    run = declared_out("prune", **{"item.task": "arith", "item.method": "resp"})
    healed = declared_out("heal", item="arith")
    dense = make_traces(tiny_params, "arith", "train", None, project / "data" / "dense.jsonl")
    prune(tiny_params, "arith", declared_method(tiny_params, "resp"), project / run, str(dense))
    sets = [a for o in [*tiny_overrides(tiny_model_dir, tiny_world_dir), "methods.resp_heal.heal.steps=2",
                        "methods.resp_heal.heal.warmup_steps=1"] for a in ("--set", o)]
    done = CliRunner().invoke(app, ["heal", "--task", "arith", "--method", "resp_heal", "--masks-dir",
                                    str(project / run / "masks"), "--traces", str(dense), "--out", str(project / healed),
                                    "--params", str(ROOT / "params.yaml"), *sets])
    assert done.exit_code == 0, done.output

    # the run wrote its raw scores (full-precision losses in their manifests) and the healed weights ...
    raw = {p.relative_to(project / run).as_posix(): json.loads(p.read_text())
           for p in (project / run / "steps").rglob("scores.safetensors.json")}
    assert len(raw) == tiny_params.prune.steps      # one scoring pass per step (score_every 1)
    assert all((project / healed / d / "model.safetensors").is_file() for d in ("sparsity-0.10", "sparsity-0.20"))

    # ... which DVC does not hash: of the run it tracks masks, regenerated traces and the summary
    files = tracked(project, run)
    assert {p for p in files if p.endswith(".safetensors")} == {"masks/sparsity-0.10.safetensors",
                                                               "masks/sparsity-0.20.safetensors"}
    assert {p.split("/")[0] for p in files} == {"masks", "traces", "summary.json"}
    manifests = [json.loads(b) for p, b in files.items() if p.endswith(".json")]
    assert not any("mean_loss" in m for m in manifests)    # no scores manifest
    summary = json.loads(files["summary.json"])
    assert len(summary["steps"]) == tiny_params.prune.steps
    for entry in summary["steps"]:
        full = raw[f"steps/step-{entry['step']:04d}/scores.safetensors.json"]["mean_loss"]
        assert full != entry["loss"] == reported_loss(full)            # 4 significant digits of the raw loss
        assert entry["drift"] == reported_change(entry["drift"], entry["loss"])

    # of a healed model, its config, tokenizer and mask tensors: not the weights, nor the manifests that name
    # them by content hash (the heal manifest and the healed mask's, whose `model` is the healed model)
    files = tracked(project, healed)
    for target in ("sparsity-0.10", "sparsity-0.20"):
        mine = {p.removeprefix(f"{target}/") for p in files if p.startswith(f"{target}/")}
        assert "config.json" in mine and f"mask/{target}.safetensors" in mine
        assert not {p for p in mine if p.endswith(".safetensors") and not p.startswith("mask/")}
        assert "resp_heal.json" not in mine and f"mask/{target}.safetensors.json" not in mine
        weights_key = json.loads((project / healed / target / "resp_heal.json").read_text())["healed_model"]["key"]
        assert not any(weights_key.encode() in files[f"{target}/{p}"] for p in mine)


def test_the_committed_world_check_holds_its_nll_at_the_metrics_precision():
    """data/metrics/world.json is committed (dvc.yaml `world_check`, cache: false): its held-out NLL, a float
    reduction over the model's logits, is written at the metrics files' precision (resp.evaluation.NLL_DIGITS),
    so a rerun on another CPU writes the same bytes (before: 0.145598531439982 here, 0.14559863163138106 there)."""
    from resp.evaluation import reported_nll

    world = json.loads((ROOT / "data" / "metrics" / "world.json").read_text())
    nlls = [entry["heldout_nll"]["value"] for entry in world.values() if isinstance(entry, dict) and "heldout_nll" in entry]
    assert nlls, "world.json holds no task with a heldout_nll"
    assert all(v == reported_nll(v) for v in nlls), nlls
