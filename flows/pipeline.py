"""The RESP workflow as a Prefect flow (method steps 1-10, then registration), read top to bottom in `pipeline`:

    dense traces -> per (task, method): calibrate -> (score -> apply -> regenerate?)* | baseline -> write_run
    -> heal (methods declaring it) -> export per mask -> evaluate per method -> register in MLflow
    (healed models: exported, evaluated without held-out NLL, registered with the pruned version as parent)

Every stage of `resp.stages.table.STAGES` becomes a Prefect task in one loop (`TASKS`): its body is
the stage's function, its cache key (`ReadsFiles`) the params sections the stage declares, the
content digests of the files its `files` arguments name, the task's data when it reads a task's
params, its other inputs (output paths, sparsity, tags) and the digest of the code it runs (its
module's import closure). The pruning stages are composed by the library's own `resp.recipe.prune`,
to which the flow passes a `call` that runs each stage as its task (one task run per scoring step,
mask application and regeneration). Tasks exchange paths, never live models; within the process
models come from `resp.stages.common`'s per-process cache. Results persist under
`flow.results_dir`: a second run, or a run started again after it was killed, takes every finished
stage from the cache (a killed pruning run resumes at the step it was in), and a changed input
reruns only what depends on it. A cached result whose files are gone or were overwritten since is
recomputed. Registration is never cached: the registry itself returns the existing version of a
mask that is already registered.

Independent tasks (trace sets of different tasks, exports, evaluations) are submitted together
to the task runner; pruning stages run one after another in the flow's process. Within one
process tasks take turns at building models (see one_model_at_a_time); a Dask cluster of
worker processes (`flow.task_runner: dask`) runs exports and evaluations in parallel.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.client.orchestration import get_client
from prefect.futures import wait
from prefect.settings import (PREFECT_API_URL, PREFECT_LOGGING_EXTRA_LOGGERS, PREFECT_RESULTS_LOCAL_STORAGE_PATH,
                              temporary_settings)
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.hashing import hash_objects

from resp import recipe
from resp.artifacts import Layout, content_digest, parse_target, target_key, target_name
from resp.config import FlowParams, Method, Params, declared_method, load_params
from resp.distributed import check_launch
from resp.stages import table
from resp.stages.common import base_model
from resp.stages.table import STAGES, Stage, stage_of, stage_params

# Results are paths and plain data: stored as JSON, never pickles (a pickle in .prefect/results would
# run code when a later run reads the cache).
RESULTS = "json"
log = logging.getLogger("resp.flow")   # flow_settings shows "resp" loggers in Prefect's logs


class FlowError(ValueError):
    pass


def refuse_foreign_record(key: str) -> None:
    """Prefect takes a cached record's serializer from the file itself, so a record in
    `flow.results_dir` that names `pickle` would run its payload when the cache is read. Before
    Prefect looks a key up, a record there that is not a JSON record of the JSON serializer (which
    is all this project writes) is moved aside to `<key>.refused` with one warning: the lookup
    misses and the task runs again."""
    path = Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()) / key
    if not path.is_file():
        return
    try:
        serializer = json.loads(path.read_bytes())["metadata"]["serializer"]["type"]
    except (ValueError, KeyError, TypeError):
        serializer = "none (not a JSON result record)"
    except OSError:
        return   # unreadable: Prefect's own read fails the same way, without running anything
    if serializer != RESULTS:
        refused = path.with_name(f"{key}.refused")
        path.replace(refused)
        log.warning("cached result %s in flow.results_dir was not written by resp (serializer %s, not %s): moved to "
                    "%s unread; its task runs again", key, serializer, RESULTS, refused.name)


# ---------------------------------------------------------------- cache keys

@dataclass
class ReadsFiles(CachePolicy):
    """Cache key of a stage: the params sections it declares (`{task}`/`{method}` filled from its
    inputs), the content of the files its `files` arguments name, the data of the task when it reads
    a task's params, its other inputs, and the digest of the code it runs."""

    stage: str = ""
    files: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        params = inputs["params"]
        # a method enters by name: its declaration is the `methods.{method}` section among the params
        inputs = {k: method_name(v) for k, v in inputs.items()}
        fill = {k: inputs[k] for k in ("task", "method") if k in inputs}
        other = {k: v for k, v in inputs.items() if k not in self.files and k != "params"}
        reads_data = "task" in inputs and any(s.startswith("tasks") for s in STAGES[self.stage].sections)
        key = hash_objects({"stage": self.stage, "params": stage_params(params, self.stage, **fill),
                            "files": {name: content_digest(inputs[name]) for name in self.files},
                            "data": task_data_digests(params, inputs["task"]) if reads_data else None,
                            "inputs": other, "code": code_digest(self.stage)}, raise_on_failure=True)
        refuse_foreign_record(key)
        return key


def method_name(value):
    """A `Method` argument's name (what cache keys and task run names hold); any other argument as it is."""
    return value.name if isinstance(value, Method) else value


_CODE_LOCK = threading.Lock()


def code_digest(stage: str) -> str:
    """`table.code_digest`, safe under any task runner: the first key computed in a process parses the code
    of every stage at once, under a lock (concurrent `ast.parse` calls failed with "SystemError: AST
    constructor recursion depth mismatch"); a task body runs only after its key, so it only reads the
    memoised digests."""
    with _CODE_LOCK:
        for name in STAGES:
            table.code_digest(name)
    return table.code_digest(stage)


def task_data_digests(params: Params, task_name: str) -> dict:
    """Digests of the task's data and of the generic-text task (baseline calibration)."""
    out = {}
    for name in (task_name, params.prose_task):
        t = params.tasks[name]
        out[name] = content_digest(t.source) if Path(t.source).exists() else f"hub:{t.source}:{t.subset}"
    return out


# ---------------------------------------------------------------- tasks, one per stage of resp.stages.table
#
# transformers and accelerate patch process-wide state while they import and build models
# (lazy module attributes; `init_empty_weights` swaps nn.Module.register_parameter), so two
# bodies that build models in one process corrupt each other ("Cannot copy out of meta
# tensor"). Bodies in one process take turns; parallel work needs Dask worker processes.
_MODEL_LOCK = threading.Lock()


def one_model_at_a_time() -> threading.Lock:
    # A function, not the lock itself, in the bodies: Dask pickles task bodies by value and a
    # lock cannot be pickled, while a module-level function travels by reference.
    return _MODEL_LOCK


RESULT = {"persist_result": True, "result_serializer": RESULTS}


def stamped(result) -> dict:
    """A task's result with the digests of the files it names, to tell later whether they changed."""
    return {"result": result, "digests": content_digest(result)}


def is_stale(stamp) -> bool:
    """A (cached) result whose files are gone or were rewritten since the task wrote them, or one
    cached before results were stamped."""
    if not isinstance(stamp, dict) or stamp.keys() != {"result", "digests"}:
        return True
    return content_digest(stamp["result"]) != stamp["digests"]


def stage_task(stage: Stage):
    """The Prefect task of a stage: its function, taking turns at models, its result stamped; cached by
    `ReadsFiles` unless the stage says otherwise. (The body keeps a name of its own, not the function's:
    Dask would otherwise send the bare function by reference.)"""
    function = stage.function

    def body(*args, **kwargs):
        with one_model_at_a_time():
            result = stage.function(*args, **kwargs)   # looked up per run: the module's function as it is now
        return stamped(result) if stage.cached else result

    body.__signature__ = inspect.signature(function)
    body.__name__ = body.__qualname__ = stage.name
    body.__doc__ = function.__doc__
    if not stage.cached:
        return task(body, name=stage.name, cache_policy=NO_CACHE)
    return task(body, name=stage.name, cache_policy=ReadsFiles(stage=stage.name, files=stage.files), **RESULT)


TASKS = {name: stage_task(stage) for name, stage in STAGES.items() if not stage.parts and name != "report"}


def run_name(stage: str, kwargs: dict, task_name: str | None = None, method: str | None = None) -> str:
    """`score-arith-resp-step-0003-scores`: the stage, the task, the method, and where its output goes."""
    parts = [stage, kwargs.get("task", task_name), method_name(kwargs.get("method", method))]
    outputs = [kwargs[name] for name in STAGES[stage].outputs if kwargs.get(name)]
    if outputs:
        out = Path(outputs[0])
        stem = out.name.removesuffix(out.suffix) if out.suffix in (".jsonl", ".json", ".safetensors") else out.name
        where = out.parent.name + "-" + stem if out.parent.name.startswith("step-") else stem
        parts += [where] if where not in parts else []
    return "-".join(part for part in parts if part)


def run(stage: str, kwargs: dict, refresh: bool, task_name: str | None = None, method: str | None = None):
    """One stage as its task; a cached result whose files are gone or were rewritten since is recomputed."""
    t = TASKS[stage].with_options(task_run_name=run_name(stage, kwargs, task_name, method))
    stamp = t.with_options(refresh_cache=refresh)(**kwargs)
    if not STAGES[stage].cached:
        return stamp
    if is_stale(stamp):
        get_run_logger().warning("outputs of the cached %s stage are gone or changed; recomputing", stage)
        stamp = t.with_options(refresh_cache=True)(**kwargs)
    return stamp["result"]


def stage_caller(task_name: str, method: str, refresh: bool):
    """The `call` that `resp.recipe.prune` runs its stages through: each stage as its Prefect task."""
    def call(function, **kwargs):
        return run(stage_of(function).name, kwargs, refresh, task_name, method)
    return call


@contextmanager
def _workers_report_here():
    """Without PREFECT_API_URL, every Dask worker process would start a temporary Prefect server
    of its own (seconds each, its task runs out of sight): submit with this flow's API instead."""
    if PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url).rstrip("/")
    with temporary_settings({PREFECT_API_URL: url}):
        yield


def _submit(calls: dict, refresh: bool) -> dict:
    with _workers_report_here():
        futures = {key: TASKS[stage].with_options(task_run_name=run_name(stage, kwargs, *names), refresh_cache=refresh)
                   .submit(**kwargs) for key, (stage, kwargs, *names) in calls.items()}
    wait(list(futures.values()))
    return {key: f.result() for key, f in futures.items()}


def _run_wave(calls: dict, refresh: bool) -> dict:
    """Submit independent stages together, {key: (stage, kwargs, task, method)}; wait for all; a failure fails
    the flow after the others finished. Returns each stage's result; a cached result whose files are gone or
    were rewritten since is recomputed."""
    stamps = _submit(calls, refresh)
    stale = [key for key, stamp in stamps.items() if is_stale(stamp)]
    if stale:
        get_run_logger().warning("outputs of %d cached task(s) are gone or changed (%s); recomputing them",
                                 len(stale), stale)
        stamps.update(_submit({key: calls[key] for key in stale}, refresh=True))
    return {key: stamp["result"] for key, stamp in stamps.items()}


@flow(name="resp-pipeline")
def pipeline(params_path: str, overrides: list[str] | None = None) -> dict:
    """Traces -> (score -> apply -> regenerate?)* -> export -> evaluate -> register, for every task and method in `run`."""
    logger = get_run_logger()
    p = load_params(params_path, overrides)
    base = base_model(p)   # once per run: hashing a local model's weights is not free
    logger.info("base model %s (%s); tasks %s; methods %s", base["name"], base["key"][:12], p.run.tasks, p.run.methods)
    layout = Layout(Path(p.flow.data_dir))
    refresh = not p.flow.cache
    methods = {m: declared_method(p, m) for m in p.run.methods}
    if any(d.declaration.scorer == "taylor" for d in methods.values()):
        check_launch(p)   # the scoring workers scale.score_nproc asks for can start, before any trace is made

    # the dense model's traces: calibration (for methods calibrated on them) and held-out NLL
    calls = {}
    for t in p.run.tasks:
        if any(method.declaration.reads_dense_traces for method in methods.values()):
            calls["dense", t] = ("dense_traces", {"params": p, "task": t, "out": str(layout.dense_traces(t)), "base": base})
        if p.evaluation.nll_traces:
            calls["heldout", t] = ("heldout_traces", {"params": p, "task": t, "out": str(layout.heldout_traces(t)),
                                                      "base": base})
    traces = _run_wave(calls, refresh)

    # pruning, stage by stage: calibrate -> (score -> apply -> regenerate?)* | baseline -> write_run
    masks = {}
    for t in p.run.tasks:
        for m, method in methods.items():
            dense = traces["dense", t] if method.declaration.reads_dense_traces else None
            written = recipe.prune(p, t, method, layout.run_dir(t, m), dense, call=stage_caller(t, m, refresh))
            masks[t, m] = {target_key(target): str(path) for target, path in written.items()}

    # healing (methods declaring heal: {...}): the healing traces, then every mask of the method healed
    healing = [(t, m) for (t, m) in masks if methods[m].declaration.heal is not None]
    heal_data = _run_wave({("heal_traces", t, m): ("heal_traces", {
        "params": p, "task": t, "method": methods[m],
        "out": str(layout.heal_traces(t, methods[m].declaration.heal.num_prompts)),
        "base": base}) for t, m in healing}, refresh)
    healed = _run_wave({("heal", t, m, target): ("heal", {
        "params": p, "task": t, "method": methods[m], "mask": mask, "traces": [heal_data["heal_traces", t, m]],
        "out": str(layout.healed(t, m, parse_target(target)))})
        for t, m in healing for target, mask in masks[t, m].items()}, refresh)

    # exports of every mask, evaluation of every method and of the dense model; the same of every healed model
    calls = {}
    for (t, m), written in masks.items():
        for target, mask in written.items():
            calls["export", t, m, target] = ("export", {
                "params": p, "mask": mask, "formats": list(p.export.formats),
                "out_root": str(layout.export_root(t, m, parse_target(target))), "base": base}, t, m)
        calls["evaluate", t, m] = ("evaluate", {"params": p, "task": t, "method": m, "masks": written,
                                                "heldout": traces.get(("heldout", t)), "out": str(layout.metrics(t, m)),
                                                "include_dense": False})
    for t in p.run.tasks:
        calls["evaluate", t, "dense"] = ("evaluate", {"params": p, "task": t, "method": "dense", "masks": {},
                                                      "heldout": traces.get(("heldout", t)),
                                                      "out": str(layout.dense_metrics(t)), "include_dense": True})
    for (_, t, m, target), healed_dir in healed.items():
        where = target_name(parse_target(target))
        calls["export_healed", t, m, target] = ("export_healed", {
            "params": p, "healed": healed_dir, "formats": list(p.export.formats),
            "out_root": str(layout.method_exports(t, m) / "healed" / where)}, t, m)
        calls["evaluate_healed", t, m, target] = ("evaluate_healed", {
            "params": p, "task": t, "method": m, "healed": healed_dir,
            "out": str(layout.metrics(t, m).with_name(f"{m}-healed") / f"{where}.json")})
    done = _run_wave(calls, refresh)

    # registration: never cached (the registry returns the version of a mask already registered);
    # one method at a time: a sqlite store takes one writer
    registered = []
    if p.flow.register_models:
        for (t, m), written in masks.items():
            exports = {parse_target(target): done["export", t, m, target] for target in written}
            registered += run("register", {"params": p, "task": t, "method": m, "masks_dir": str(layout.masks_dir(t, m)),
                                           "exports": exports, "metrics": done["evaluate", t, m]}, refresh)
        for (_, t, m, target), healed_dir in healed.items():   # after the pruned versions, their parents
            registered.append(run("register_healed", {
                "params": p, "healed_dir": healed_dir, "exports": done["export_healed", t, m, target],
                "metrics": done["evaluate_healed", t, m, target]}, refresh, t, m))
    for v in registered:
        logger.info("%s version %s (target %s)%s", v["name"], v["version"], v["target"],
                    "" if v["created"] else " was already registered")
    return {"base_key": base["key"],
            "traces": {f"{kind}/{t}": path for (kind, t), path in traces.items()},
            "masks": {f"{t}/{m}": written for (t, m), written in masks.items()},
            "exports": {f"{k[1]}/{k[2]}/{k[3]}": v for k, v in done.items() if k[0] == "export"},
            "metrics": {f"{k[1]}/{k[2]}": v for k, v in done.items() if k[0] == "evaluate"},
            "healed": {f"{k[1]}/{k[2]}/{k[3]}": v for k, v in healed.items()},
            "healed_exports": {f"{k[1]}/{k[2]}/{k[3]}": v for k, v in done.items() if k[0] == "export_healed"},
            "healed_metrics": {f"{k[1]}/{k[2]}/{k[3]}": v for k, v in done.items() if k[0] == "evaluate_healed"},
            "registered": registered}


def task_runner(fp: FlowParams):
    """The task runner `flow.task_runner` names: a thread pool or a Dask cluster."""
    if fp.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=fp.workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise FlowError("flow.task_runner is dask but prefect-dask is not installed: pip install 'resp[dask]' "
                        "or set flow.task_runner=thread") from None
    if fp.dask_address:
        return DaskTaskRunner(address=fp.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": fp.workers, "processes": fp.dask_processes,
                                          "threads_per_worker": 1})


def flow_settings(fp: FlowParams):
    """Prefect settings of a run: results persisted under `flow.results_dir`; library logs in Prefect's."""
    return temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(Path(fp.results_dir).resolve()),
                               PREFECT_LOGGING_EXTRA_LOGGERS: "resp"})


# Runs beside a temporary Prefect server: once the process that started the server is gone (however it
# ended, kill -9 included: it is then no longer this watchdog's parent), the server is stopped too.
_WATCHDOG = """
import os, signal, sys, time
parent, server, started = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def same_server():  # the pid, and the start time it had: never a later process that reuses the pid
    try:
        with open(f"/proc/{server}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19] == started
    except (OSError, IndexError):
        return False
while os.getppid() == parent and same_server():
    time.sleep(0.5)
if same_server():
    os.kill(server, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not same_server():
            break
    else:
        os.kill(server, signal.SIGKILL)
"""
_WATCHED: set[int] = set()


def temporary_server_dies_with_this_process() -> int | None:
    """Without PREFECT_API_URL, Prefect starts a temporary server (a uvicorn process, ~230 MB) and stops
    it at exit, which a killed process never reaches. Start it now and watch it: the watchdog stops it
    when this process is gone. Returns the server's pid (None when a configured server is used)."""
    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()   # the instance every client of this process uses
    server.start()
    pid = server.server_process.pid
    if pid not in _WATCHED:
        try:
            with open(f"/proc/{pid}/stat") as f:
                started = f.read().rsplit(")", 1)[1].split()[19]
        except OSError:   # no /proc (not Linux): Prefect's own stop at exit only
            return pid
        subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid), started],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        _WATCHED.add(pid)
    return pid


def check_flow_outputs(fp: FlowParams) -> None:
    """Before anything runs: the results (cache) and data folders can be written."""
    from resp.outputs import check_output

    check_output(fp.results_dir, "dir", option="flow.results_dir")
    check_output(fp.data_dir, "dir", option="flow.data_dir")


def run_pipeline(params_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Run the pipeline flow from a params file (what `resp run` does)."""
    p = load_params(params_path, overrides)
    check_flow_outputs(p.flow)
    temporary_server_dies_with_this_process()
    with flow_settings(p.flow):
        return pipeline.with_options(task_runner=task_runner(p.flow))(str(params_path), list(overrides or []))
