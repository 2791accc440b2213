"""The RESP workflow as a Prefect flow (method steps 1-10, then registration).

    trace sets (dense calibration, held-out) -> prune per (task, method): Taylor scores, mask
    steps and regenerations, inside `resp.recipe.prune` -> export per mask -> evaluate per
    method -> register in MLflow

Tasks are thin wrappers over `resp` entry points and exchange paths, never live models. A
task's cache key is its inputs, the params sections it reads, the content digests of the files
it reads (upstream outputs; the base model and task data enter as digests computed once per
run), its own source, and the source of the `resp` package. Results persist under
`flow.results_dir`: a second run, or a run started again after a crash, takes every finished
task from the cache, and a changed input reruns only what depends on it. (`resp.recipe.prune`
also checkpoints after every pruning step, so a method killed halfway resumes mid-schedule.)
Registration is never cached: the registry itself returns the existing version of a mask that
is already registered.

Independent tasks (trace sets of different tasks, methods, exports, evaluations) are submitted
together to the task runner. Within one process they take turns at building models (see
one_model_at_a_time); a Dask cluster of worker processes (`flow.task_runner: dask`) runs them
in parallel.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.client.orchestration import get_client
from prefect.futures import wait
from prefect.settings import (PREFECT_API_URL, PREFECT_LOGGING_EXTRA_LOGGERS, PREFECT_RESULTS_LOCAL_STORAGE_PATH,
                              temporary_settings)
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.hashing import hash_objects

import resp
from flows.layout import Layout
from resp import evaluate, recipe, registry
from resp.config import FlowParams, Params, load_params
from resp.models import model_identity
from resp.traces import file_digest

LIBRARY = Path(resp.__file__).resolve().parent


# Results are paths and plain data: stored as JSON, never pickles (a pickle in .prefect/results would
# run code when a later run reads the cache).
RESULTS = "json"


class FlowError(ValueError):
    pass


# ---------------------------------------------------------------- cache keys

def content_digest(value):
    """sha256 of what a path argument points at (a file and its `.json` manifest, or a directory),
    recursing through dicts and lists; other values pass through."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): content_digest(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [content_digest(v) for v in value]
    path = Path(value)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(file_digest(f).encode())
        return h.hexdigest()
    if path.is_file():
        manifest = path.with_name(path.name + ".json")
        return [file_digest(path), file_digest(manifest) if manifest.is_file() else None]
    return f"missing:{value}"


def library_digest() -> str:
    """sha256 of the `resp` package's Python sources: a library change invalidates cached results."""
    h = hashlib.sha256()
    for f in sorted(LIBRARY.rglob("*.py")):
        h.update(f.relative_to(LIBRARY).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@dataclass
class ReadsFiles(CachePolicy):
    """Cache key part for what a task reads: the params `sections` it uses (dotted, `{name}` is
    filled from the task's inputs), the content of the files its `files` parameters name, and
    the `resp` sources."""

    sections: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        tree = inputs["params"].model_dump(mode="json")
        used = {}
        for dotted in self.sections:
            node = tree
            for key in dotted.format(**inputs).split("."):
                node = node[key]
            used[dotted] = node
        return hash_objects({"params": used, "files": {name: content_digest(inputs[name]) for name in self.files},
                             "library": library_digest()}, raise_on_failure=True)


def cache_policy(sections: tuple[str, ...], files: tuple[str, ...] = ()) -> CachePolicy:
    # `params` is keyed by the sections the task reads, so an unrelated knob keeps the cache.
    return (INPUTS - "params") + TASK_SOURCE + ReadsFiles(sections=sections, files=files)


def data_key(params: Params, task_name: str) -> dict:
    """Digests of the task's data and of the generic-text task (baseline calibration)."""
    out = {}
    for name in (task_name, params.prose_task):
        t = params.tasks[name]
        out[name] = content_digest(t.source) if Path(t.source).exists() else f"hub:{t.source}:{t.subset}"
    return out


# ---------------------------------------------------------------- tasks
# `model_key` (the base model's hub revision or content hash) and `data_key` are not used in
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

@task(cache_policy=cache_policy(("model", "tasks.{task}", "calibration", "generation")), persist_result=True,
      result_serializer=RESULTS, task_run_name="traces-{task}-{split}")
def generate_traces(params: Params, task: str, split: str, limit: int | None, out: str, model_key: str,
                    data_key: dict) -> str:
    """Sample the dense model's own reasoning traces (calibration or held-out prompts)."""
    with one_model_at_a_time():
        return str(recipe.make_traces(params, task, split, limit, out))


@task(cache_policy=cache_policy(("model", "tasks", "prose_task", "calibration", "generation", "importance", "prune"),
                                files=("dense_traces",)), persist_result=True, result_serializer=RESULTS,
      task_run_name="prune-{task}-{method}")
def prune_method(params: Params, task: str, method: str, out_dir: str, dense_traces: str | None, model_key: str,
                 data_key: dict) -> dict[str, str]:
    """Gradient scoring, mask steps and regenerations of one method: masks by target ("0.20")."""
    with one_model_at_a_time():
        written = recipe.prune(params, task, method, out_dir, dense_traces)
    return {f"{target:.2f}": str(path) for target, path in written.items()}


def _export_run_name() -> str:
    from prefect.runtime import task_run

    root = Path(task_run.parameters["out_root"])  # .../checkpoints/{task}/{method}/sparsity-{t}
    return f"export-{root.parent.parent.name}-{root.parent.name}-{root.name}"


@task(cache_policy=cache_policy(("model", "prune", "export"), files=("mask",)), persist_result=True,
      result_serializer=RESULTS, task_run_name=_export_run_name)
def export_mask(params: Params, mask: str, formats: list[str], out_root: str, model_key: str) -> dict[str, str]:
    """Write the base model pruned by `mask` in every format to `<out_root>/<format>/`."""
    from resp.export import export_mask_file
    from resp.models import load_model

    m = params.model
    identity = model_identity(m.name_or_path, m.revision)
    written = {}
    with one_model_at_a_time():
        model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, m.device, m.trust_remote_code)
        for fmt in formats:
            written[fmt] = str(export_mask_file(model, tokenizer, identity, mask, fmt, Path(out_root) / fmt,
                                                params.export.channel_multiple, params.prune.attention_unit,
                                                params.prune.protected_layers))
    return written


@task(cache_policy=cache_policy(("model", "tasks.{task}", "evaluation", "prune"), files=("masks", "heldout")),
      persist_result=True, result_serializer=RESULTS, task_run_name="evaluate-{task}-{method}")
def evaluate_method(params: Params, task: str, method: str, masks: dict[str, str], heldout: str | None, out: str,
                    include_dense: bool, model_key: str, data_key: dict) -> str:
    """Accuracy, length, truncation and held-out NLL under every mask (and of the dense model)."""
    with one_model_at_a_time():
        return str(evaluate.evaluate_masks(params, task, method, {float(t): p for t, p in masks.items()}, heldout,
                                           out, include_dense))


@task(cache_policy=NO_CACHE, task_run_name="register-{task}-{method}")
def register_models(params: Params, task: str, method: str, masks_dir: str, exports: dict[float, dict[str, str]],
                    metrics: str | None) -> list[dict]:
    """One registry version per mask, with lineage; idempotent for masks already registered."""
    return registry.register_method(params, task, method, masks_dir, exports, metrics)


# ---------------------------------------------------------------- flow

def _outputs_exist(result) -> bool:
    if isinstance(result, dict):
        return all(_outputs_exist(v) for v in result.values())
    return Path(result).exists()


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

    A cached result whose files have been deleted since is recomputed.
    """
    results = _submit(calls, refresh)
    stale = [key for key, result in results.items() if not _outputs_exist(result)]
    if stale:
        get_run_logger().warning("outputs of %d cached task(s) are gone (%s); recomputing them", len(stale), stale)
        results.update(_submit({key: calls[key] for key in stale}, refresh=True))
    return results


@flow(name="resp-pipeline")
def pipeline(params_path: str, overrides: list[str] | None = None) -> dict:
    """Traces -> prune -> export -> evaluate -> register for every task and method in `run`."""
    logger = get_run_logger()
    p = load_params(params_path, overrides)
    identity = model_identity(p.model.name_or_path, p.model.revision)
    logger.info("base model %s (%s); tasks %s; methods %s", identity.name, identity.key[:12], p.run.tasks, p.run.methods)
    layout = Layout(Path(p.flow.data_dir))
    refresh = not p.flow.cache
    common = {"params": p, "model_key": identity.key}
    keys = {t: data_key(p, t) for t in p.run.tasks}

    self_calibrated = {m for m in p.run.methods if p.methods[m].calibration == "self"}
    calls = {}
    for t in p.run.tasks:
        tp = p.tasks[t]
        if self_calibrated:
            calls["dense", t] = (generate_traces, {**common, "task": t, "split": tp.calibration_split, "limit": None,
                                                   "out": str(layout.dense_traces(t)), "data_key": keys[t]})
        if p.evaluation.nll_traces:
            calls["heldout", t] = (generate_traces, {**common, "task": t, "split": tp.eval_split,
                                                     "limit": p.evaluation.nll_traces,
                                                     "out": str(layout.heldout_traces(t)), "data_key": keys[t]})
    traces = _run_wave(calls, refresh)

    calls = {(t, m): (prune_method, {**common, "task": t, "method": m, "out_dir": str(layout.run_dir(t, m)),
                                     "dense_traces": traces["dense", t] if m in self_calibrated else None,
                                     "data_key": keys[t]})
             for t in p.run.tasks for m in p.run.methods}
    masks = _run_wave(calls, refresh)

    calls = {}
    for (t, m), written in masks.items():
        for target, mask in written.items():
            calls["export", t, m, target] = (export_mask, {**common, "mask": mask, "formats": list(p.export.formats),
                                                           "out_root": str(layout.export_root(t, m, float(target)))})
        calls["evaluate", t, m] = (evaluate_method, {**common, "task": t, "method": m, "masks": written,
                                                     "heldout": traces.get(("heldout", t)),
                                                     "out": str(layout.metrics(t, m)), "include_dense": False,
                                                     "data_key": keys[t]})
    for t in p.run.tasks:
        calls["evaluate", t, "dense"] = (evaluate_method, {**common, "task": t, "method": "dense", "masks": {},
                                                           "heldout": traces.get(("heldout", t)),
                                                           "out": str(layout.dense_metrics(t)), "include_dense": True,
                                                           "data_key": keys[t]})
    done = _run_wave(calls, refresh)

    registered = []
    if p.flow.register_models:
        # one method at a time: a sqlite store takes one writer
        for (t, m), written in masks.items():
            exports = {float(target): done["export", t, m, target] for target in written}
            registered += register_models(p, t, m, str(layout.masks_dir(t, m)), exports, done["evaluate", t, m])
    for v in registered:
        logger.info("%s version %s (target %s)%s", v["name"], v["version"], v["target"],
                    "" if v["created"] else " was already registered")
    return {"base_key": identity.key,
            "traces": {f"{kind}/{t}": path for (kind, t), path in traces.items()},
            "masks": {f"{t}/{m}": written for (t, m), written in masks.items()},
            "exports": {f"{k[1]}/{k[2]}/{k[3]}": v for k, v in done.items() if k[0] == "export"},
            "metrics": {f"{k[1]}/{k[2]}": v for k, v in done.items() if k[0] == "evaluate"},
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


def run_pipeline(params_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Run the pipeline flow from a params file (what `resp run` does)."""
    p = load_params(params_path, overrides)
    with flow_settings(p.flow):
        return pipeline.with_options(task_runner=task_runner(p.flow))(str(params_path), list(overrides or []))
