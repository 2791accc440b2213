"""The Python API: `from resp import load_params, make_traces, prune, heal, export, evaluate`.

One call per job of the workflow. Each writes files and returns where they are: a trace set, the
masks of a pruning run, an export directory, a metrics file. `resp traces`, `resp prune`, `resp heal`
and `resp evaluate` are these calls (the CLI only maps its options onto them and prints), and `resp
export` shares `resp.stages.export.export_masks` with `export`: the checks live here, made before any
model is loaded (a bad argument ends in a one-line `ValueError` naming the fix), then the library entry
points run (`resp.recipe`, `resp.stages`), so a call and its command write the same bytes.

`params` is a `Params` (from `load_params`) or the path of a params.yaml; `overrides` are the
`section.key=value` strings of `--set` and go with a path (a loaded `Params` is already final).
Importing this module does not import torch; each call imports what it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from resp.artifacts import check_replaceable_json, check_run_dir, manifest_path, masks_in_dir, parse_target
from resp.config import Params, TaskParams, check_regeneration, declared_method, load_params
from resp.outputs import check_output

ParamsArg = Params | str | os.PathLike
DENSE = "dense"   # the method label of a metrics file of the dense model alone (resp.evaluation.DENSE)
METRICS_KEYS = ("task", "method", "item_ids", "results")   # what `evaluate` writes (a replaceable metrics file)


class APIError(ValueError):
    """An argument of an API call that cannot be used."""


def _params(params: ParamsArg, overrides: list[str] | None) -> Params:
    if isinstance(params, Params):
        if overrides:
            raise APIError("overrides go with a params path: pass params='params.yaml' with them, or load once with "
                           "resp.load_params(path, overrides) and pass that")
        return params
    if isinstance(params, (str, os.PathLike)):
        return load_params(params, overrides)
    raise APIError(f"params is a {type(params).__name__}: pass a Params (resp.load_params) or the path of a params.yaml")


def _task(p: Params, task: str) -> TaskParams:
    if task not in p.tasks:
        raise APIError(f"task {task!r} is not in params.yaml tasks; defined: {sorted(p.tasks)}")
    return p.tasks[task]


def _task_items(task_params: TaskParams, split: str) -> None:
    """Read a task's items now, before any model is loaded; a hub dataset that cannot be fetched is one line."""
    from resp.tasks import load_items

    try:
        load_items(task_params, split)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets' errors (offline hub: ConnectionError, unknown dataset) name no file
        raise APIError(f"task data {task_params.source!r} (split {split!r}) cannot be loaded ({type(e).__name__}: "
                       f"{str(e).strip()[:160]}): check the source and network, or point the task's source at a "
                       "local directory") from None


def _before_loading(p: Params, outputs: list[tuple[Path, str]]) -> None:
    """The device exists and every output can be written, before minutes of model loading."""
    from resp.models import check_device

    check_device(p.model.device)
    for path, kind in outputs:
        check_output(path, kind, option="out")


def make_traces(params: ParamsArg, task: str, out: str | Path, *, split: str | None = None, limit: int | None = None,
                model: str | None = None, overrides: list[str] | None = None) -> Path:
    """Sample the model's own reasoning traces (chat template, thinking on) for `task`'s prompts.

    split: default the task's calibration split, from which `limit` (default
    calibration.num_prompts) prompts are drawn by calibration.seed: the dense calibration traces
    `prune` needs. Another split takes its first `limit` items (all when None), e.g. the task's
    eval_split with limit=evaluation.nll_traces for the held-out traces `evaluate` scores NLL on.
    model: a hub id or directory to sample from instead of model.name_or_path.
    Writes `out` (.jsonl) and its manifest `out.json`; a previous trace set there is replaced,
    any other file is refused. Returns `out`.
    """
    p = _params(params, overrides)
    t = _task(p, task)
    if limit is not None and limit < 1:
        raise APIError(f"limit {limit} is not a number of prompts: give a positive int, or None for the default")
    out = Path(out)
    _before_loading(p, [(out, "file")])
    if out.is_file() and not manifest_path(out).is_file():
        raise APIError(f"out {out} exists and is not a trace set (no {manifest_path(out).name} manifest beside it): "
                       "choose another out; a previous trace set is replaced, other files never")
    split = split or t.calibration_split
    _task_items(t, split)
    from resp.recipe import make_traces as sample

    return sample(p, task, split, limit, out, model)


def prune(params: ParamsArg, task: str, method: str, out_dir: str | Path, *, dense_traces: str | Path | None = None,
          overrides: list[str] | None = None) -> dict[float, Path]:
    """Prune the model for `task` with `method` (declared under `methods` in params.yaml).

    dense_traces: the dense model's own calibration traces from `make_traces` (needed by methods
    calibrated on `self`, e.g. resp; refused for the others, which would ignore them). A non-empty
    `out_dir` must be a run of the same task and method (it is replaced). Writes `out_dir/masks/sparsity-<t>.safetensors` (with
    manifests) at every prune.targets, plus steps/ (every step's scores and mask), traces/
    (regenerations) and summary.json. Returns {target: mask path}. (Resuming a killed run is
    the flow's: `resp run` caches every stage.)
    """
    p = _params(params, overrides)
    _task(p, task)
    chosen = declared_method(p, method, APIError)
    check_regeneration(p, method)
    if chosen.declaration.reads_dense_traces and dense_traces is None:
        raise APIError(f"method {method} calibrates on the dense model's own traces: pass "
                       f"dense_traces=resp.make_traces(params, {task!r}, OUT)")
    if dense_traces is not None and not chosen.declaration.reads_dense_traces:
        raise APIError(f"dense traces are only read by methods calibrated on the dense model's own traces; {method} "
                       f"(calibration: {chosen.declaration.calibration}) would ignore them: drop them")
    out_dir = Path(out_dir)
    _before_loading(p, [(out_dir, "dir")])
    check_run_dir(out_dir, task, method)
    from resp.recipe import prune as run

    return run(p, task, chosen, out_dir, None if dense_traces is None else str(dense_traces))


def export(params: ParamsArg, mask: str | Path, format: str, out: str | Path, *, model: str | None = None,
           revision: str | None = None, overwrite: bool = False, overrides: list[str] | None = None) -> Path:
    """Export the model pruned by one mask file (one target of `prune`) in `format`:

    masked (stock shapes, pruned units zeroed; loads anywhere), compact (smaller per-layer shapes;
    `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`) or uniform (one shape for
    all layers in the stock config). model/revision: the base model the mask was made for
    (default model.name_or_path / model.revision). Writes the directory `out`, replacing a
    previous export there; a non-empty directory that is not one is refused unless `overwrite`.
    Returns `out`.
    """
    p = _params(params, overrides)
    if isinstance(mask, dict):
        raise APIError("mask is a dict of masks: export one target at a time, e.g. mask=masks[0.3]")
    from resp.stages.export import export_masks

    _before_loading(p, [])
    return export_masks(p, [(mask, format, out)], model, revision, overwrite)[0]


def _mask_paths(masks) -> dict[float, Path]:
    """{target: path} from what `prune` returned, a masks directory, or the run directory holding masks/."""
    if isinstance(masks, dict):
        return {parse_target(t) if isinstance(t, str) else float(t): Path(p) for t, p in masks.items()}
    if isinstance(masks, (str, os.PathLike)):
        directory = Path(masks)
        return masks_in_dir(directory / "masks" if (directory / "masks").is_dir() else directory)
    raise APIError(f"masks is a {type(masks).__name__}: pass what prune returned ({{target: path}}), "
                   "a masks directory, or None for the dense model alone")


def evaluate(params: ParamsArg, task: str, masks, out: str | Path, *, method: str | None = None,
             dense: bool = False, heldout: str | Path | None = None, overwrite: bool = False,
             overrides: list[str] | None = None) -> Path:
    """Evaluate the masks of one pruning run, and with `dense=True` the unpruned model, on the
    task's eval_split: greedy and sampled accuracy (strict and flexible extraction), mean
    completion length, truncation and self-check rate, and decode-only NLL on `heldout`.

    masks: what `prune` returned ({target: path}), a masks directory or the run directory that
    holds masks/; None evaluates the dense model alone (needs dense=True; its method is "dense").
    method: labels the results; default the method recorded in the masks' manifests.
    heldout: dense traces from `make_traces(params, task, OUT, split=<the task's eval_split>,
    limit=evaluation.nll_traces)`; needed unless evaluation.nll_traces is 0.
    Writes the metrics JSON `out` that `resp report` and `resp register` read (no wall-clock
    times: a rerun writes the same bytes; an existing file that is not a metrics file is refused
    unless `overwrite`) and returns its path; the numbers are in
    `json.loads(out.read_text())["results"]`, keyed "dense" and by target ("0.30").
    """
    p = _params(params, overrides)
    _task(p, task)
    paths = {} if masks is None else _mask_paths(masks)
    if not paths and not dense:
        raise APIError("nothing to evaluate: pass masks, and/or dense=True for the unpruned model")
    out = Path(out)
    _before_loading(p, [(out, "file")])
    check_replaceable_json(out, METRICS_KEYS, "a `resp evaluate` metrics file", overwrite)
    from resp.evaluation import evaluate_masks
    from resp.lineage import check_heldout_traces, check_mask_file

    # every mask reads and is the target its name says, before the model loads
    made_by = {check_mask_file(path).get("method") for path in paths.values()} - {None}
    if not paths:
        if method not in (None, DENSE):
            raise APIError(f"method {method!r} names who made the masks: pass masks too, or no method for the dense model alone")
        method = DENSE
    elif method is None:
        if len(made_by) != 1:
            raise APIError(f"the masks' manifests name methods {sorted(made_by)}: pass method=NAME "
                           "(evaluate one method's masks at a time)")
        method = made_by.pop()
    elif made_by and made_by != {method}:
        raise APIError(f"the masks were made by {', '.join(sorted(made_by))}, not {method}: pass the method that made them")
    if paths:
        declared_method(p, method, APIError)
    if heldout is not None:
        from resp.models import model_identity

        check_heldout_traces(heldout, task, p.tasks[task].eval_split, p.evaluation.nll_traces,
                             model_identity(p.model.name_or_path, p.model.revision).key)
    return evaluate_masks(p, task, method, paths, heldout, out, include_dense=dense)


def heal(params: ParamsArg, task: str, mask: str | Path, traces, out: str | Path, *, method: str | None = None,
         overrides: list[str] | None = None) -> Path:
    """Heal the model pruned by one mask file on the dense model's own traces (`resp.healing`).

    traces: one or more trace files of `task`'s calibration split made by the dense model
    (`make_traces(params, task, OUT, limit=<heal.num_prompts>)`). method: whose `heal: {...}`
    settings run (default: the method that made the mask); it must declare them. Writes the
    directory `out`: the healed model (stock shapes, pruned units zero), `resp_heal.json`, and
    `mask/sparsity-<t>.safetensors`, the mask made for the healed model, which `export(params,
    that mask, format, OUT, model=out)` and `evaluate` (with model.name_or_path=out) read as any
    other. A previous healed model at `out` is replaced, anything else refused. Returns `out`.
    """
    p = _params(params, overrides)
    _task(p, task)
    if isinstance(mask, dict):
        raise APIError("mask is a dict of masks: heal one target at a time, e.g. mask=masks[0.5]")
    from resp.lineage import read_mask

    _, meta = read_mask(mask)
    method = method or meta.get("method")
    chosen = declared_method(p, method, APIError)
    if chosen.declaration.heal is None:
        healing = [m for m, d in p.methods.items() if d.heal is not None]
        raise APIError(f"method {method!r} declares no heal settings: pass method= one that does ({', '.join(healing) or 'none'}) "
                       f"or add heal: {{...}} under methods.{method} in params.yaml")
    trace_paths = [traces] if isinstance(traces, (str, os.PathLike)) else list(traces)
    out = Path(out)
    _before_loading(p, [(out, "dir")])
    from resp.stages.heal import heal as run

    return Path(run(p, task, chosen, mask, trace_paths, out))
