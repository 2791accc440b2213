"""Measure the embedded world against its targets (`../design/toy-world.md`, `resp world check`).

On the first `world.check_items` test items of each task, with the committed model:
- dense greedy accuracy (strict extractor), mean completion length and truncation rate at
  evaluation.max_new_tokens, and the self-check/self-correction rate of greedy completions;
- `world.check_samples` completions per item at the generation temperature: the share of items
  with at least 2 distinct completions, the self-check rate of sampled (trace-like) completions,
  and the decode-only NLL of the first sample per item under the model (held-out self traces).
Each number comes with its target and whether it is met; nothing here is timed.
"""

from __future__ import annotations

import logging

from resp.config import Params
from resp.evaluation import decode_only_nll, evaluate_task, reported_nll
from resp.generation import SamplingSpec, generate
from resp.models import load_model
from resp.tasks import load_items, render_prompt
from resp.traces import Trace

log = logging.getLogger(__name__)

# The world's targets (toy-world.md): (low, high), None = unbounded.
TARGETS = {
    "greedy_accuracy": (0.60, 0.92),
    "heldout_nll": (0.05, None),
    "distinct_share": (0.30, None),
    "mean_completion_tokens": (80, None),
    "truncation_rate": (None, 0.03),
    "sampled_reflection_rate": (0.10, 0.40),
}


def _met(value: float, bounds: tuple) -> bool:
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def measure_task(params: Params, task: str, model, tokenizer) -> dict:
    w, ev, g = params.world, params.evaluation, params.generation
    t = params.tasks[task]
    items = load_items(t, t.eval_split)[: w.check_items]
    greedy_spec = SamplingSpec(temperature=0.0, top_p=ev.top_p, top_k=ev.top_k, max_new_tokens=ev.max_new_tokens)
    greedy = evaluate_task(model, tokenizer, items, t.format, greedy_spec, ev.batch_size, 0, None, ev.reflection_markers)
    sampled_spec = SamplingSpec(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_new_tokens=ev.max_new_tokens)
    prompts = [render_prompt(tokenizer, item.message, enable_thinking=True) for item in items]
    rows = [p for _ in range(w.check_samples) for p in prompts]   # row k*n + i: sample k of item i
    completions = generate(model, tokenizer, rows, sampled_spec, batch_size=ev.batch_size * w.check_samples,
                           seed=g.seed, desc=f"world check {task} samples")
    n = len(items)
    per_item = [[completions[k * n + i] for k in range(w.check_samples)] for i in range(n)]
    distinct = sum(len({c.text for c in samples}) >= 2 for samples in per_item) / n
    reflection = sum(any(m in c.text for m in ev.reflection_markers) for c in completions) / len(completions)
    first = [Trace(item.id, c.prompt_ids, c.completion_ids, c.text, c.truncated) for item, c in zip(items, completions[:n])]
    nll = decode_only_nll(model, first, ev.nll_batch_size, tokenizer.pad_token_id, desc=f"world check {task} nll")
    values = {
        "greedy_accuracy": greedy["accuracy_strict"],
        "heldout_nll": reported_nll(nll["nll"]),   # at the precision metrics files hold: CPU-independent bytes
        "distinct_share": distinct,
        "mean_completion_tokens": greedy["mean_completion_tokens"],
        "truncation_rate": greedy["truncation_rate"],
        "sampled_reflection_rate": reflection,
    }
    out = {"items": n, "samples": w.check_samples, "max_new_tokens": ev.max_new_tokens,
           "greedy_accuracy_flexible": greedy["accuracy_flexible"], "greedy_reflection_rate": greedy["reflection_rate"],
           "sampled_mean_completion_tokens": sum(len(c.completion_ids) for c in completions) / len(completions),
           "sampled_truncation_rate": sum(c.truncated for c in completions) / len(completions)}
    for key, value in values.items():
        out[key] = {"value": value, "target": list(TARGETS[key]), "met": _met(value, TARGETS[key])}
    return out


WORLD_TASKS = ("arith", "choice")


def measure_world(params: Params) -> dict:
    """{task: measurements} for the world's two reasoning tasks, with the committed model."""
    m = params.model
    model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, m.device)
    return {task: measure_task(params, task, model, tokenizer) for task in WORLD_TASKS}


def format_measurements(results: dict) -> str:
    lines = []
    for task, r in results.items():
        lines.append(f"{task} ({r['items']} held-out items, {r['samples']} samples each, "
                     f"max_new_tokens {r['max_new_tokens']}):")
        for key in TARGETS:
            v = r[key]
            low, high = v["target"]
            bound = f"[{'' if low is None else low}, {'' if high is None else high}]"
            lines.append(f"  {key:<24} {v['value']:.4f}  target {bound:<12} {'met' if v['met'] else 'NOT MET'}")
    return "\n".join(lines)
