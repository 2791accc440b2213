"""flows/: the Prefect pipeline on a tiny model (cache hits, resume after a failure, Dask fan-out)
and scheduled re-pruning (registers only when the base model's content changes)."""

from __future__ import annotations

import functools
import importlib
import json
import shutil
import time
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

import resp.checkpoints
from flows import pipeline as flow_module
from flows.pipeline import ReadsFiles, content_digest, run_pipeline
from flows.schedule import check_once, deployment
import resp.stages.traces
from resp import evaluation, recipe
from resp.stages import table
from flows.cli import app
from resp.config import declared_method, load_params
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


def stage_module(name: str):
    return importlib.import_module(table.STAGES[name].module)


@pytest.fixture
def calls(monkeypatch):
    """Counts executions of the library functions the task bodies call (and the Dask worker each ran on)."""
    counts, workers = Counter(), []

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counts[name] += 1
            try:
                workers.append((name, get_worker().name))
            except ValueError:  # not inside a Dask worker
                workers.append((name, None))
            return fn(*args, **kwargs)
        return wrapper

    targets = [(resp.stages.traces, "make_traces"), (resp.checkpoints, "export_model"), (evaluation, "evaluate_masks")]
    targets += [(stage_module(name), name) for name in ("calibrate", "score", "apply", "regenerate", "baseline",
                                                        "write_run")]
    for module, name in targets:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    counts.workers = workers
    return counts


def test_cache_key_reads_sections_and_file_contents(tiny_params, tmp_path, monkeypatch):
    policy = ReadsFiles(stage="dense_traces", files=("traces",))   # model, tasks.{task}, calibration, generation
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
    changed = key(tiny_params)
    monkeypatch.setattr(flow_module.table, "code_digest", lambda stage: "other code")   # the stage's code is part of it
    assert key(tiny_params) != changed


def test_a_method_enters_the_cache_key_as_the_sections_its_stage_reads(tiny_params, tmp_path):
    """A stage given a `Method` keys on its name and on the part of its declaration the stage declares
    (heal_traces: `methods.<m>.heal.num_prompts`), not on the whole value: another learning rate keeps the
    healing traces cached, another number of prompts does not."""
    policy = ReadsFiles(stage="heal_traces")

    def key(params):
        return policy.compute_key(None, {"params": params, "task": "arith", "out": str(tmp_path / "h.jsonl"),
                                         "base": {"key": "k"}, "method": declared_method(params, "resp_heal")}, {})

    def healing(**update):
        heal = tiny_params.methods["resp_heal"].heal.model_copy(update=update)
        methods = {**tiny_params.methods, "resp_heal": tiny_params.methods["resp_heal"].model_copy(update={"heal": heal})}
        return tiny_params.model_copy(update={"methods": methods})

    first = key(tiny_params)
    assert key(tiny_params) == first                 # a value built again keys the same
    assert key(healing(lr=0.5)) == first
    assert key(healing(num_prompts=5)) != first


def test_a_stage_caches_on_its_own_code_only():
    """Editing the CLI or the report does not invalidate a cached pruning stage; editing scoring invalidates
    scoring, editing FLAP only the baselines (and the composition that holds them), never the dense traces."""
    code = {name: set(table.code_files(stage.module)) for name, stage in table.STAGES.items()}
    for stage in ("score", "prune"):
        assert {"resp/importance.py", "resp/masks.py", f"resp/stages/{stage}.py" if stage != "prune" else
                "resp/recipe.py"} <= code[stage]
    for stage in ("calibrate", "score", "apply", "regenerate", "baseline", "write_run", "prune", "dense_traces"):
        assert not {"resp/cli.py", "resp/report.py", "resp/registry.py", "resp/evaluation.py"} & code[stage]
    assert [name for name, files in code.items() if "resp/baselines.py" in files] == ["prune", "baseline"]
    assert [name for name, files in code.items() if "resp/stages/score.py" in files] == ["prune", "score"]
    assert table.code_files("resp.report") == ("resp/artifacts.py", "resp/config.py", "resp/locking.py",
                                               "resp/report.py", "resp/stats.py")


def test_second_run_takes_every_task_from_the_cache(prefect_api, mlflow_store, tiny_model_dir, tiny_world_dir,
                                                    tmp_path, calls, caplog):
    base = base_copy(tiny_model_dir, tmp_path / "cachebase")
    params = write_params(tmp_path / "run", base, tiny_world_dir, mlflow_store)
    first = run_pipeline(params)
    # dense + held-out traces, one method, one export per target, the method's and the dense evaluation
    assert dict(calls) == {"make_traces": 2, "calibrate": 1, "score": 4, "apply": 6, "regenerate": 2, "write_run": 1,
                           "export_model": 2, "evaluate_masks": 2}
    assert [(v["target"], v["created"], v["replaces"]) for v in first["registered"]] == [("0.10", True, None),
                                                                                         ("0.20", True, None)]
    masks = first["masks"]["arith/resp"]
    assert sorted(masks) == ["0.10", "0.20"] and all(Path(p).is_file() for p in masks.values())
    # cached results are JSON (paths and plain data), never pickles that would run code when read back
    stored = [json.loads(f.read_text()) for f in (tmp_path / "run" / "results").iterdir() if f.is_file()]
    assert {r["metadata"]["serializer"]["type"] for r in stored} == {"json"}
    assert any(json.loads(r["result"]).get("result") == masks for r in stored if r["result"].startswith("{"))
    # one task run per step: 2 trace sets, calibrate, 4 x (score, apply), 2 target masks, 2 regenerations,
    # write_run, 2 exports, 2 evaluations
    names = task_run_names()
    assert len(stored) == len(names) - 1 == 20   # registration is never cached
    assert {"dense_traces-arith-dense", "calibrate-arith-resp-calibration", "score-arith-resp-step-0001-scores",
            "apply-arith-resp-step-0002-target-0.1000", "regenerate-arith-resp-milestone-0.05",
            "write_run-arith-resp", "export-arith-resp-sparsity-0.10", "evaluate-arith-resp",
            "register-arith-resp"} <= set(names)

    calls.clear()
    result = runner.invoke(app, ["run", "--params", str(params)])   # the same flow through the CLI
    assert result.exit_code == 0, result.output
    assert dict(calls) == {}                                          # no task body ran
    assert f"arith/resp: 2 masks, metrics {first['metrics']['arith/resp']}" in result.output
    for v in first["registered"]:
        assert f"registered {v['name']} version {v['version']} (target {v['target']}), already registered" in result.output

    plant_pickle_in_the_cache(tmp_path, masks, calls, caplog, lambda: run_pipeline(params))

    # a changed evaluation knob reruns the evaluations only; a deleted export is recomputed
    calls.clear()
    shutil.rmtree(first["exports"]["arith/resp/0.20"]["masked"])
    again = run_pipeline(params, ["evaluation.num_items=3"])
    assert dict(calls) == {"evaluate_masks": 2, "export_model": 1}
    assert again["masks"] == first["masks"] and Path(again["exports"]["arith/resp/0.20"]["masked"]).is_dir()

    calls.clear()
    run_pipeline(params, ["flow.cache=false"])                         # every task reruns
    assert dict(calls) == {"make_traces": 2, "calibrate": 1, "score": 4, "apply": 6, "regenerate": 2, "write_run": 1,
                           "export_model": 2, "evaluate_masks": 2}


class RunsCode:
    """A pickle payload: unpickling it creates `marker` (what `os.system` would do, visibly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle_in_the_cache(tmp_path, masks, calls, caplog, run):
    """The cached result of write_run rewritten as a record that names the pickle serializer, with a payload
    that runs code when unpickled: the next run reads nothing from it (the payload never runs), warns once,
    and runs write_run again, which replaces the record with JSON."""
    import base64
    import logging

    import cloudpickle

    records = {f: json.loads(f.read_text()) for f in (tmp_path / "run" / "results").iterdir() if f.is_file()}
    target = next(f for f, r in records.items() if r["result"].startswith("{")
                                and json.loads(r["result"]).get("result") == masks)
    marker = tmp_path / "payload-ran"
    planted = records[target]
    planted["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}
    planted["result"] = base64.b64encode(cloudpickle.dumps(RunsCode(marker))).decode()
    target.write_text(json.dumps(planted))
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="resp.flow"):
        run()
    assert not marker.exists()                                   # nothing executed
    assert dict(calls) == {"write_run": 1}                       # the step recomputed, nothing else
    warnings = [r.getMessage() for r in caplog.records if r.name == "resp.flow"]
    assert warnings == [(f"cached result {target.name} in flow.results_dir was not written by resp (serializer pickle, "
                         f"not json): moved to {target.name}.refused unread; its task runs again")]
    assert json.loads(target.read_text())["metadata"]["serializer"]["type"] == "json"   # rewritten by the rerun
    assert json.loads(target.with_name(f"{target.name}.refused").read_text()) == planted  # kept, never read


def task_run_names(states: bool = False):
    """The task runs of the newest flow run (name, or (name, state name) with `states`), in start order."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        for _ in range(40):   # the server records a task run's state shortly after the run itself (seen under load)
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                                         sort=TaskRunSort.EXPECTED_START_TIME_ASC)
            if all(r.state is not None for r in runs):
                break
            time.sleep(0.25)
    return [(r.name, r.state.name) if states else r.name for r in runs]


def test_a_flow_killed_mid_pruning_resumes_at_the_step_it_was_in(prefect_api, mlflow_store, tiny_model_dir,
                                                                   tiny_world_dir, tmp_path, monkeypatch):
    """Killed while scoring step 3 (after the milestone-0.10 regeneration finished), the flow started
    again executes no step of 1-2 and not that regeneration, and ends with the masks of a run that
    was never interrupted, byte for byte."""
    off = "flow.register_models=false"
    params = write_params(tmp_path / "run", tiny_model_dir, tiny_world_dir, mlflow_store, off)
    executed = []

    def spy(name, fn, kill=None):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            out = Path(kwargs.get("out", args[-1]))
            where = f"{out.parent.name}/{out.stem}"
            if where == kill:
                raise RuntimeError(f"killed at {where}")
            executed.append(f"{name} {where}")
            return fn(*args, **kwargs)
        return run

    real = {name: getattr(stage_module(name), name) for name in ("score", "apply", "regenerate")}
    for name, fn in real.items():
        monkeypatch.setattr(stage_module(name), name, spy(name, fn, kill="step-0003/scores"))
    with pytest.raises(RuntimeError, match="killed at step-0003/scores"):
        run_pipeline(params)
    assert executed[-1] == "regenerate traces/milestone-0.10"

    executed.clear()
    for name, fn in real.items():
        monkeypatch.setattr(stage_module(name), name, spy(name, fn))
    result = run_pipeline(params)
    assert executed == ["score step-0003/scores", "apply step-0003/mask", "score step-0004/scores",
                        "apply step-0004/target-0.2000", "apply step-0004/mask"]
    runs = dict(task_run_names(states=True))
    assert runs["score-arith-resp-step-0002-scores"] == "Cached" and runs["regenerate-arith-resp-milestone-0.10"] == "Cached"
    assert runs["score-arith-resp-step-0003-scores"] == "Completed"

    reference = run_pipeline(write_params(tmp_path / "ref", tiny_model_dir, tiny_world_dir, mlflow_store, off))
    for target, mask in result["masks"]["arith/resp"].items():
        assert Path(mask).read_bytes() == Path(reference["masks"]["arith/resp"][target]).read_bytes()


def test_failed_run_resumes_from_the_finished_tasks(prefect_api, mlflow_store, tiny_model_dir, tiny_world_dir,
                                                    tmp_path, calls, monkeypatch):
    params = write_params(tmp_path / "run", tiny_model_dir, tiny_world_dir, mlflow_store, "flow.register_models=false")

    def killed(*args, **kwargs):
        raise RuntimeError("export killed")

    real_export = resp.checkpoints.export_model
    monkeypatch.setattr(resp.checkpoints, "export_model", killed)
    with pytest.raises(RuntimeError, match="export killed"):
        run_pipeline(params)
    assert (calls["make_traces"], calls["write_run"], calls["evaluate_masks"]) == (2, 1, 2)

    calls.clear()
    monkeypatch.setattr(resp.checkpoints, "export_model", real_export)
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
    assert dict(calls) == {"calibrate": 2, "baseline": 2, "write_run": 2, "export_model": 4, "evaluate_masks": 3}
    # exports and evaluations ran on the cluster's two workers; pruning steps in the flow's process
    fanned = [w for name, w in calls.workers if name in ("export_model", "evaluate_masks")]
    assert len(fanned) == 7 and set(fanned) <= {0, 1}, calls.workers
    assert {w for name, w in calls.workers if name not in ("export_model", "evaluate_masks")} == {None}
    loaded = load_params(params)
    direct = recipe.prune(loaded, "arith", declared_method(loaded, "magnitude"), tmp_path / "direct")
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
    assert result.output == (f"error: {params} is invalid: schedule.cron: Value error, 'every day' is not a 5-field cron "
                             "expression: use e.g. '0 3 * * *' (daily at 03:00)\n")


def test_task_runner_from_params(tiny_params):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    thread = flow_module.task_runner(tiny_params.flow)
    assert isinstance(thread, ThreadPoolTaskRunner) and thread._max_workers == tiny_params.flow.workers
    remote = flow_module.task_runner(tiny_params.flow.model_copy(update={"task_runner": "dask",
                                                                         "dask_address": "tcp://10.0.0.1:8786"}))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.1:8786"


def test_the_temporary_prefect_server_dies_with_a_killed_run(tmp_path):
    """`resp run` without PREFECT_API_URL starts a temporary server; after kill -9 of the run it kept running
    (~230 MB, orphaned). Now a watchdog stops it once its parent is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import time\nfrom flows.pipeline import temporary_server_dies_with_this_process\n"
              "print(temporary_server_dies_with_this_process(), flush=True)\ntime.sleep(300)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env=env)
    server = int(run.stdout.readline())
    try:
        assert "uvicorn" in Path(f"/proc/{server}/cmdline").read_text()
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    for _ in range(100):
        if not Path(f"/proc/{server}").exists() or "Z" in Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1][:3]:
            break
        time.sleep(0.1)
    else:
        os.kill(server, signal.SIGKILL)
        raise AssertionError(f"temporary server {server} outlived its killed parent by 10 s")


def test_cache_keys_are_computed_safely_from_many_threads(tiny_params, tmp_path, monkeypatch):
    """With the thread runner, 2 of 3 runs failed to compute a cache key (concurrent ast.parse in
    table.code_digest: "SystemError: AST constructor recursion depth mismatch"). The flow now parses the
    code of every stage once, under a lock, before any key is used."""
    from concurrent.futures import ThreadPoolExecutor

    table.code_digest.cache_clear()
    table.code_files.cache_clear()
    names = list(table.STAGES) * 8
    with ThreadPoolExecutor(max_workers=16) as pool:
        digests = list(pool.map(flow_module.code_digest, names))
    assert dict(zip(names, digests)) == {name: table.code_digest(name) for name in table.STAGES}


def test_unwritable_results_dir_and_empty_lists_end_in_one_line(tiny_params, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params.model_dump(mode="json")))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for override, line in [
        (f"flow.results_dir={blocker}/results",
         (f"error: flow.results_dir {blocker}/results: {blocker} is a file, not a directory: choose another "
          "flow.results_dir")),
        ("run.methods=[]", (f"error: {params} is invalid: run.methods: Value error, is empty, so a run would do "
                            "nothing: name at least one")),
        ("run.tasks=[]", (f"error: {params} is invalid: run.tasks: Value error, is empty, so a run would do nothing: "
                          "name at least one"))]:
        result = runner.invoke(app, ["run", "--params", str(params), "--set", override])
        assert (result.exit_code, result.output.strip().splitlines()) == (2, [line])
