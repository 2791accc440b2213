"""The RESP workflow as a Prefect flow (method steps 1-10, then registration).

    trace sets (dense calibration, held-out) -> per (task, method): calibrate, then per pruning
    step score -> apply (and regenerate at milestones or on drift), or one baseline step; then
    write the run -> export per mask -> evaluate per method -> register in MLflow

Every step of `resp.steps` runs as a Prefect task of its own (one task run per scoring step,
mask application and regeneration), composed by the library's own `resp.recipe.prune`, to
which the flow passes a `call` that runs a step as a task. Tasks exchange paths, never live
models; within the process models come from `resp.steps`' per-process cache. A task's cache
key is the params sections its step declares (`resp.steps.STEPS`), the content digests of the
files it reads, its other inputs (output paths, sparsity, tags) and the code it runs (the
step's import closure). Results persist under `flow.results_dir`: a second run, or a run
started again after it was killed, takes every finished step from the cache (a killed
pruning run resumes at the step it was in), and a changed input reruns only what depends on
it. A cached result whose files are gone or were overwritten since is recomputed.
Registration is never cached: the registry itself returns the existing version of a mask that
is already registered.

Independent tasks (trace sets of different tasks, exports, evaluations) are submitted together
to the task runner; pruning steps run one after another in the flow's process. Within one
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

from resp import evaluation, recipe, registry, steps
from resp.artifacts import Layout, content_digest, parse_target, target_key
from resp.models import ModelIdentity
from resp.config import FlowParams, Params, load_params

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
    """Cache key of a step: the params sections it declares (`{task}`/`{method}` filled from its
    inputs), the content of the files its `files` parameters name, its other inputs, and the
    digest of the code it runs."""

    step: str = ""
    files: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        fill = {k: inputs[k] for k in ("task", "method") if k in inputs}
        other = {k: v for k, v in inputs.items() if k not in self.files and k != "params"}
        key = hash_objects({"step": self.step, "params": steps.step_params(inputs["params"], self.step, **fill),
                            "files": {name: content_digest(inputs[name]) for name in self.files},
                            "inputs": other, "code": code_digest(self.step)}, raise_on_failure=True)
        refuse_foreign_record(key)
        return key


_CODE_LOCK = threading.Lock()


def code_digest(step: str) -> str:
    """`steps.code_digest`, safe under any task runner: the first key computed in a process parses the code
    of every step at once, under a lock (concurrent `ast.parse` calls failed with "SystemError: AST
    constructor recursion depth mismatch"); a task body runs only after its key, so it only reads the
    memoised digests."""
    with _CODE_LOCK:
        for name in steps.STEPS:
            steps.code_digest(name)
    return steps.code_digest(step)


def cache_policy(step: str, files: tuple[str, ...] = ()) -> CachePolicy:
    return ReadsFiles(step=step, files=files)


def data_key(params: Params, task_name: str) -> dict:
    """Digests of the task's data and of the generic-text task (baseline calibration)."""
    out = {}
    for name in (task_name, params.prose_task):
        t = params.tasks[name]
        out[name] = content_digest(t.source) if Path(t.source).exists() else f"hub:{t.source}:{t.subset}"
    return out


# ---------------------------------------------------------------- tasks
# `base` (the base model's identity: hub revision or content hash) and `data_key` are not used in
# the bodies: they are inputs so that a changed base model or task file changes the cache key.
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


@task(cache_policy=cache_policy("calibration_traces"), task_run_name="traces-{task}-calibration", **RESULT)
def calibration_traces(params: Params, task: str, out: str, base: dict, data_key: dict) -> dict:
    """Sample the dense model's own reasoning traces on the calibration prompts."""
    with one_model_at_a_time():
        return stamped(str(recipe.make_traces(params, task, params.tasks[task].calibration_split, None, out,
                                              base=base)))


@task(cache_policy=cache_policy("heldout_traces"), task_run_name="traces-{task}-heldout", **RESULT)
def heldout_traces(params: Params, task: str, out: str, base: dict, data_key: dict) -> dict:
    """Dense traces on the first evaluation.nll_traces items of the eval split (held-out NLL)."""
    with one_model_at_a_time():
        return stamped(str(recipe.make_traces(params, task, params.tasks[task].eval_split, params.evaluation.nll_traces,
                                              out, base=base)))


def _step_run_name() -> str:
    """`score-arith-resp-step-0003`: the step, the run, and where in the run its output goes."""
    from prefect.runtime import task_run

    args = task_run.parameters
    out = Path(args.get("out") or args.get("out_dir"))
    where = out.parent.name + "-" + out.stem if out.parent.name.startswith("step-") else out.stem
    return "-".join([task_run.task_name, args["task"], args["method"], where])


def stamped(result) -> dict:
    """A task's result with the digests of the files it names, to tell later whether they changed."""
    return {"result": result, "digests": content_digest(result)}


def is_stale(stamp) -> bool:
    """A (cached) result whose files are gone or were rewritten since the task wrote them, or one
    cached before results were stamped."""
    if not isinstance(stamp, dict) or stamp.keys() != {"result", "digests"}:
        return True
    return content_digest(stamp["result"]) != stamp["digests"]


def _step_task(step: str, files: tuple[str, ...]):
    return task(name=step, cache_policy=cache_policy(step, files), task_run_name=_step_run_name, **RESULT)


@_step_task("calibrate", files=("dense_traces",))
def calibrate(params: Params, task: str, method: str, base: dict, dense_traces: str | None, out: str,
              data_key: dict) -> dict:
    with one_model_at_a_time():
        return stamped(steps.calibrate(params, task, method, base, dense_traces, out))


@_step_task("score", files=("mask", "traces", "reference"))
def score(params: Params, task: str, method: str, base: dict, mask: str | None, traces: str, reference: str,
          out: str, part: int) -> dict:
    with one_model_at_a_time():
        return stamped(steps.score(params, task, method, base, mask, traces, reference, out, part=part))


@_step_task("apply", files=("scores", "mask"))
def apply(params: Params, task: str, method: str, base: dict, scores: str, mask: str | None, sparsity: float,
          out: str) -> dict:
    with one_model_at_a_time():
        return stamped(steps.apply(params, base, scores, mask, sparsity, out))


@_step_task("regenerate", files=("mask", "prompts"))
def regenerate(params: Params, task: str, method: str, base: dict, mask: str, prompts: str, tag: str, out: str,
               data_key: dict) -> dict:
    with one_model_at_a_time():
        return stamped(steps.regenerate(params, task, method, base, mask, prompts, tag, out))


@_step_task("baseline", files=("calibration",))
def baseline(params: Params, task: str, method: str, base: dict, calibration: str | None, out_dir: str) -> dict:
    with one_model_at_a_time():
        return stamped(steps.baseline(params, task, method, base, calibration, out_dir))


@_step_task("write_run", files=("record",))
def write_run(params: Params, task: str, method: str, base: dict, record: dict, out_dir: str) -> dict:
    with one_model_at_a_time():
        return stamped(steps.write_run(params, task, method, base, record, out_dir))


STEP_TASKS = {t.name: t for t in (calibrate, score, apply, regenerate, baseline, write_run)}


def step_caller(task_name: str, method: str, data: dict, refresh: bool):
    """The `call` that `resp.recipe.prune` runs its steps through: each step as its Prefect task.
    A cached result whose files are gone or were rewritten since is recomputed."""
    def call(step, **kwargs):
        t = STEP_TASKS[step.__name__]
        wanted = inspect.signature(t.fn).parameters
        if "data_key" in wanted:
            kwargs["data_key"] = data
        if "task" not in kwargs:  # apply takes no task/method in the library; its task run is named by them
            kwargs.update(task=task_name, method=method)
        stamp = t.with_options(refresh_cache=refresh)(**kwargs)
        if is_stale(stamp):
            get_run_logger().warning("outputs of the cached %s step are gone or changed; recomputing", step.__name__)
            stamp = t.with_options(refresh_cache=True)(**kwargs)
        return stamp["result"]
    return call


def _export_run_name() -> str:
    from prefect.runtime import task_run

    root = Path(task_run.parameters["out_root"])  # .../checkpoints/{task}/{method}/sparsity-{t}
    return f"export-{root.parent.parent.name}-{root.parent.name}-{root.name}"


@task(cache_policy=cache_policy("export", files=("mask",)), task_run_name=_export_run_name, **RESULT)
def export_mask(params: Params, mask: str, formats: list[str], out_root: str, base: dict) -> dict:
    """Write the base model pruned by `mask` in every format to `<out_root>/<format>/`."""
    from resp.checkpoints import export_mask_file
    from resp.locking import export_dir_lock
    from resp.models import load_model

    m = params.model
    identity = ModelIdentity(base["name"], base["revision"], base["content_hash"])
    written = {}
    with one_model_at_a_time():
        model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, m.device, m.trust_remote_code)
        for fmt in formats:
            with export_dir_lock(Path(out_root) / fmt):   # `resp export` into the same directory waits its turn
                written[fmt] = str(export_mask_file(model, tokenizer, identity, mask, fmt, Path(out_root) / fmt,
                                                    params.export.channel_multiple, params.prune.attention_unit,
                                                    params.prune.protected_layers))
    return stamped(written)


@task(cache_policy=cache_policy("evaluate", files=("masks", "heldout")), task_run_name="evaluate-{task}-{method}",
      **RESULT)
def evaluate_method(params: Params, task: str, method: str, masks: dict[str, str], heldout: str | None, out: str,
                    include_dense: bool, base: dict, data_key: dict) -> dict:
    """Accuracy, length, truncation and held-out NLL under every mask (and of the dense model)."""
    with one_model_at_a_time():
        return stamped(str(evaluation.evaluate_masks(params, task, method, {parse_target(t): p for t, p in masks.items()},
                                                     heldout, out, include_dense)))


@task(cache_policy=cache_policy("heal_traces"), task_run_name="traces-{task}-heal-{method}", **RESULT)
def heal_traces(params: Params, task: str, method: str, out: str, base: dict, data_key: dict) -> dict:
    """The dense model's traces on the first heal.num_prompts calibration prompts (the healing data)."""
    with one_model_at_a_time():
        return stamped(str(recipe.make_traces(params, task, params.tasks[task].calibration_split,
                                              params.methods[method].heal.num_prompts, out, base=base)))


@task(cache_policy=cache_policy("heal", files=("mask", "traces")), task_run_name="heal-{task}-{method}-{target}",
      **RESULT)
def heal_mask(params: Params, task: str, method: str, target: str, mask: str, traces: str, out: str, base: dict) -> dict:
    """The model pruned by `mask`, healed on the dense model's traces with the method's heal settings."""
    from resp.api import heal

    with one_model_at_a_time():
        return stamped(str(heal(params, task, mask, [traces], out, method=method)))


@task(cache_policy=NO_CACHE, task_run_name="register-{task}-{method}")
def register_models(params: Params, task: str, method: str, masks_dir: str, exports: dict[float, dict[str, str]],
                    metrics: str | None) -> list[dict]:
    """One registry version per mask, with lineage; idempotent for masks already registered."""
    return registry.register_method(params, task, method, masks_dir, exports, metrics)


# ---------------------------------------------------------------- flow

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
        futures = {key: t.with_options(refresh_cache=refresh).submit(**kwargs) for key, (t, kwargs) in calls.items()}
    wait(list(futures.values()))
    return {key: f.result() for key, f in futures.items()}


def _run_wave(calls: dict, refresh: bool) -> dict:
    """Submit independent task calls together; wait for all; a failure fails the flow after the others finished.
    Returns each task's result; a cached result whose files are gone or were rewritten since is recomputed.
    """
    stamps = _submit(calls, refresh)
    stale = [key for key, stamp in stamps.items() if is_stale(stamp)]
    if stale:
        get_run_logger().warning("outputs of %d cached task(s) are gone or changed (%s); recomputing them",
                                 len(stale), stale)
        stamps.update(_submit({key: calls[key] for key in stale}, refresh=True))
    return {key: stamp["result"] for key, stamp in stamps.items()}


@flow(name="resp-pipeline")
def pipeline(params_path: str, overrides: list[str] | None = None) -> dict:
    """Traces -> prune (step by step) -> export -> evaluate -> register for every task and method in `run`."""
    logger = get_run_logger()
    p = load_params(params_path, overrides)
    base = steps.base_model(p)   # once per run: hashing a local model's weights is not free
    logger.info("base model %s (%s); tasks %s; methods %s", base["name"], base["key"][:12], p.run.tasks, p.run.methods)
    layout = Layout(Path(p.flow.data_dir))
    refresh = not p.flow.cache
    keys = {t: data_key(p, t) for t in p.run.tasks}

    self_calibrated = {m for m in p.run.methods if p.methods[m].calibration == "self"}
    calls = {}
    for t in p.run.tasks:
        common = {"params": p, "task": t, "base": base, "data_key": keys[t]}
        if self_calibrated:
            calls["dense", t] = (calibration_traces, {**common, "out": str(layout.dense_traces(t))})
        if p.evaluation.nll_traces:
            calls["heldout", t] = (heldout_traces, {**common, "out": str(layout.heldout_traces(t))})
    traces = _run_wave(calls, refresh)

    masks = {}
    for t in p.run.tasks:
        for m in p.run.methods:
            written = recipe.prune(p, t, m, layout.run_dir(t, m), traces["dense", t] if m in self_calibrated else None,
                                   call=step_caller(t, m, keys[t], refresh))
            masks[t, m] = {target_key(target): str(path) for target, path in written.items()}

    # Healing (methods declaring heal: {...}): the healing traces, then every mask of the method healed.
    # The healed models are returned; their export, evaluation and registration are not part of the flow yet.
    healing = [(t, m) for (t, m) in masks if p.methods[m].heal is not None]
    heal_data = _run_wave({("heal_traces", t, m): (heal_traces, {
        "params": p, "task": t, "method": m, "base": base, "data_key": keys[t],
        "out": str(layout.heal_traces(t, p.methods[m].heal.num_prompts))}) for t, m in healing}, refresh)
    healed = _run_wave({("heal", t, m, target): (heal_mask, {
        "params": p, "task": t, "method": m, "target": target, "mask": mask, "traces": heal_data["heal_traces", t, m],
        "out": str(layout.healed(t, m, parse_target(target))), "base": base})
        for t, m in healing for target, mask in masks[t, m].items()}, refresh)

    calls = {}
    for (t, m), written in masks.items():
        for target, mask in written.items():
            calls["export", t, m, target] = (export_mask, {"params": p, "mask": mask, "formats": list(p.export.formats),
                                                           "out_root": str(layout.export_root(t, m, parse_target(target))),
                                                           "base": base})
        calls["evaluate", t, m] = (evaluate_method, {"params": p, "task": t, "method": m, "masks": written,
                                                     "heldout": traces.get(("heldout", t)),
                                                     "out": str(layout.metrics(t, m)), "include_dense": False,
                                                     "base": base, "data_key": keys[t]})
    for t in p.run.tasks:
        calls["evaluate", t, "dense"] = (evaluate_method, {"params": p, "task": t, "method": "dense", "masks": {},
                                                           "heldout": traces.get(("heldout", t)),
                                                           "out": str(layout.dense_metrics(t)), "include_dense": True,
                                                           "base": base, "data_key": keys[t]})
    done = _run_wave(calls, refresh)

    registered = []
    if p.flow.register_models:
        # one method at a time: a sqlite store takes one writer
        for (t, m), written in masks.items():
            exports = {parse_target(target): done["export", t, m, target] for target in written}
            registered += register_models(p, t, m, str(layout.masks_dir(t, m)), exports, done["evaluate", t, m])
    for v in registered:
        logger.info("%s version %s (target %s)%s", v["name"], v["version"], v["target"],
                    "" if v["created"] else " was already registered")
    return {"base_key": base["key"],
            "traces": {f"{kind}/{t}": path for (kind, t), path in traces.items()},
            "masks": {f"{t}/{m}": written for (t, m), written in masks.items()},
            "exports": {f"{k[1]}/{k[2]}/{k[3]}": v for k, v in done.items() if k[0] == "export"},
            "metrics": {f"{k[1]}/{k[2]}": v for k, v in done.items() if k[0] == "evaluate"},
            "healed": {f"{k[1]}/{k[2]}/{k[3]}": v for k, v in healed.items()},
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
