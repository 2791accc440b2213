"""resp.registry on a temporary sqlite store: lineage tags, inputs and artifacts of each version,
idempotent re-registration, audit both ways, tamper detection, nothing registered half-way,
one-line errors."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from mlflow import MlflowClient
from typer.testing import CliRunner

from resp import recipe, registry
from resp.artifacts import file_digest
from resp.cli import app
from resp.config import declared_method, load_params
from resp.evaluation import evaluate_masks
from resp.checkpoints import export_model
from resp.masks import Mask
from resp.stages import table
from resp.models import load_model, model_identity
from resp.registry import RegistryError
from resp.registry import register as registering
from resp.registry import versions as registry_versions
from resp.structures import structures_for
from resp.traces import TraceSet

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def params(tiny_model_dir, tiny_world_dir, mlflow_store):
    # calibration.seed=1: prompts (so trace digests) no other test of the session registers
    return load_params(ROOT / "params.yaml", [*tiny_overrides(tiny_model_dir, tiny_world_dir), *mlflow_store,
                                              "export.formats=[masked]", "calibration.seed=1"])


@pytest.fixture(scope="module")
def params_file(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


@pytest.fixture(scope="module")
def client(params):
    uri = params.registry.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def pruned(params, tmp_path_factory):
    """RESP masks (with exports and metrics) and wanda_sp masks, made once for the module."""
    root = tmp_path_factory.mktemp("data")
    dense = recipe.make_traces(params, "arith", "train", None, root / "dense.jsonl")
    heldout = recipe.make_traces(params, "arith", "test", 4, root / "heldout.jsonl")
    resp_masks = recipe.prune(params, "arith", declared_method(params, "resp"), root / "resp", str(dense))
    recipe.prune(params, "arith", declared_method(params, "wanda_sp"), root / "wanda_sp")
    model, tokenizer = load_model(params.model.name_or_path)
    key = model_identity(params.model.name_or_path).key
    exports = {}
    for target, path in resp_masks.items():
        mask, meta = Mask.load(path)
        s = structures_for(model, meta["attention_unit"], meta["protected_layers"])
        exports[target] = {"masked": export_model(model, tokenizer, mask, s, "masked", root / f"exports-{target:.2f}" / "masked",
                                                  8, mask_meta=meta, model_key=key)}
    metrics = evaluate_masks(params, "arith", "resp", resp_masks, heldout, root / "metrics.json", include_dense=False)
    return {"root": root, "dense": dense, "masks": resp_masks, "exports": exports, "metrics": metrics}


@pytest.fixture(scope="module")
def registered(params, pruned):
    resp_versions = registry.register_method(params, "arith", "resp", pruned["root"] / "resp" / "masks",
                                             pruned["exports"], pruned["metrics"])
    wanda_sp_versions = registry.register_method(params, "arith", "wanda_sp", pruned["root"] / "wanda_sp" / "masks")
    return {"resp": resp_versions, "wanda_sp": wanda_sp_versions}


def test_versions_carry_lineage_tags_inputs_and_artifacts(params, pruned, registered, client, tiny_model_dir):
    identity = model_identity(str(tiny_model_dir))
    base = tiny_model_dir.name.lower()
    versions = registered["resp"]
    assert [(v["name"], v["target"], v["created"]) for v in versions] == [
        (f"resp-{base}-arith-resp", "0.10", True), (f"resp-{base}-arith-resp", "0.20", True)]
    dense = client.get_model_version(f"resp-{base}-dense", versions[0]["parent"].split("/")[1])
    assert dense.tags["kind"] == "dense" and dense.tags["base_key"] == identity.key == identity.content_hash
    report = json.loads(Path(pruned["metrics"]).read_text())
    for v, (target, mask_path) in zip(versions, sorted(pruned["masks"].items())):
        mask, meta = Mask.load(mask_path)
        mv = client.get_model_version(v["name"], v["version"])
        tags = mv.tags
        assert tags["parent"] == f"resp-{base}-dense/{dense.version}"
        assert tags["trace_digests"] == ",".join(t["digest"] for t in meta["trace_sets"])
        # each mask lists only the trace sets used up to the step it was saved at
        used = {0.1: ["initial", "milestone-0.05"], 0.2: ["initial", "milestone-0.05", "milestone-0.10"]}[target]
        assert tags["trace_tags"] == ",".join(used)
        assert meta["trace_sets"][0]["digest"] == file_digest(pruned["dense"])
        assert tags["prompt_ids_digest"] == TraceSet.load(pruned["dense"]).prompt_ids_digest()
        assert tags["params_hash"] == table.params_hash(params, "arith", "resp")
        assert tags["mask_digest"] == mask.digest() and tags["target"] == f"{target:.2f}"
        assert float(tags["sparsity"]) == pytest.approx(meta["sparsity"], abs=1e-6)
        assert (tags["base_key"], tags["base_revision"]) == (identity.key, "None")
        assert (tags["code_step"], tags["code_digest"]) == ("prune", table.code_digest("prune"))
        assert meta["code"] == {"step": "prune", "digest": table.code_digest("prune")}
        assert tags["registered_from_commit"] != "" and tags["registered_from_dirty"] in ("True", "False", "None")
        assert tags["dvc_stage"] == "none" and "replaces" not in tags

        run = client.get_run(mv.run_id)
        inputs = run.inputs.dataset_inputs
        assert [i.dataset.name for i in inputs] == used
        assert [{t.key: t.value for t in i.tags}["sha256"] for i in inputs] == [t["digest"] for t in meta["trace_sets"]]
        assert [i.dataset.digest for i in inputs] == [t["digest"][:32] for t in meta["trace_sets"]]
        expected = report["results"][f"{target:.2f}"]
        assert {k: v for k, v in expected["greedy"].items() if "accuracy" in k} == {
            k.split(".", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith("greedy.accuracy")}
        assert run.data.metrics["nll.nll"] == pytest.approx(expected["nll"]["nll"])
        # the run's cost (summary.json) in the lineage and as metrics
        cost = json.loads((pruned["root"] / "resp" / "summary.json").read_text())["cost"]
        lineage = json.loads((Path(run.info.artifact_uri.removeprefix("file://")) / "lineage.json").read_text())
        assert lineage["run_cost"] == cost and cost["score"]["passes"] > 0 and cost["regenerate"]["passes"] == 2
        assert {k: v for k, v in run.data.metrics.items() if k.startswith("run_cost.")} == {
            f"run_cost.{kind}.{key}": float(value) for kind, counts in cost.items() for key, value in counts.items()}
        assert run.data.params["prune.steps"] == "4" and run.data.params["method"] == "resp"
        # the logged params are the sections the prune stage declares, one level deep
        assert run.data.params["methods.resp.scorer"] == "taylor" and run.data.params["baselines.owl_lambda"] == "0.08"
        assert {k.split(".")[0] for k in run.data.params} == {"task", "method", "target", "params_hash", "model",
                                                              "tasks", "prose_task", "calibration", "generation",
                                                              "importance", "prune", "methods", "baselines"}

        artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
        assert (artifacts / "mask" / mask_path.name).read_bytes() == mask_path.read_bytes()
        assert (artifacts / "traces" / "0-initial" / "dense.jsonl").read_bytes() == pruned["dense"].read_bytes()
        assert file_digest(artifacts / "lineage.json") == tags["lineage_digest"]
        exported = pruned["exports"][target]["masked"]
        assert sorted(p.name for p in (artifacts / "exports" / "masked").iterdir()) == sorted(p.name for p in exported.iterdir())
        assert json.loads((artifacts / "params.json").read_text()) == params.model_dump(mode="json")


def test_registering_again_returns_the_existing_versions(params, params_file, pruned, registered, client):
    again = registry.register_method(params, "arith", "resp", pruned["root"] / "resp" / "masks",
                                     pruned["exports"], pruned["metrics"])
    assert [(v["version"], v["created"]) for v in again] == [(v["version"], False) for v in registered["resp"]]
    assert len(client.search_model_versions(f"name = '{registered['resp'][0]['name']}'")) == 2
    out = pruned["root"] / "registry" / "arith-wanda_sp.json"
    result = runner.invoke(app, ["register", "--task", "arith", "--method", "wanda_sp", "--run-dir",
                                 str(pruned["root"] / "wanda_sp"), "--out", str(out), "--params", str(params_file),
                                 # the default metrics and exports live under flow.data_dir: none there, as at first
                                 "--set", f"flow.data_dir={pruned['root']}"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{v['name']} version {v['version']}: target {v['target']}, sparsity {v['sparsity']}, parent {v['parent']} "
        "(already registered)" for v in registered["wanda_sp"]]
    # a tracked file: only what any store gives the same (no version numbers or run ids)
    assert json.loads(out.read_text()) == {"task": "arith", "method": "wanda_sp", "versions": [
        {k: version[k] for k in ("base_key", "name", "sparsity", "target")} for version in registered["wanda_sp"]]}


def test_audit_prints_lineage_and_verifies(params_file, pruned, registered, tiny_model_dir):
    v = registered["resp"][1]
    result = runner.invoke(app, ["audit", "--model", v["name"], "--version", v["version"], "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    identity = model_identity(str(tiny_model_dir))
    assert lines[1] == f"base model {tiny_model_dir} content sha256 {identity.content_hash[:16]} [ok]"
    run_dir = pruned["root"] / "resp"
    for tag, path in [("initial", pruned["dense"]), ("milestone-0.05", run_dir / "traces" / "milestone-0.05.jsonl"),
                      ("milestone-0.10", run_dir / "traces" / "milestone-0.10.jsonl")]:
        assert any(line.split()[0] == tag and f"  {path}  sha256 {file_digest(path)[:16]} [local ok, logged ok, manifest ok]"
                   in line for line in lines), (tag, result.output)
    assert any(line.strip().startswith(f"mask {pruned['masks'][0.2]} (target 0.20") and line.endswith("[local ok, logged ok]")
               for line in lines)
    assert any(line.strip().startswith(f"export masked {pruned['exports'][0.2]['masked']} (") and line.endswith("[ok]")
               for line in lines)
    assert lines[-3] == f"parent {v['parent']}"
    digest = Mask.load(pruned["masks"][0.2])[0].digest()
    assert f"          metrics made from mask {digest[:16]} [ok]" in lines
    assert f"          export masked made from mask {digest[:16]} [ok]" in lines
    # every searchable tag (kind, base x3, task, method, target, mask, params, prompt ids, trace digests) says
    # what lineage.json says
    assert lines[-2] == "registry tags: 11 of 11 agree with lineage.json"
    # 3 trace sets + 3 manifests + mask + manifest + summary + 7 export files + metrics + params + base model
    # + 2 joins (the metrics and the export were computed from this version's mask) + 11 tags
    assert lines[-1] == "audit passed: 32 checks verify"


def test_reverse_query_finds_every_version_that_used_a_trace_set(params, params_file, pruned, registered):
    resp_versions = [(v["name"], v["version"]) for v in registered["resp"]]
    by_file = registry.versions_with_traces(params, str(pruned["dense"]))
    assert [(v["name"], v["version"]) for v in by_file["versions"]] == resp_versions
    # regenerations of a tiny random model can repeat the dense traces byte for byte: same digest, listed too
    assert all(v["trace_tags"][0] == "initial" for v in by_file["versions"])
    by_prefix = registry.versions_with_traces(params, file_digest(pruned["dense"])[:16])
    assert [(v["name"], v["version"]) for v in by_prefix["versions"]] == resp_versions
    calibration = pruned["root"] / "wanda_sp" / "traces" / "calibration.jsonl"   # gold rationales, not the dense traces
    by_other = registry.versions_with_traces(params, str(calibration))
    wanda_sp_versions = [(v["name"], v["version"]) for v in registered["wanda_sp"]]
    assert [(v["name"], v["version"]) for v in by_other["versions"]] == wanda_sp_versions
    result = runner.invoke(app, ["audit", "--traces", str(pruned["dense"]), "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"trace set {pruned['dense']} (sha256 {file_digest(pruned['dense'])[:16]}): 2 registered version(s)",
        *[f"  {v['name']} version {v['version']}: arith/resp target {t}, used as {', '.join(v['trace_tags'])}"
          for v, t in zip(by_file["versions"], ["0.10", "0.20"])]]


def test_audit_and_registration_detect_an_edited_trace_file(params, params_file, pruned, registered, client):
    v = registered["resp"][0]
    path = pruned["dense"]
    recorded = file_digest(path)
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n")
        result = runner.invoke(app, ["audit", "--model", v["name"], "--version", v["version"], "--params", str(params_file)])
        assert result.exit_code == 1
        assert (f"MISMATCH trace set {path}: local file does not match the recorded sha256 {recorded[:12]} "
                "(edited after registration)") in result.output.splitlines()
        # the 0.10 mask used 2 trace sets: 30 checks of the 0.20 version less one trace set and its manifest
        assert result.output.splitlines()[-1] == "audit failed: 1 of 30 checks do not verify"
        with pytest.raises(RegistryError, match=rf"^trace set {path} was edited after pruning \(sha256 [0-9a-f]{{12}} != "
                                                rf"recorded {recorded[:12]} in sparsity-0.10.safetensors.json\): restore it"):
            registry.register_method(params, "arith", "resp", pruned["root"] / "resp" / "masks")
    finally:
        path.write_bytes(original)
    # a logged copy changed in the artifact store is caught as well
    logged = Path(client.get_run(v["run_id"]).info.artifact_uri.removeprefix("file://")) / "summary.json"
    kept = logged.read_bytes()
    try:
        logged.write_bytes(kept + b" ")
        report = registry.audit(params, v["name"], v["version"])
        assert report["problems"] == [f"summary summary.json: logged artifact does not match the recorded sha256 "
                                      f"{file_digest(pruned['root'] / 'resp' / 'summary.json')[:12]}"]
    finally:
        logged.write_bytes(kept)
    assert registry.audit(params, v["name"], v["version"])["problems"] == []


def test_failed_verification_registers_nothing(params, pruned, client, monkeypatch, tmp_path):
    run_dir = tmp_path / "random"
    recipe.prune(params, "arith", declared_method(params, "random"), run_dir)
    identity = model_identity(params.model.name_or_path)
    name = registry.model_name({**identity.to_dict(), "key": identity.key}, "arith", "random")
    real_log = registry_versions._log_entries

    def log_then_corrupt(client_, run_id, entries):
        real_log(client_, run_id, entries)
        if any(e["role"] == "mask" for e in entries):  # the artifact store keeps a damaged copy
            mask = next(e for e in entries if e["role"] == "mask")
            root = Path(client_.get_run(run_id).info.artifact_uri.removeprefix("file://"))
            (root / mask["artifact"]).write_bytes(b"damaged")

    monkeypatch.setattr(registry_versions, "_log_entries", log_then_corrupt)
    with pytest.raises(RegistryError, match=r"^logged artifact mask/sparsity-0.10.safetensors does not match its source "
                                            rf"{run_dir}/masks/sparsity-0.10.safetensors \(sha256 [0-9a-f]{{12}} != "
                                            r"[0-9a-f]{12}\): nothing was registered; retry$"):
        registry.register_method(params, "arith", "random", run_dir / "masks")
    assert client.search_registered_models(f"name = '{name}'") == []
    assert client.search_model_versions(f"name = '{name}'") == []
    experiment = client.get_experiment_by_name(params.registry.experiment)
    assert client.search_runs([experiment.experiment_id], "attributes.run_name = 'arith-random-0.10'") == []

    # the same masks register cleanly afterwards, starting at version 1, with the DVC stage that wrote them
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prune@arith-random": {
        "cmd": "resp prune", "outs": [{"path": "random", "md5": "0123abcd.dir", "size": 1, "nfiles": 3}]}}}))
    versions = registry.register_method(params, "arith", "random", run_dir / "masks")
    assert [(v["version"], v["created"]) for v in versions] == [("1", True), ("2", True)]
    tags = client.get_model_version(name, "1").tags
    assert (tags["dvc_stage"], tags["dvc_md5"]) == ("prune@arith-random", "0123abcd.dir")


def test_latest_base_is_the_registered_dense_version(params, registered):
    identity = model_identity(params.model.name_or_path)
    latest = registry.latest_base(params, {**identity.to_dict(), "key": identity.key})
    assert (latest["name"], latest["version"]) == tuple(registered["resp"][0]["parent"].split("/"))
    assert latest["base_key"] == identity.key
    assert registry.latest_base(params, {"name": "never-registered", "content_hash": "h", "key": "h"}) is None


def test_one_line_errors(params, pruned, registered, tmp_path, monkeypatch):
    masks = pruned["root"] / "resp" / "masks"
    with pytest.raises(RegistryError, match=r"^task 'nope' is not in params.yaml tasks; defined: \['arith', "):
        registry.register_method(params, "nope", "resp", masks)
    with pytest.raises(RegistryError, match=r"^method 'obs' is unknown; choose one of resp, resp_common, resp_noregen, "):
        registry.register_method(params, "arith", "obs", masks)
    with pytest.raises(RegistryError, match=rf"^no masks \(sparsity-\*.safetensors\) in {tmp_path}: run `resp prune` first$"):
        registry.register_method(params, "arith", "resp", tmp_path)
    other = params.model_copy(update={"prune": params.prune.model_copy(update={"seed": 99})})
    with pytest.raises(RegistryError, match=r"sparsity-0.10.safetensors was made with other params \(params hash "
                                            r"[0-9a-f]{12} != [0-9a-f]{12} from the given params\): register with"):
        registry.register_method(other, "arith", "resp", masks)
    with pytest.raises(RegistryError, match=rf"^model 'resp-nope' version 1 is not in the registry at "
                                            rf"{params.registry.tracking_uri}: find versions"):
        registry.audit(params, "resp-nope", 1)
    with pytest.raises(RegistryError, match=r"^'xyz!' is neither a trace file nor a sha256 digest"):
        registry.versions_with_traces(params, "xyz!")

    def with_uri(uri):
        return params.model_copy(update={"registry": params.registry.model_copy(update={"tracking_uri": uri})})

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(RegistryError, match=r"^tracking store http://127.0.0.1:9 is unreachable \(.*\): start it, or set "
                                            r"registry.tracking_uri \(or MLFLOW_TRACKING_URI\) to a reachable store$"):
        registry.register_method(with_uri("http://127.0.0.1:9"), "arith", "resp", masks)
    with pytest.raises(RegistryError, match=r"^tracking store nosuch://store cannot be opened \(.*\): set registry.tracking_uri"):
        registry.latest_base(with_uri("nosuch://store"), {"name": "m", "content_hash": "h", "key": "h"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")   # the environment wins over params
    with pytest.raises(RegistryError, match=r"^tracking store http://127.0.0.1:9 is unreachable"):
        registry.latest_base(params, {"name": "m", "content_hash": "h", "key": "h"})


def test_locked_sqlite_store_is_named_with_the_fix(params, pruned, tmp_path):
    # A store another process holds locked (a fresh file: the session store would wait out MLflow's 20 s busy timeout).
    uri = f"sqlite:///{tmp_path / 'locked.db'}"
    params = params.model_copy(update={"registry": params.registry.model_copy(update={"tracking_uri": uri})})
    lock = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        with pytest.raises(RegistryError, match=rf"^tracking store {uri} is locked by another process \(sqlite 'database "
                                                rf"is locked'\): wait for the other writer to finish, or serve the store"):
            registry.register_method(params, "arith", "resp", pruned["root"] / "resp" / "masks")
    finally:
        lock.rollback()
        lock.close()


def test_changed_files_make_a_new_version_that_replaces_the_old(params, pruned, registered, client, tmp_path):
    """Same mask, base and params but a changed file (here the metrics): a new version; the same files again: none."""
    old = registered["resp"]
    metrics = tmp_path / pruned["metrics"].name  # same artifact name, one more key inside
    metrics.write_text(json.dumps({**json.loads(Path(pruned["metrics"]).read_text()), "note": "re-evaluated"}))
    new = registry.register_method(params, "arith", "resp", pruned["root"] / "resp" / "masks", pruned["exports"], metrics)
    assert [(v["target"], v["created"], v["replaces"]) for v in new] == [
        (v["target"], True, v["version"]) for v in old]
    assert [int(v["version"]) for v in new] == [int(old[-1]["version"]) + 1, int(old[-1]["version"]) + 2]
    for v in new:
        tags = client.get_model_version(v["name"], v["version"]).tags
        assert tags["artifacts_digest"] != client.get_model_version(v["name"], v["replaces"]).tags["artifacts_digest"]
        assert registry.audit(params, v["name"], v["version"])["problems"] == []
    again = registry.register_method(params, "arith", "resp", pruned["root"] / "resp" / "masks", pruned["exports"], metrics)
    assert [(v["version"], v["created"]) for v in again] == [(v["version"], False) for v in new]


# ---------------------------------------------------------------- issue 13: lineage joins and concurrency

def test_metrics_and_exports_of_another_mask_are_refused(params, pruned, registered):
    """Worst case 2: metrics or exports computed from other masks were attached to a version."""
    other = pruned["root"] / "wanda_sp" / "masks"
    digest = Mask.load(other / "sparsity-0.10.safetensors")[0].digest()
    resp_digest = Mask.load(pruned["masks"][0.1])[0].digest()
    with pytest.raises(RegistryError, match=rf"^metrics file {pruned['metrics']} \(sparsity 0.10\) was computed from mask "
                                            rf"{resp_digest[:12]}, not {other / 'sparsity-0.10.safetensors'} \({digest[:12]}\): "
                                            rf"evaluate this run \(`resp evaluate --masks-dir {other}`\) and pass that --metrics$"):
        registry.register_method(params, "arith", "wanda_sp", other, None, pruned["metrics"])
    with pytest.raises(RegistryError, match=rf"^masked export {pruned['exports'][0.1]['masked']} was made from mask "
                                            rf"{resp_digest[:12]}, not .*sparsity-0.10.safetensors \({digest[:12]}\): "
                                            r"re-export this run"):
        registry.register_method(params, "arith", "wanda_sp", other, pruned["exports"])


def test_register_takes_default_metrics_only_from_the_run_it_registers(params, params_file, pruned, registered, tmp_path):
    """`resp register --run-dir` took <data_dir>/metrics/TASK/METHOD.json even when it belonged to another run."""
    data = tmp_path / "data"
    (data / "metrics" / "arith").mkdir(parents=True)
    (data / "metrics" / "arith" / "wanda_sp.json").write_bytes(Path(pruned["metrics"]).read_bytes())  # another run's
    exports = data / "checkpoints" / "arith" / "wanda_sp"
    for target, dirs in pruned["exports"].items():          # another mask's exports where the layout looks
        shutil.copytree(dirs["masked"], exports / f"sparsity-{target:.2f}" / "masked")
    result = runner.invoke(app, ["register", "--task", "arith", "--method", "wanda_sp", "--run-dir",
                                 str(pruned["root"] / "wanda_sp"), "--params", str(params_file),
                                 "--set", f"flow.data_dir={data}"])
    assert result.exit_code == 0, result.output
    # neither was attached: the versions are the ones registered without metrics and exports
    assert [line.endswith("(already registered)") for line in result.output.splitlines()] == [True, True]
    result = runner.invoke(app, ["register", "--task", "arith", "--method", "wanda_sp", "--run-dir",
                                 str(pruned["root"] / "wanda_sp"), "--params", str(params_file),
                                 "--metrics", str(data / "metrics" / "arith" / "wanda_sp.json")])
    assert result.exit_code == 2 and result.output.startswith("error: metrics file ") and "was computed from mask" in result.output


def test_audit_fails_a_version_whose_metrics_came_from_another_mask(params, params_file, pruned, registered, monkeypatch):
    """A version registered before the join checks (simulated) with another mask's metrics and exports fails audit."""
    monkeypatch.setattr(registering, "_check_joins", lambda *a, **k: None)
    other = pruned["root"] / "wanda_sp" / "masks"
    [_, v] = registry.register_method(params, "arith", "wanda_sp", other, pruned["exports"], pruned["metrics"])
    result = runner.invoke(app, ["audit", "--model", v["name"], "--version", v["version"], "--params", str(params_file)])
    digest = Mask.load(other / "sparsity-0.20.safetensors")[0].digest()
    resp_digest = Mask.load(pruned["masks"][0.2])[0].digest()
    assert result.exit_code == 1
    assert (f"MISMATCH metrics {pruned['metrics']} (sparsity 0.20) were computed from mask {resp_digest[:12]}, not this "
            f"version's mask {digest[:12]}") in result.output.splitlines()
    assert (f"MISMATCH masked export {pruned['exports'][0.2]['masked']} was made from mask {resp_digest[:12]}, not this "
            f"version's mask {digest[:12]}") in result.output.splitlines()
    assert result.output.splitlines()[-1].startswith("audit failed: 2 of ")


def test_concurrent_registrations_make_one_version_per_mask(params, pruned, tmp_path):
    """Worst case 3: two `resp register` of one run on one (fresh) sqlite store both created versions, or
    one failed with a migration message. Now the store is initialised once and each mask registered once."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    fresh = params.model_copy(update={"registry": params.registry.model_copy(
        update={"tracking_uri": uri, "artifact_location": str(tmp_path / "artifacts")})})
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(fresh.model_dump(mode="json")))
    cmd = [str(Path(sys.executable).parent / "resp"), "register", "--task", "arith", "--method", "wanda_sp", "--run-dir",
           str(pruned["root"] / "wanda_sp"), "--params", str(params_path)]
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": ""}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(2)]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in outs] == [0, 0], outs
    lines = sorted(line for _, out, _ in outs for line in out.splitlines())
    created = [line for line in lines if not line.endswith("(already registered)")]
    assert len(lines) == 4 and len(created) == 2 and {line.split(": target")[0] for line in created} == {
        line.split(": target")[0] for line in lines}
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = created[0].split(" version ")[0]
    assert sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'")) == [1, 2]
    assert len(client.search_model_versions(f"name = '{name.rsplit('-', 2)[0]}-dense'")) == 1


def test_a_racing_duplicate_is_withdrawn_and_killed_runs_are_cleaned(params, pruned, registered, client, monkeypatch):
    """Without a store lock (a shared server), a duplicate created by a racing caller is withdrawn:
    one version per artifacts digest. A run left RUNNING by a killed registration is marked failed."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    experiment = client.get_experiment_by_name(params.registry.experiment).experiment_id
    stale = client.create_run(experiment, tags={"resp.pid": str(dead.pid), "resp.host": socket.gethostname()})
    name = registered["wanda_sp"][0]["name"]
    before = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    real = registering._versions
    monkeypatch.setattr(registering, "_store_lock", lambda uri: __import__("contextlib").nullcontext())
    monkeypatch.setattr(registering, "_versions", lambda c, f: [] if "artifacts_digest" in f and "mask_digest" in f
                        and not hasattr(registry, "_raced") and not setattr(registry, "_raced", f) else real(c, f))
    try:
        again = registry.register_method(params, "arith", "wanda_sp", pruned["root"] / "wanda_sp" / "masks")
    finally:
        del registry._raced
    assert [(v["version"], v["created"]) for v in again][0] == (registered["wanda_sp"][0]["version"], False)
    assert sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'")) == before
    run = client.get_run(stale.info.run_id)
    assert (run.info.status, run.info.lifecycle_stage) == ("FAILED", "deleted")


def test_a_mistyped_sqlite_path_creates_nothing(params, pruned, tmp_path):
    """`register` with a missing folder refused before any lock file or folder is made; `audit` and the reverse
    query against a missing sqlite file refused without creating an empty store."""
    def with_uri(uri):
        return params.model_copy(update={"registry": params.registry.model_copy(update={"tracking_uri": uri})})

    missing = tmp_path / "typo" / "mlflow.db"
    with pytest.raises(RegistryError, match=rf"^tracking store sqlite:///{missing}: folder {missing.parent} does not "
                                            r"exist \(a mistyped path would create a new, empty store\)"):
        registry.register_method(with_uri(f"sqlite:///{missing}"), "arith", "resp", pruned["root"] / "resp" / "masks")
    assert not missing.parent.exists()
    absent = tmp_path / "absent.db"
    for query in (lambda p: registry.audit(p, "m", 1), lambda p: registry.versions_with_traces(p, "0" * 64)):
        with pytest.raises(RegistryError, match=rf"^tracking store sqlite:///{absent}: {absent} does not exist, so "
                                                r"nothing is registered there \(nothing was created\)"):
            query(with_uri(f"sqlite:///{absent}"))
    assert list(tmp_path.iterdir()) == []


def test_a_registration_killed_after_creating_its_version_is_repaired_by_the_next(params, params_file, tmp_path,
                                                                                  client):
    """kill -9 between creating a model version and finishing its run left a version that never verified and
    that `register` reported as "already registered" for good. Now `audit` names it as broken and the next
    `register` withdraws it and registers the mask again."""
    import os
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    recipe.prune(params, "arith", declared_method(params, "magnitude"), run)
    args = ["register", "--task", "arith", "--method", "magnitude", "--run-dir", str(run), "--params", str(params_file)]
    killer = ("import os, signal\nfrom mlflow import MlflowClient\nfrom resp.cli import app\n"
              "finish = MlflowClient.set_terminated\n"
              "def kill(self, run_id, status=None, *a, **k):\n"
              "    if status == 'FINISHED' and self.get_run(run_id).data.tags.get('kind') == 'pruned':\n"
              "        os.kill(os.getpid(), signal.SIGKILL)  # the version exists, its run is not finished\n"
              "    return finish(self, run_id, status, *a, **k)\n"
              "MlflowClient.set_terminated = kill\n"
              f"app({args!r})\n")
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    name = registry.model_name(model_identity(params.model.name_or_path).to_dict() | {
        "key": model_identity(params.model.name_or_path).key}, "arith", "magnitude")
    broken = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert client.get_run(broken.run_id).info.status == "RUNNING"

    result = runner.invoke(app, ["audit", "--model", name, "--version", broken.version, "--params", str(params_file)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {name} version {broken.version} is broken: its run {broken.run_id} was never finished (status RUNNING: "
        "the registration was killed); `resp register --task arith --method magnitude` withdraws it and registers its "
        "mask again")

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    created = [line for line in result.output.splitlines() if line.startswith(f"{name} version ")]
    assert len(created) == 2 and not any("already registered" in line for line in created), result.output
    versions = {v.version for v in client.search_model_versions(f"name = '{name}'")}
    assert broken.version not in versions
    assert (client.get_run(broken.run_id).info.status, client.get_run(broken.run_id).info.lifecycle_stage) == (
        "FAILED", "deleted")
    for line in created:
        version = line.split(" version ")[1].split(":")[0]
        audited = runner.invoke(app, ["audit", "--model", name, "--version", version, "--params", str(params_file)])
        assert audited.exit_code == 0 and audited.output.splitlines()[-1].startswith("audit passed"), audited.output


def test_audit_checks_registry_tags_against_the_lineage(params, params_file, registered, client):
    v = registered["wanda_sp"][0]
    real = client.get_model_version(v["name"], v["version"]).tags["mask_digest"]
    client.set_model_version_tag(v["name"], v["version"], "mask_digest", "0" * 64)
    try:
        result = runner.invoke(app, ["audit", "--model", v["name"], "--version", v["version"], "--params",
                                     str(params_file)])
    finally:
        client.set_model_version_tag(v["name"], v["version"], "mask_digest", real)
    assert result.exit_code == 1
    assert (f"MISMATCH registry tag mask_digest=0000000000000000 does not match lineage.json ({real[:16]}): the tag was "
            "edited after registration; re-register the model") in result.output.splitlines()
    assert "registry tags: 10 of 11 agree with lineage.json (not: mask_digest)" in result.output.splitlines()


def test_a_registration_from_before_the_wider_base_identity_still_audits_with_a_note(params, params_file, tmp_path,
                                                                                     monkeypatch, tiny_model_dir):
    """Lineage recorded before the tokenizer, chat template and generation config joined the base model's
    content hash (no `content_files`, hash over weights and config.json) verifies against that older hash,
    and the audit says what it does not cover."""
    import resp.models
    from resp.models import LEGACY_IDENTITY_FILES, content_hash

    # the code of then: the content hash over weights and config.json, lineage without `content_files`
    monkeypatch.setattr(resp.models, "content_hash", lambda d: content_hash(d, LEGACY_IDENTITY_FILES))
    monkeypatch.setattr(registering, "_identity", lambda base: {k: base.get(k) for k in ("name", "revision",
                                                                                      "content_hash", "key")})
    run = tmp_path / "run"
    recipe.prune(params, "arith", declared_method(params, "random"), run)
    v = registry.register_method(params, "arith", "random", run / "masks")[0]
    monkeypatch.undo()
    result = runner.invoke(app, ["audit", "--model", v["name"], "--version", v["version"], "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    legacy = content_hash(tiny_model_dir, LEGACY_IDENTITY_FILES)
    assert lines[1:3] == [f"base model {tiny_model_dir} content sha256 {legacy[:16]} [ok]",
                          "  note: registered before the tokenizer, chat template and generation config joined the base "
                          "model's identity: only its weights and config.json are checked; re-register to cover them"]
    assert legacy != content_hash(tiny_model_dir)
