"""The one entry point per job, reading like method.md: traces -> score -> step -> regenerate -> save.

`make_traces` samples a trace set from a model (the dense calibration traces, held-out traces
for NLL). `prune` runs one method (RESP, its ablations, or a baseline) on one task and writes
the masks at every target sparsity with manifests that say what produced them. The CLI, DVC
stages and Prefect tasks all call these functions; nothing else runs the method.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from resp.config import Params, declared_method
from resp.generation import SamplingSpec
from resp.lineage import check_dense_traces
from resp.locking import run_dir_lock
from resp import steps
from resp.artifacts import parse_target, read_manifest, target_key, write_json
from resp.masks import Mask
from resp.models import load_model, model_identity
from resp.schedule import PruneState, ScheduleConfig, iterative_prune, trace_record
from resp.tasks import calibration_items, load_items
from resp.traces import TraceSet, check_usable, gold_traces, select_challenging, self_generated_traces, text_traces

log = logging.getLogger(__name__)


class RecipeError(ValueError):
    pass


def sampling_spec(params: Params) -> SamplingSpec:
    g = params.generation
    return SamplingSpec(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_new_tokens=g.max_new_tokens)


def make_traces(params: Params, task: str, split: str, limit: int | None, out: str | Path,
                model_dir: str | None = None, base: dict | None = None) -> Path:
    """Sample one completion per prompt from the (dense) model; calibration prompts when split is
    the task's calibration split (seeded selection), else the first `limit` items of `split`.
    `base`: the model's identity when the caller already resolved it (`steps.base_model`)."""
    t = params.tasks[task]
    model_path = model_dir or params.model.name_or_path
    if model_dir is None:
        base = base or steps.base_model(params)
        loaded = steps.loaded_model(params, base)
        loaded.masked.set(Mask.dense(loaded.masked.s))
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model, tokenizer = load_model(model_path, params.model.revision, params.model.dtype, params.model.device)
        identity = model_identity(model_path, params.model.revision)
        base = {**identity.to_dict(), "key": identity.key}
    if split == t.calibration_split:
        items = calibration_items(t, limit or params.calibration.num_prompts, params.calibration.seed)
    else:
        items = load_items(t, split)[:limit]
    manifest = {"model": base, "mask_digest": None, "task": task,
                "split": split, "prompt_ids": [i.id for i in items],
                "code": steps.code_record("calibration_traces" if split == t.calibration_split else "heldout_traces")}
    start = time.time()
    traces = self_generated_traces(model, tokenizer, items, t.format, sampling_spec(params),
                                   params.generation.batch_size, params.generation.seed, manifest,
                                   desc=f"traces {task}/{split}", backend=params.generation.backend,
                                   model_dir=model_path, gpu_memory_utilization=params.scale.vllm_gpu_memory_utilization)
    check_usable(traces, f"traces for {task}/{split}")
    digest = traces.save(out)
    st = traces.stats()
    log.info("wrote %d traces to %s in %.1fs (mean %.1f tokens, truncation %.3f, accuracy %s, digest %s)",
             st["n"], out, time.time() - start, st["mean_completion_tokens"], st["truncation_rate"],
             st["answer_accuracy"], digest[:12])
    return Path(out)


def selected_self_traces(params: Params, task: str, model, tokenizer, base: dict) -> TraceSet:
    """calibration: self_selected: sample `select_candidates` calibration prompts `select_samples`
    times each from the dense model and keep `num_prompts` challenging, moderately long traces."""
    c, t = params.calibration, params.tasks[task]
    candidates = calibration_items(t, c.select_candidates, c.seed)
    repeated = [item for item in candidates for _ in range(c.select_samples)]
    sampled = self_generated_traces(model, tokenizer, repeated, t.format, sampling_spec(params),
                                    params.generation.batch_size, params.generation.seed,
                                    {**base, "mask_digest": None,
                                     "prompt_ids": [i.id for i in repeated]}, desc=f"candidates {task}",
                                    backend=params.generation.backend, model_dir=params.model.name_or_path,
                                    gpu_memory_utilization=params.scale.vllm_gpu_memory_utilization)
    chosen = select_challenging(sampled, c.select_samples, c.num_prompts, c.select_length_quantiles)
    chosen.manifest["prompt_ids"] = [tr.prompt_id for tr in chosen.traces]
    log.info("selected %d of %d candidate prompts (length range %s, mean difficulty %.3f)", len(chosen.traces),
             len(candidates), chosen.manifest["selection"]["length_range"],
             sum(chosen.manifest["selection"]["difficulty"]) / len(chosen.traces))
    return chosen


def calibration_traces(params: Params, task: str, source: str, model, tokenizer, dense_traces: str | None,
                       base: dict) -> tuple[TraceSet | None, str]:
    """The calibration a method declares: (traces, path of the dense traces or "" when built here).

    self: the dense model's own traces (`resp traces`); self_selected: challenging, moderately
    long traces of the dense model, sampled here; gold: the task's human-written solutions
    after the same 0-shot prompt; generic: prose_task text (full-sequence loss); none: nothing."""
    if source == "none":
        return None, ""
    if source == "self_selected":
        return selected_self_traces(params, task, model, tokenizer, base), ""
    if source == "self":
        if dense_traces is None:
            raise RecipeError("this method calibrates on the dense model's own traces: pass --traces (made by `resp traces`)")
        return TraceSet.load(dense_traces), str(dense_traces)
    if source == "gold":
        items = calibration_items(params.tasks[task], params.calibration.num_prompts, params.calibration.seed)
        return gold_traces(tokenizer, items, {**base, "prompt_ids": [i.id for i in items]}), ""
    items = calibration_items(params.tasks[params.prose_task], params.calibration.num_prompts, params.calibration.seed)
    return text_traces(tokenizer, items, {**base, "prompt_ids": [i.id for i in items]}), ""


def direct(step, **kwargs):
    """Run a step in this process (the CLI and DVC stages); the flow runs each as a Prefect task."""
    return step(**kwargs)


def prune(params: Params, task: str, method: str, out_dir: str | Path,
          dense_traces: str | None = None, call=direct) -> dict[float, Path]:
    """Run `method` on `task` and write `<out_dir>/masks/sparsity-<t>.safetensors` for every target.

    Composes the steps of `resp.steps`, each run through `call(step, **kwargs)`. The dense traces
    must be this task's, made by this model; one writer per run directory."""
    declared_method(params, method, RecipeError)
    base = steps.base_model(params)
    check_dense_traces(params, task, method, dense_traces, base["key"])
    with run_dir_lock(out_dir):
        return _prune(params, task, method, Path(out_dir), dense_traces, base, call)


class RunSteps:
    """The `schedule.Steps` of one pruning run: each step through `call`, its output under `out_dir`."""

    def __init__(self, call, params: Params, task: str, method: str, base: dict, out_dir: Path, reference: str):
        self.call, self.out_dir, self.reference = call, out_dir, reference
        self.common = {"params": params, "base": base}
        self.run = {**self.common, "task": task, "method": method}

    def score(self, mask, traces, name, part):
        path = self.call(steps.score, **self.run, mask=mask, traces=traces, reference=self.reference,
                         out=str(self.out_dir / "steps" / f"{name}.safetensors"), part=part)
        return path, read_manifest(path)["mean_loss"]

    def apply(self, scores, mask, sparsity, name):
        return self.call(steps.apply, **self.common, scores=scores, mask=mask, sparsity=sparsity,
                         out=str(self.out_dir / "steps" / f"{name}.safetensors"))

    def regenerate(self, mask, tag):
        return self.call(steps.regenerate, **self.run, mask=mask, prompts=self.reference, tag=tag,
                         out=str(self.out_dir / "traces" / f"{tag}.jsonl"))


def write_wall_seconds(out_dir: Path, seconds: dict[str, float], total: float) -> Path:
    """Wall seconds by step kind, next to the run directory (`<run>.wall.json`, git-ignored): they vary
    between reruns, so they stay out of the run directory, whose bytes a rerun must reproduce."""
    return write_json(Path(f"{out_dir}.wall.json"), {"run": str(out_dir), "total": total, "by_step": seconds})


def timed(call, seconds: dict):
    """`call`, adding each step's wall seconds to `seconds[step name]`."""
    def run(step, **kwargs):
        start = time.perf_counter()
        try:
            return call(step, **kwargs)
        finally:
            seconds[step.__name__] = seconds.get(step.__name__, 0.0) + time.perf_counter() - start
    return run


def _prune(params: Params, task: str, method: str, out_dir: Path, dense_traces: str | None, base: dict,
           call) -> dict[float, Path]:
    declared, p = params.methods[method], params.prune
    run = {"params": params, "task": task, "method": method, "base": base}
    start = time.time()
    call = timed(call, seconds := {})
    calibration = call(steps.calibrate, **run, dense_traces=str(dense_traces) if dense_traces else None,
                       out=str(out_dir / "traces" / "calibration.jsonl"))
    history = []
    if calibration is not None:
        history = [trace_record(calibration, at_step=0, tag="initial" if declared.scorer == "taylor" else "calibration")]
    if declared.scorer != "taylor":
        saved = call(steps.baseline, **run, calibration=calibration, out_dir=str(out_dir))
        record = {"saved": saved, "trace_sets": history, "used_by": {k: len(history) for k in saved}, "steps": [],
                  "spent": []}
    else:
        cfg = ScheduleConfig(p.targets, p.steps, p.milestones if declared.regenerate == "milestones" else [],
                             declared.verify_select, p.drift_threshold if declared.regenerate == "drift" else None,
                             p.score_every)
        s = steps.loaded_model(params, base).masked.s
        initial = PruneState(0, None, calibration, trace_history=history)
        state = iterative_prune(s, cfg, initial, RunSteps(call, params, task, method, base, out_dir, calibration),
                                regenerate=declared.regenerate != "none")
        record = {"saved": {target_key(t): path for t, path in state.saved.items()}, "trace_sets": state.trace_history,
                  "used_by": {target_key(t): n for t, n in state.saved_after.items()}, "steps": state.log,
                  "spent": state.spent}
    written = call(steps.write_run, **run, record=record, out_dir=str(out_dir))
    wall = write_wall_seconds(out_dir, seconds, time.time() - start)
    log.info("%s %s: pruned in %.1f s (%s); masks and summary in %s, wall seconds by step in %s", method, task,
             time.time() - start, ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), out_dir, wall)
    return {parse_target(k): Path(v) for k, v in written.items()}
