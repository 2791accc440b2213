"""flows/: the Prefect pipeline on a tiny model (cache hits, resume after a failure, Dask fan-out)
and scheduled re-pruning (registers only when the base model's content changes)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_overrides
from distributed import get_worker
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import resp.export
from flows import pipeline as flow_module
from flows.pipeline import ReadsFiles, content_digest, run_pipeline
from flows.schedule import check_once, deployment
from resp import evaluate, recipe
from resp.cli import app
from resp.config import load_params
from resp.masks import Mask

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write_params(directory: Path, model_dir, world_dir, store: list[str], *extra: str) -> Path:
    """A params.yaml for one flow: tiny model and tasks, data and results under `directory`."""
    p = load_params(ROOT / "params.yaml", [
        *tiny_overrides(model_dir, world_dir), *store, "run.tasks=[arith]", "run.methods=[resp]",
        "export.formats=[masked]", f"flow.data_dir={directory / 'data'}", f"flow.results_dir={directory / 'results'}",
        *extra])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    return path


def base_copy(tiny_model_dir, directory: Path) -> Path:
    """A private copy of the tiny model (its directory name names the registered models)."""
    shutil.copytree(tiny_model_dir, directory)
    return directory


@pytest.fixture
def calls(monkeypatch):
    """Counts executions of the library functions the task bodies call (and the Dask worker each ran on)."""
    counts, workers = Counter(), []

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            try:
                workers.append(get_worker().name)
            except ValueError:  # not inside a Dask worker
                workers.append(None)
            return fn(*args, **kwargs)
        return wrapper

    for module, name in [(recipe, "make_traces"), (recipe, "prune"), (resp.export, "export_model"),
                         (evaluate, "evaluate_masks")]:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    counts.workers = workers
    return counts


def test_cache_key_reads_sections_and_file_contents(tiny_params, tmp_path):
    policy = ReadsFiles(sections=("model", "tasks.{task}"), files=("traces",))
    traces = tmp_path / "t.jsonl"
    traces.write_text("a\n")

    def key(params, **inputs):
        return policy.compute_key(None, {"params": params, "task": "arith", "traces": str(traces), **inputs}, {})

    first = key(tiny_params)
    assert key(tiny_params) == first
    assert key(tiny_params.model_copy(update={"flow": tiny_params.flow.model_copy(update={"workers": 7})})) == first
    choice = tiny_params.tasks["choice"].model_copy(update={"few_shot": 1})
    assert key(tiny_params.model_copy(update={"tasks": {**tiny_params.tasks, "choice": choice}})) == first
    arith = tiny_params.tasks["arith"].model_copy(update={"calibration_split": "test"})
    assert key(tiny_params.model_copy(update={"tasks": {**tiny_params.tasks, "arith": arith}})) != first
    traces.with_name("t.jsonl.json").write_text("{}")       # the manifest beside a file is part of it
    with_manifest = key(tiny_params)
    assert with_manifest != first
    traces.write_text("b\n")
    assert key(tiny_params) not in (first, with_manifest)
    assert content_digest({"b": None, "a": str(tmp_path / "missing")}) == {"a": f"missing:{tmp_path / 'missing'}", "b": None}


def test_second_run_takes_every_task_from_the_cache(prefect_api, mlflow_store, tiny_model_dir, tiny_world_dir,
                                                    tmp_path, calls):
    base = base_copy(tiny_model_dir, tmp_path / "cachebase")
    params = write_params(tmp_path / "run", base, tiny_world_dir, mlflow_store)
    first = run_pipeline(params)
    # dense + held-out traces, one method, one export per target, the method's and the dense evaluation
    assert dict(calls) == {"make_traces": 2, "prune": 1, "export_model": 2, "evaluate_masks": 2}
    assert [(v["target"], v["created"], v["replaces"]) for v in first["registered"]] == [("0.10", True, None),
                                                                                         ("0.20", True, None)]
    masks = first["masks"]["arith/resp"]
    assert sorted(masks) == ["0.10", "0.20"] and all(Path(p).is_file() for p in masks.values())
    # cached results are JSON (paths and plain data), never pickles that would run code when read back
    stored = [json.loads(f.read_text()) for f in (tmp_path / "run" / "results").iterdir() if f.is_file()]
    assert len(stored) == 7 and {r["metadata"]["serializer"]["type"] for r in stored} == {"json"}
    assert any(json.loads(r["result"]) == masks for r in stored)

    calls.clear()
    result = runner.invoke(app, ["run", "--params", str(params)])   # the same flow through the CLI
    assert result.exit_code == 0, result.output
    assert dict(calls) == {}                                          # no task body ran
    assert f"arith/resp: 2 masks, metrics {first['metrics']['arith/resp']}" in result.output
    for v in first["registered"]:
        assert f"registered {v['name']} version {v['version']} (target {v['target']}), already registered" in result.output

    # a changed evaluation knob reruns the evaluations only; a deleted export is recomputed
    shutil.rmtree(first["exports"]["arith/resp/0.20"]["masked"])
    again = run_pipeline(params, ["evaluation.num_items=3"])
    assert dict(calls) == {"evaluate_masks": 2, "export_model": 1}
    assert again["masks"] == first["masks"] and Path(again["exports"]["arith/resp/0.20"]["masked"]).is_dir()

    calls.clear()
    run_pipeline(params, ["flow.cache=false"])                         # every task reruns
    assert dict(calls) == {"make_traces": 2, "prune": 1, "export_model": 2, "evaluate_masks": 2}


def test_failed_run_resumes_from_the_finished_tasks(prefect_api, mlflow_store, tiny_model_dir, tiny_world_dir,
                                                    tmp_path, calls, monkeypatch):
    params = write_params(tmp_path / "run", tiny_model_dir, tiny_world_dir, mlflow_store, "flow.register_models=false")

    def killed(*args, **kwargs):
        raise RuntimeError("export killed")

    real_export = resp.export.export_model
    monkeypatch.setattr(resp.export, "export_model", killed)
    with pytest.raises(RuntimeError, match="export killed"):
        run_pipeline(params)
    assert (calls["make_traces"], calls["prune"], calls["evaluate_masks"]) == (2, 1, 2)

    calls.clear()
    monkeypatch.setattr(resp.export, "export_model", real_export)
    result = run_pipeline(params)
    assert dict(calls) == {"export_model": 2}   # traces, pruning and evaluations finished before the failure
    assert result["registered"] == []
    for target, mask in result["masks"]["arith/resp"].items():
        export = Path(result["exports"][f"arith/resp/{target}"]["masked"])
        assert json.loads((export / "resp_manifest.json").read_text())["mask_digest"] == Mask.load(mask)[0].digest()


def test_dask_task_runner_fans_out_on_a_local_cluster(prefect_api, mlflow_store, tiny_model_dir, tiny_world_dir,
                                                      tmp_path, calls):
    params = write_params(tmp_path / "run", tiny_model_dir, tiny_world_dir, mlflow_store, "run.methods=[magnitude,random]",
                          "evaluation.nll_traces=0", "flow.register_models=false", "flow.task_runner=dask",
                          "flow.workers=2", "flow.dask_processes=false")
    result = run_pipeline(params)
    assert dict(calls) == {"prune": 2, "export_model": 4, "evaluate_masks": 3}
    # every task body ran on one of the cluster's two workers, not in the flow's thread pool
    assert len(calls.workers) == 9 and set(calls.workers) <= {0, 1}, calls.workers
    direct = recipe.prune(load_params(params), "arith", "magnitude", tmp_path / "direct")
    assert {f"{t:.2f}": Mask.load(p)[0].digest() for t, p in direct.items()} == \
        {t: Mask.load(p)[0].digest() for t, p in result["masks"]["arith/magnitude"].items()}


def _perturb(model_dir: Path) -> None:
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] + 1e-3 * torch.ones_like(weights[name])
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def test_reprune_registers_new_versions_only_when_the_base_changes(prefect_api, mlflow_store, tiny_model_dir,
                                                                   tiny_world_dir, tmp_path, calls):
    base = base_copy(tiny_model_dir, tmp_path / "reprunebase")
    params = write_params(tmp_path / "run", base, tiny_world_dir, mlflow_store, "run.methods=[magnitude]",
                          "evaluation.nll_traces=0", "flow.register_models=false")
    first = check_once(params)        # nothing registered for this base yet (register_models is forced on)
    assert first["changed"] and first["previous"] is None
    assert [(v["name"], v["version"], v["replaces"], v["parent"]) for v in first["registered"]] == [
        ("resp-reprunebase-arith-magnitude", "1", None, "resp-reprunebase-dense/1"),
        ("resp-reprunebase-arith-magnitude", "2", None, "resp-reprunebase-dense/1")]

    calls.clear()
    result = runner.invoke(app, ["schedule", "--once", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"base model {first['base_key'][:12]}: unchanged; 0 new version(s)"
    assert dict(calls) == {}

    _perturb(base)
    changed = check_once(params)
    assert changed["changed"] and changed["previous"]["base_key"] == first["base_key"] != changed["base_key"]
    assert [(v["version"], v["target"], v["replaces"], v["parent"], v["created"]) for v in changed["registered"]] == [
        ("3", "0.10", "1", "resp-reprunebase-dense/2", True), ("4", "0.20", "2", "resp-reprunebase-dense/2", True)]
    uri = load_params(params).registry.tracking_uri
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("resp-reprunebase-arith-magnitude", "3").tags
    assert (tags["replaces"], tags["base_key"]) == ("1", changed["base_key"])
    assert check_once(params)["changed"] is False


def test_deployment_runs_reprune_on_the_params_cron(prefect_api):
    params = ROOT / "params.yaml"
    d = deployment(params)
    schedule = d.schedules[0].schedule
    p = load_params(params)
    assert (d.name, schedule.cron, schedule.timezone) == ("resp-reprune", p.schedule.cron, p.schedule.timezone)
    assert d.parameters == {"params_path": str(params.resolve()), "overrides": []}
    result = runner.invoke(app, ["schedule", "--params", str(params), "--set", 'schedule.cron="*/5 * * * *"'])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"deployment resp-reprune: cron '*/5 * * * *' (UTC), params {params.resolve()}"
    assert lines[1].startswith(f"applied to {PREFECT_API_URL.value()} as deployment ")   # the session's API
    deployment_id = lines[1].split()[5].rstrip(";")
    with get_client(sync_client=True) as client:
        applied = client.read_deployment(deployment_id)
    assert (applied.name, applied.schedules[0].schedule.cron) == ("resp-reprune", "*/5 * * * *")
    result = runner.invoke(app, ["schedule", "--params", str(params), "--set", "schedule.cron=every day"])
    assert result.exit_code == 2
    assert result.output == ("error: schedule.cron 'every day' / schedule.timezone 'UTC' is invalid (Invalid cron string: "
                             "\"every day\"): use a 5-field cron such as '0 3 * * *' and an IANA zone such as UTC\n")


def test_task_runner_from_params(tiny_params):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    thread = flow_module.task_runner(tiny_params.flow)
    assert isinstance(thread, ThreadPoolTaskRunner) and thread._max_workers == tiny_params.flow.workers
    remote = flow_module.task_runner(tiny_params.flow.model_copy(update={"task_runner": "dask",
                                                                         "dask_address": "tcp://10.0.0.1:8786"}))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.1:8786"
