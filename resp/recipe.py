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
from resp.masks import Mask
from resp.models import load_model, model_identity
from resp.schedule import Checkpointer, MaskedModel, PruneState, ScheduleConfig, iterative_prune
from resp.structures import structures_for
from resp.tasks import calibration_items, load_items
from resp.traces import (TraceSet, check_usable, decode_only_batches, filter_traces, gold_traces,
                         self_generated_traces, text_traces)

log = logging.getLogger(__name__)

TAYLOR_METHODS = ("resp", "resp_noregen", "gisp", "generic")
ONE_SHOT_METHODS = ("wanda_sp", "flap", "magnitude", "random")


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


def _initial_traces(params: Params, task: str, method: str, tokenizer, dense_traces: str | None, base: dict) -> tuple[TraceSet, str]:
    t = params.tasks[task]
    if method in ("resp", "resp_noregen"):
        if dense_traces is None:
            raise RecipeError(f"method {method} needs the dense model's traces: pass --traces (made by `resp traces`)")
        return TraceSet.load(dense_traces), str(dense_traces)
    if method == "gisp":
        items = calibration_items(t, params.calibration.num_prompts, params.calibration.seed)
        traces = gold_traces(tokenizer, items, {**base, "prompt_ids": [i.id for i in items]})
    else:  # generic text (and the activation baselines' calibration)
        prose = params.tasks[params.prose_task]
        items = calibration_items(prose, params.calibration.num_prompts, params.calibration.seed)
        traces = text_traces(tokenizer, items, {**base, "prompt_ids": [i.id for i in items]})
    return traces, ""


def prune(params: Params, task: str, method: str, out_dir: str | Path,
          dense_traces: str | None = None) -> dict[float, Path]:
    """Run `method` on `task` and write `<out_dir>/masks/sparsity-<t>.safetensors` for every target."""
    if method not in TAYLOR_METHODS + ONE_SHOT_METHODS:
        raise RecipeError(f"method {method!r} is unknown; choose one of {', '.join(TAYLOR_METHODS + ONE_SHOT_METHODS)}")
    out_dir = Path(out_dir)
    p = params.prune
    model, tokenizer = load_model(params.model.name_or_path, params.model.revision, params.model.dtype, params.model.device)
    identity = model_identity(params.model.name_or_path, params.model.revision)
    s = structures_for(model, p.attention_unit, p.protected_layers)
    t = params.tasks[task]
    base = {"model": {**identity.to_dict(), "key": identity.key}, "task": task, "method": method,
            "params_hash": params_hash(params, task), "code": code_version()}
    traces, traces_path = _initial_traces(params, task, method, tokenizer, dense_traces, base)
    if not traces_path:
        traces_path = str(out_dir / "traces" / "calibration.jsonl")
        traces.save(traces_path)
    check_usable(traces, f"{method} calibration traces")
    start = time.time()

    if method in ONE_SHOT_METHODS:
        from resp.baselines import baseline_masks, collect_input_stats

        stats = None
        if method in ("wanda_sp", "flap"):
            batches = decode_only_batches(traces.traces, params.importance.batch_size, tokenizer.pad_token_id)
            stats = collect_input_stats(model, batches, s)
        masks = baseline_masks(method, model, s, p.targets, stats, p.seed, params.importance.normalize)
        history = [{"path": traces_path, "digest": traces.manifest["digest"], "at_step": 0, "tag": "calibration", **traces.stats()}]
        used_by = {t: history for t in p.targets}
        run_log: list[dict] = []
    else:
        dense_answers = {tr.prompt_id: tr.answer for tr in traces.traces}
        keep_rule = p.trace_filter if method in ("resp", "resp_noregen") else "none"
        masked = MaskedModel(model, s, keep_dense=p.verify_select)
        imp = params.importance

        def score(mask: Mask, current: TraceSet):
            masked.set(mask)
            used = filter_traces(current, keep_rule, dense_answers)
            return taylor_scores(model, used.traces, s, imp.batch_size, tokenizer.pad_token_id,
                                 imp.per_sample_abs, imp.grads_only_scored, imp.grad_checkpointing,
                                 desc=f"{method} scores")

        items = calibration_items(t, params.calibration.num_prompts, params.calibration.seed)

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
            check_usable(new, f"regenerated traces ({tag})")
            path = out_dir / "traces" / f"{tag}.jsonl"
            new.save(path)
            st = new.stats()
            log.info("regenerated traces at %s: mean %.1f tokens, truncation %.3f, accuracy %s",
                     tag, st["mean_completion_tokens"], st["truncation_rate"], st["answer_accuracy"])
            return new, str(path)

        cfg = ScheduleConfig(p.targets, p.steps, p.milestones if method == "resp" else [], imp.normalize, p.verify_select)
        initial = PruneState(0, Mask.dense(s), traces, traces_path,
                             trace_history=[{"path": traces_path, "digest": traces.manifest["digest"], "at_step": 0,
                                             "tag": "initial", **traces.stats()}])
        fingerprint = hashlib.sha256(json.dumps([base["params_hash"], base["model"], traces.manifest["digest"], method]).encode()).hexdigest()
        state = iterative_prune(s, cfg, initial, score, regenerate if method == "resp" else None,
                                Checkpointer(out_dir / "state", fingerprint))
        masks, history, run_log = state.saved, state.trace_history, state.log
        used_by = {t: history[:state.saved_after[t]] for t in p.targets}

    written = {}
    for target in p.targets:
        mask = masks[target]
        manifest = {**base, "target": target, "sparsity": mask.sparsity(s), "structure_ratio": mask.structure_ratio(s),
                    "attention_unit": s.attention_unit, "protected_layers": list(s.protected),
                    "kept_per_layer": mask.kept_per_layer(), "trace_sets": used_by[target],
                    "prompt_ids_digest": traces.prompt_ids_digest()}
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
