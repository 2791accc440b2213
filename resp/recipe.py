"""The one entry point per job, reading like method.md: traces -> score -> step -> regenerate -> save.

`make_traces` samples a trace set from a model (the dense calibration traces, held-out traces
for NLL). `prune` runs one method (RESP, its ablations, or a baseline) on one task and writes
the masks at every target sparsity with manifests that say what produced them. The CLI, DVC
stages and Prefect tasks all call these functions; nothing else runs the method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path

from resp.config import Params
from resp.generation import SamplingSpec
from resp.importance import taylor_scores
from resp.lineage import check_dense_traces
from resp.locking import run_dir_lock
from resp.masks import Mask
from resp.models import load_model, model_identity
from resp.schedule import Checkpointer, MaskedModel, PruneState, ScheduleConfig, iterative_prune
from resp.structures import structures_for
from resp.tasks import calibration_items, load_items
from resp.traces import (TraceSet, check_usable, decode_only_batches, filter_traces, gold_traces,
                         select_challenging, self_generated_traces, text_traces)

log = logging.getLogger(__name__)


class RecipeError(ValueError):
    pass


def code_version() -> dict:
    """The git commit of the code and whether its code files (resp/, flows/) had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        # only code counts: `dvc repro` itself rewrites dvc.lock and data/ while it runs
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "resp", "flows",
                                     "pyproject.toml"], cwd=root, capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def params_hash(params: Params, task: str) -> str:
    """Digest of every params section that shapes a pruning run of `task`."""
    used = {"model": params.model.model_dump(), "task": params.tasks[task].model_dump(),
            "methods": {k: v.model_dump() for k, v in params.methods.items()}, "baselines": params.baselines.model_dump(),
            "calibration": params.calibration.model_dump(), "generation": params.generation.model_dump(),
            "importance": params.importance.model_dump(), "prune": params.prune.model_dump(),
            "prose": params.tasks[params.prose_task].model_dump()}
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()


def sampling_spec(params: Params) -> SamplingSpec:
    g = params.generation
    return SamplingSpec(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_new_tokens=g.max_new_tokens)


def make_traces(params: Params, task: str, split: str, limit: int | None, out: str | Path,
                model_dir: str | None = None) -> Path:
    """Sample one completion per prompt from the (dense) model; calibration prompts when split is
    the task's calibration split (seeded selection), else the first `limit` items of `split`."""
    t = params.tasks[task]
    model_path = model_dir or params.model.name_or_path
    model, tokenizer = load_model(model_path, params.model.revision, params.model.dtype, params.model.device)
    identity = model_identity(model_path, params.model.revision)
    if split == t.calibration_split:
        items = calibration_items(t, limit or params.calibration.num_prompts, params.calibration.seed)
    else:
        items = load_items(t, split)[:limit]
    manifest = {"model": {**identity.to_dict(), "key": identity.key}, "mask_digest": None, "task": task,
                "split": split, "prompt_ids": [i.id for i in items], "code": code_version()}
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


def method_label(method: str, scorer: str, mask: Mask) -> str:
    """The name a results table shows: FLAP without its bias compensation says so."""
    return f"{method} (no bias)" if scorer == "flap" and not mask.biases else method


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


def prune(params: Params, task: str, method: str, out_dir: str | Path,
          dense_traces: str | None = None) -> dict[float, Path]:
    """Run `method` on `task` and write `<out_dir>/masks/sparsity-<t>.safetensors` for every target.

    The dense traces must be this task's, made by this model; one writer per run directory."""
    check_dense_traces(params, task, method, dense_traces)
    with run_dir_lock(out_dir):
        return _prune(params, task, method, out_dir, dense_traces)


def _prune(params: Params, task: str, method: str, out_dir: str | Path,
           dense_traces: str | None = None) -> dict[float, Path]:
    if method not in params.methods:
        raise RecipeError(f"method {method!r} is not declared; declare it under `methods` in params.yaml "
                          f"(declared: {', '.join(params.methods)})")
    declared = params.methods[method]
    out_dir = Path(out_dir)
    p = params.prune
    model, tokenizer = load_model(params.model.name_or_path, params.model.revision, params.model.dtype, params.model.device)
    identity = model_identity(params.model.name_or_path, params.model.revision)
    s = structures_for(model, p.attention_unit, p.protected_layers)
    t = params.tasks[task]
    base = {"model": {**identity.to_dict(), "key": identity.key}, "task": task, "method": method,
            "declaration": declared.model_dump(), "params_hash": params_hash(params, task), "code": code_version()}
    traces, traces_path = calibration_traces(params, task, declared.calibration, model, tokenizer, dense_traces, base)
    history: list[dict] = []
    if traces is not None:
        if not traces_path:
            traces_path = str(out_dir / "traces" / "calibration.jsonl")
            traces.save(traces_path)
        check_usable(traces, f"{method} calibration traces")
        history = [{"path": traces_path, "digest": traces.manifest["digest"], "at_step": 0,
                    "tag": "initial" if declared.scorer == "taylor" else "calibration", **traces.stats()}]
    start = time.time()

    if declared.scorer != "taylor":
        from resp.baselines import baseline_masks, has_output_bias

        batches = None
        if traces is not None:
            batches = list(decode_only_batches(traces.traces, params.importance.batch_size, tokenizer.pad_token_id))
        b = params.baselines
        masks = baseline_masks(declared.scorer, model, s, p.targets, batches, p.seed, params.importance.normalize,
                               b.owl_outlier_m, b.owl_lambda)
        if declared.scorer == "flap" and not has_output_bias(s):
            log.info("flap: the model has no o_proj/down_proj bias, so FLAP's bias compensation has nowhere to go: "
                     "reported as flap (no bias)")
        used_by = {t: history for t in p.targets}
        run_log: list[dict] = []
    else:
        dense_answers = {tr.prompt_id: tr.answer for tr in traces.traces}
        keep_rule = declared.trace_filter
        masked = MaskedModel(model, s, keep_dense=declared.verify_select)
        imp = params.importance

        def score(mask: Mask, current: TraceSet):
            masked.set(mask)
            used = filter_traces(current, keep_rule, dense_answers)
            return taylor_scores(model, used.traces, s, imp.batch_size, tokenizer.pad_token_id,
                                 imp.per_sample_abs, imp.grads_only_scored, imp.grad_checkpointing,
                                 desc=f"{method} scores")

        items = []
        if declared.regenerate != "none":   # only self traces regenerate: their prompts are this task's
            # re-ask the prompts the calibration traces answer (the selected ones for self_selected)
            by_id = {i.id: i for i in load_items(t, t.calibration_split)}
            items = [by_id[tr.prompt_id] for tr in traces.traces]

        def regenerate(mask: Mask, tag: str):
            masked.set(mask)
            model_dir = None
            if params.generation.backend == "vllm":  # vLLM loads the pruned model from a masked export
                from resp.export import export_model

                model_dir = str(export_model(model, tokenizer, mask, s, "masked", out_dir / "masked" / tag,
                                             params.export.channel_multiple))
            new = self_generated_traces(model, tokenizer, items, t.format, sampling_spec(params),
                                        params.generation.batch_size, params.generation.seed,
                                        {**base, "mask_digest": mask.digest(), "prompt_ids": [i.id for i in items],
                                         "regeneration": tag}, desc=f"regenerate {tag}",
                                        backend=params.generation.backend, model_dir=model_dir,
                                        gpu_memory_utilization=params.scale.vllm_gpu_memory_utilization)
            check_usable(new, f"regenerated traces ({tag})", allow_truncated=True)
            path = out_dir / "traces" / f"{tag}.jsonl"
            new.save(path)
            st = new.stats()
            log.info("regenerated traces at %s: mean %.1f tokens, truncation %.3f, accuracy %s",
                     tag, st["mean_completion_tokens"], st["truncation_rate"], st["answer_accuracy"])
            return new, str(path)

        cfg = ScheduleConfig(p.targets, p.steps, p.milestones if declared.regenerate == "milestones" else [],
                             imp.normalize, declared.verify_select,
                             p.drift_threshold if declared.regenerate == "drift" else None)
        initial = PruneState(0, Mask.dense(s), traces, traces_path, trace_history=history)
        fingerprint = hashlib.sha256(json.dumps([base["params_hash"], base["model"], traces.manifest["digest"], method]).encode()).hexdigest()
        state = iterative_prune(s, cfg, initial, score, regenerate if declared.regenerate != "none" else None,
                                Checkpointer(out_dir / "state", fingerprint))
        masks, history, run_log = state.saved, state.trace_history, state.log
        used_by = {t: history[:state.saved_after[t]] for t in p.targets}

    written = {}
    for target in p.targets:
        mask = masks[target]
        manifest = {**base, "target": target, "sparsity": mask.sparsity(s), "structure_ratio": mask.structure_ratio(s),
                    "attention_unit": s.attention_unit, "protected_layers": list(s.protected),
                    "kept_per_layer": mask.kept_per_layer(), "trace_sets": used_by[target],
                    "prompt_ids_digest": traces.prompt_ids_digest() if traces is not None else None,
                    "label": method_label(method, declared.scorer, mask)}
        written[target] = mask.save(out_dir / "masks" / f"sparsity-{target:.2f}.safetensors", manifest)
        log.info("%s %s: mask at target %.2f has parameter sparsity %.4f, structure ratio %.4f -> %s",
                 method, task, target, manifest["sparsity"], manifest["structure_ratio"], written[target])
    # no wall-clock time in the summary: a rerun with the same params writes the same bytes
    summary = {"method": method, "task": task, "trace_sets": history, "steps": run_log,
               "masks": {f"{t:.2f}": {"path": str(written[t]), "sparsity": masks[t].sparsity(s)} for t in p.targets}}
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out_dir / "summary.json")
    log.info("%s %s: pruned in %.1f s; masks and summary in %s", method, task, time.time() - start, out_dir)
    return written
