"""Evaluation (the paper's protocol): task accuracy plus the length signals pruned reasoning
models degrade on, and the decode-only NLL of the dense model's own held-out traces.

`evaluate_task` samples one completion per item through the chat template with thinking on,
checks each final answer deterministically with both extractors of `resp.tasks` (strict: the
answer stated after `</think>`; flexible: the last number or option), and reports
`accuracy_strict`, `accuracy_flexible`, mean completion length (tokens, EOS included) and
truncation rate, with one record per item (`answer_strict`, `correct_strict`,
`answer_flexible`, `correct_flexible`). Strict is the headline number.
`decode_only_nll` is the token-weighted mean NLL over completion tokens of a trace set (the
loss RESP calibrates on, measured on held-out prompts). `evaluate_masks` loads a model once
and runs all of it for the dense model and each pruned mask (method step 10), writing one
JSON file per method with no wall-clock times in it, so a rerun writes identical bytes (the NLL
at `NLL_DIGITS` significant digits, so that another CPU's float rounding does not change them).

Completions come from Hugging Face `generate` or, with `evaluation.backend: vllm`, from vLLM,
which loads each evaluated model from a masked export (pruned units zeroed, stock shapes) in a
temporary directory. NLL is a forward pass and always runs on the Hugging Face model.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from resp.artifacts import target_key, write_json
from resp.config import EvaluationParams, Params
from resp.generation import SamplingSpec, VllmEngine, generate, require_vllm
from resp.importance import per_sample_mean_loss
from resp.masks import Mask, MaskedModel, MaskError, check_mask_fits
from resp.models import load_model, model_identity
from resp.structures import Structures, structures_for
from resp.tasks import EXTRACTORS, Item, extract_answer, is_correct, load_items, render_prompt
from resp.traces import Trace, TraceSet, decode_only_batches

log = logging.getLogger(__name__)

DENSE = "dense"
ACCURACY_KEYS = tuple(f"accuracy_{extractor}" for extractor in EXTRACTORS)  # accuracy_strict, accuracy_flexible
SUMMARY_KEYS = ("n", *ACCURACY_KEYS, "mean_completion_tokens", "truncation_rate", "reflection_rate", "per_item")
PER_ITEM_KEYS = (*(f"correct_{e}" for e in EXTRACTORS), "completion_tokens", "truncated", "reflection")
BACKEND_KNOB = "evaluation.backend"
# Significant digits of the held-out NLL in metrics files: their 7th digit depends on the CPU's float
# reduction order, and the files are committed, so that `dvc repro` on another machine leaves them as
# they are (a value this close to a rounding boundary is rare: about 1 in 1000 at 4 digits).
NLL_DIGITS = 4


def reported_nll(nll: float) -> float:
    """`nll` at NLL_DIGITS significant digits, as metrics files hold it."""
    return float(f"{nll:.{NLL_DIGITS}g}")


class EvaluationError(ValueError):
    pass


def evaluate_task(model, tokenizer, items: list[Item], fmt: str, spec: SamplingSpec, batch_size: int,
                  seed: int, engine: VllmEngine | None = None, markers: list[str] | tuple[str, ...] = ()) -> dict:
    """Strict and flexible accuracy, mean completion tokens, truncation rate, the share of
    completions that check or correct themselves (contain one of `markers`), per-item records
    and per-item vectors (`per_item`, for paired comparisons) over `items`: one completion each.

    With a vLLM `engine`, it generates (`model` is not used and may be None); otherwise `generate`.
    """
    if not items:
        raise EvaluationError("no items to evaluate: check the task's split and --limit")
    prompts = [render_prompt(tokenizer, item.message, enable_thinking=True) for item in items]
    if engine is not None:
        completions = engine.generate(prompts, spec, seed)
    else:
        completions = generate(model, tokenizer, prompts, spec, batch_size=batch_size, seed=seed, desc=f"evaluate {fmt}")
    result = score_completions(items, completions, fmt, markers)
    log.info("%s: accuracy strict %.4f / flexible %.4f over %d completions, mean completion %.1f tokens, "
             "truncation rate %.4f, self-check rate %.4f", fmt, result["accuracy_strict"], result["accuracy_flexible"],
             result["n"], result["mean_completion_tokens"], result["truncation_rate"], result["reflection_rate"])
    return result


def score_completions(items: list[Item], completions, fmt: str, markers: list[str] | tuple[str, ...]) -> dict:
    """The metrics of `evaluate_task` for given completions (completion i answers items[i])."""
    records = []
    for item, completion in zip(items, completions, strict=True):
        record = {"id": item.id, "gold": item.gold}
        for extractor in EXTRACTORS:
            record[f"answer_{extractor}"] = extract_answer(fmt, completion.text, item.options, extractor=extractor)
            record[f"correct_{extractor}"] = is_correct(fmt, completion.text, item.gold, item.options, extractor=extractor)
        record.update({"completion_tokens": len(completion.completion_ids), "truncated": completion.truncated,
                       "reflection": any(m in completion.text for m in markers)})
        records.append(record)
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    """Accuracy, length, truncation and self-check rate of scored records, plus per-item vectors."""
    n = len(records)
    return {
        "n": n,
        **{f"accuracy_{e}": sum(r[f"correct_{e}"] for r in records) / n for e in EXTRACTORS},
        "mean_completion_tokens": sum(r["completion_tokens"] for r in records) / n,
        "truncation_rate": sum(r["truncated"] for r in records) / n,
        "reflection_rate": sum(r["reflection"] for r in records) / n,
        "per_item": {key: [int(r[key]) for r in records] for key in PER_ITEM_KEYS},
        "records": records,
    }


@torch.no_grad()
def decode_only_nll(model, traces: list[Trace], batch_size: int, pad_id: int, desc: str = "nll") -> dict:
    """Mean NLL per completion token over `traces` (token-weighted), and the token count.

    Prompt tokens are context only; a trace without a prompt (plain text) has no prediction
    for its first token.
    """
    if batch_size <= 0:
        raise EvaluationError(f"NLL batch size {batch_size} must be positive")
    device = next(model.parameters()).device
    total, n_tokens = 0.0, 0
    batches = decode_only_batches(traces, batch_size, pad_id)
    for batch in tqdm(batches, desc=desc, unit="batch", total=math.ceil(len(traces) / batch_size)):
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        losses, counts = per_sample_mean_loss(logits, batch["labels"].to(device))
        total += float((losses.double() * counts).sum())
        n_tokens += int(counts.sum())
    if n_tokens == 0:
        raise EvaluationError("the held-out traces have no completion tokens to score: regenerate them with `resp traces`")
    return {"nll": total / n_tokens, "n_tokens": n_tokens}


def _heldout(path: str | Path | None, model_key: str, n: int) -> TraceSet | None:
    """The first `n` held-out traces (manifest of the whole file), refused if another model
    generated them; None when n == 0."""
    if n == 0:
        return None
    if path is None:
        raise EvaluationError(f"evaluation.nll_traces is {n} but no held-out traces were given: pass --heldout "
                              "(made by `resp traces --split <eval split>`) or set evaluation.nll_traces=0")
    heldout = TraceSet.load(path)
    made_by = heldout.manifest.get("model", {}).get("key")
    if made_by != model_key:
        raise EvaluationError(f"held-out traces {path} were generated by model {str(made_by)[:16]}, not this model "
                              f"{model_key[:16]}: regenerate them with `resp traces` on this model")
    if len(heldout.traces) < n:
        raise EvaluationError(f"held-out traces {path} hold {len(heldout.traces)} traces but evaluation.nll_traces is {n}: "
                              f"regenerate them with --limit {n} or lower evaluation.nll_traces")
    return TraceSet(heldout.traces[:n], heldout.manifest)


def _summary(result: dict) -> dict:
    return {key: result[key] for key in SUMMARY_KEYS}


@contextmanager
def _vllm_engine(params: Params, model, tokenizer, mask: Mask, s: Structures):
    """None for evaluation.backend hf; for vllm, an engine over a masked export of `model` under
    `mask` in a temporary directory, removed on exit (vLLM loads models only from disk; one
    export at a time is on it)."""
    if params.evaluation.backend == "hf":
        yield None
        return
    from resp.checkpoints import export_model

    with tempfile.TemporaryDirectory(prefix="resp-eval-") as tmp:
        model_dir = export_model(model, tokenizer, mask, s, "masked", Path(tmp) / "masked", params.export.channel_multiple)
        with VllmEngine(model_dir, params.scale.vllm_gpu_memory_utilization, BACKEND_KNOB) as engine:
            yield engine


def _evaluate_current(model, tokenizer, items: list[Item], fmt: str, ev: EvaluationParams,
                      heldout: list[Trace] | None, label: str, engine: VllmEngine | None) -> dict:
    """Greedy and sampled task metrics and held-out NLL of the model as it is now (generated by
    `engine` when given)."""
    greedy_spec = SamplingSpec(temperature=0.0, top_p=ev.top_p, top_k=ev.top_k, max_new_tokens=ev.max_new_tokens)
    sampled_spec = SamplingSpec(temperature=ev.temperature, top_p=ev.top_p, top_k=ev.top_k, max_new_tokens=ev.max_new_tokens)
    # Greedy decoding ignores the seed.
    markers = ev.reflection_markers
    greedy = _summary(evaluate_task(model, tokenizer, items, fmt, greedy_spec, ev.batch_size, ev.sample_seed, engine,
                                    markers))
    sampled = None   # evaluation.samples: 0 skips the sampled pass
    if ev.samples:
        # all samples of all items in one call (row k*n + i is sample k of item i), in batches of
        # evaluation.batch_size: on CPU a wider batch costs more per row (the KV cache is re-copied each step)
        rows = [item for _ in range(ev.samples) for item in items]
        every = evaluate_task(model, tokenizer, rows, fmt, sampled_spec, ev.batch_size, ev.sample_seed, engine, markers)
        n = len(items)
        per_sample = [{"sample": k, **_summary(summarize(every["records"][k * n:(k + 1) * n]))}
                      for k in range(ev.samples)]
        sampled = {**{key: sum(r[key] for r in per_sample) / len(per_sample)
                      for key in (*ACCURACY_KEYS, "mean_completion_tokens", "truncation_rate", "reflection_rate")},
                   "per_sample": per_sample}
    nll = None
    if heldout is not None:
        nll = decode_only_nll(model, heldout, ev.nll_batch_size, tokenizer.pad_token_id, desc=f"nll {label}")
        nll["nll"] = reported_nll(nll["nll"])
    return {"greedy": greedy, "sampled": sampled, "nll": nll}


def evaluate_masks(params: Params, task: str, method: str, mask_paths: dict[float, str | Path],
                   heldout_traces_path: str | Path | None, out_path: str | Path, include_dense: bool) -> Path:
    """Evaluate the dense model (if `include_dense`) and `params.model` under each mask; write JSON.

    Results are keyed "dense" and by target sparsity ("0.20"). Every mask is loaded and checked
    against the model before anything runs; dense weights are restored before each mask. With
    evaluation.backend vllm, each model (the dense one too) is generated from its masked export.
    """
    if not mask_paths and not include_dense:
        raise EvaluationError("nothing to evaluate: give masks (--masks-dir) or include the dense model (--dense)")
    if task not in params.tasks:
        raise EvaluationError(f"task {task!r} is not in params.yaml tasks; defined: {sorted(params.tasks)}")
    ev = params.evaluation
    if ev.backend == "vllm":
        require_vllm(BACKEND_KNOB)  # before minutes of loading and exporting
    task_params = params.tasks[task]
    items = load_items(task_params, task_params.eval_split)[: ev.num_items]
    if not items:
        raise EvaluationError(f"split {task_params.eval_split!r} of task {task} has no items to evaluate")
    m = params.model
    identity = model_identity(m.name_or_path, m.revision)
    heldout = _heldout(heldout_traces_path, identity.key, ev.nll_traces)
    model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, m.device)
    s = structures_for(model, params.prune.attention_unit, params.prune.protected_layers)

    variants: list[tuple[str, Mask, dict]] = [(DENSE, Mask.dense(s), {})] if include_dense else []
    for target, path in sorted(mask_paths.items()):
        mask, meta = Mask.load(path)
        try:
            check_mask_fits(mask, s, meta, identity.key)
        except MaskError as e:
            raise MaskError(f"{path}: {e}") from None
        variants.append((target_key(target), mask, {"target": target, "mask": str(path), "mask_digest": mask.digest(),
                                                 "label": meta.get("label", method)}))

    masked = MaskedModel(model, s, keep_dense=True)
    results = {}
    for label, mask, about in variants:
        started = time.perf_counter()
        masked.set(mask)
        with _vllm_engine(params, model, tokenizer, mask, s) as engine:
            metrics = _evaluate_current(model, tokenizer, items, task_params.format, ev,
                                        heldout.traces if heldout else None, f"{method} {label}", engine)
        results[label] = {**about, "sparsity": mask.sparsity(s), "structure_ratio": mask.structure_ratio(s),
                          "composition": mask.composition(s), **metrics}
        nll = metrics["nll"]["nll"] if metrics["nll"] else float("nan")
        sampled = metrics["sampled"] or {key: float("nan") for key in ACCURACY_KEYS}
        log.info("%s %s %s: sparsity %.4f, accuracy strict/flexible greedy %.4f/%.4f, sampled %.4f/%.4f, "
                 "mean completion %.1f tokens, truncation %.4f, NLL %.4f (%.1f s)", task, method, label,
                 results[label]["sparsity"], metrics["greedy"]["accuracy_strict"], metrics["greedy"]["accuracy_flexible"],
                 sampled["accuracy_strict"], sampled["accuracy_flexible"],
                 metrics["greedy"]["mean_completion_tokens"], metrics["greedy"]["truncation_rate"], nll,
                 time.perf_counter() - started)

    report = {
        "task": task,
        "method": method,
        "model": {**identity.to_dict(), "key": identity.key},
        "format": task_params.format,
        "split": task_params.eval_split,
        "few_shot": task_params.few_shot,
        "evaluation": ev.model_dump(),
        "item_ids": [item.id for item in items],   # per_item vectors follow this order (paired comparisons)
        "heldout": ({"path": str(heldout_traces_path), "digest": heldout.manifest["digest"],
                     "n_traces": len(heldout.traces)} if heldout else None),
        "results": results,
    }
    path = write_json(out_path, report, newline=True)
    log.info("wrote %s evaluation of %s (%d models) to %s", task, method, len(results), path)
    return path
