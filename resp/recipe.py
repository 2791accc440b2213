"""The library's entry points, reading like method.md: traces -> (score -> apply -> regenerate?)* -> save.

`make_traces` (from `resp.stages.traces`) samples a trace set from a model (the dense calibration
traces, held-out traces for NLL). `prune` runs one method (RESP, its ablations, or a baseline) on one
task: it composes the stages of `resp.stages` and writes the masks at every target sparsity with
manifests that say what produced them. The API, the CLI, DVC stages and the Prefect flow all call
these functions; nothing else runs the method.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from resp.artifacts import parse_target, read_manifest, target_key, write_json
from resp.config import Method, Params
from resp.distributed import check_launch
from resp.lineage import check_dense_traces
from resp.locking import run_dir_lock
from resp.schedule import PruneState, ScheduleConfig, iterative_prune, trace_record
from resp.stages.apply import apply
from resp.stages.baseline import baseline
from resp.stages.calibrate import calibrate
from resp.stages.common import base_model, loaded_model
from resp.stages.regenerate import regenerate
from resp.stages.score import score
from resp.stages.traces import make_traces
from resp.stages.write_run import write_run

__all__ = ["make_traces", "prune", "RecipeError"]

log = logging.getLogger(__name__)


class RecipeError(ValueError):
    pass


def direct(stage, **kwargs):
    """Run a stage in this process (the API, the CLI and DVC stages); the flow runs each as a Prefect task."""
    return stage(**kwargs)


def prune(params: Params, task: str, method: Method, out_dir: str | Path,
          dense_traces: str | None = None, call=direct) -> dict[float, Path]:
    """Run `method` (from `resp.config.declared_method`) on `task` and write
    `<out_dir>/masks/sparsity-<t>.safetensors` for every target.

    Composes the stages of `resp.stages`, each run through `call(stage function, **kwargs)`. The dense
    traces must be this task's, made by this model; one writer per run directory."""
    reads_dense_traces = method.declaration.reads_dense_traces
    if reads_dense_traces and dense_traces is None:
        raise RecipeError("this method calibrates on the dense model's own traces: pass --traces (made by `resp traces`)")
    if method.declaration.scorer == "taylor":
        check_launch(params)   # the scoring workers scale.score_nproc asks for, before any trace is made
    base = base_model(params)
    if dense_traces is not None and reads_dense_traces:
        check_dense_traces(dense_traces, task, params.tasks[task].calibration_split, params.calibration.num_prompts,
                           base["key"])
    with run_dir_lock(out_dir):
        return _run_stages(params, task, method, Path(out_dir), dense_traces, base, call)


class RunStages:
    """The `schedule.Stages` of one pruning run: each stage through `call`, its output under `out_dir`."""

    def __init__(self, call, params: Params, task: str, method: Method, base: dict, out_dir: Path, reference: str):
        self.call, self.out_dir, self.reference = call, out_dir, reference
        self.common = {"params": params, "base": base}
        self.run = {**self.common, "task": task, "method": method}

    def score(self, mask, traces, name, part):
        path = self.call(score, **self.run, mask=mask, traces=traces, reference=self.reference,
                         out=str(self.out_dir / "steps" / f"{name}.safetensors"), part=part)
        return path, read_manifest(path)["mean_loss"]

    def apply(self, scores, mask, sparsity, name):
        return self.call(apply, **self.common, scores=scores, mask=mask, sparsity=sparsity,
                         out=str(self.out_dir / "steps" / f"{name}.safetensors"))

    def regenerate(self, mask, tag):
        return self.call(regenerate, **self.run, mask=mask, prompts=self.reference, tag=tag,
                         out=str(self.out_dir / "traces" / f"{tag}.jsonl"))


def write_wall_seconds(out_dir: Path, seconds: dict[str, float], total: float) -> Path:
    """Wall seconds by stage, next to the run directory (`<run>.wall.json`, git-ignored): they vary
    between reruns, so they stay out of the run directory, whose bytes a rerun must reproduce."""
    return write_json(Path(f"{out_dir}.wall.json"), {"run": str(out_dir), "total": total, "by_step": seconds})


def timed(call, seconds: dict):
    """`call`, adding each stage's wall seconds to `seconds[stage name]`."""
    def run(stage, **kwargs):
        start = time.perf_counter()
        try:
            return call(stage, **kwargs)
        finally:
            seconds[stage.__name__] = seconds.get(stage.__name__, 0.0) + time.perf_counter() - start
    return run


def _run_stages(params: Params, task: str, method: Method, out_dir: Path, dense_traces: str | None, base: dict,
                call) -> dict[float, Path]:
    declared, p = method.declaration, params.prune
    run = {"params": params, "task": task, "method": method, "base": base}
    start = time.time()
    call = timed(call, seconds := {})
    calibration = call(calibrate, **run, dense_traces=str(dense_traces) if dense_traces else None,
                       out=str(out_dir / "traces" / "calibration.jsonl"))
    history = []
    if calibration is not None:
        history = [trace_record(calibration, at_step=0, tag="initial" if declared.scorer == "taylor" else "calibration")]
    if declared.scorer != "taylor":
        saved = call(baseline, **run, calibration=calibration, out_dir=str(out_dir))
        record = {"saved": saved, "trace_sets": history, "used_by": {k: len(history) for k in saved}, "steps": [],
                  "spent": []}
    else:
        cfg = ScheduleConfig(p.targets, p.steps, p.milestones if declared.regenerate == "milestones" else [],
                             declared.verify_select, p.drift_threshold if declared.regenerate == "drift" else None,
                             p.score_every)
        stages = RunStages(call, params, task, method, base, out_dir, calibration)
        s = loaded_model(params, base).masked.s
        initial = PruneState(0, None, calibration, trace_history=history)
        state = iterative_prune(s, cfg, initial, stages, regenerate=declared.regenerate != "none")
        record = {"saved": {target_key(t): path for t, path in state.saved.items()}, "trace_sets": state.trace_history,
                  "used_by": {target_key(t): n for t, n in state.saved_after.items()}, "steps": state.log,
                  "spent": state.spent}
    written = call(write_run, **run, record=record, out_dir=str(out_dir))
    wall = write_wall_seconds(out_dir, seconds, time.time() - start)
    log.info("%s %s: pruned in %.1f s (%s); masks and summary in %s, wall seconds by stage in %s", method.name, task,
             time.time() - start, ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), out_dir, wall)
    return {parse_target(k): Path(v) for k, v in written.items()}
