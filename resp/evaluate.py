"""Evaluation (the paper's protocol): task accuracy plus the length signals pruned reasoning
models degrade on.

`evaluate_task` samples one completion per item through the chat template with thinking on,
checks each final answer deterministically (`resp.tasks.is_correct`), and reports accuracy,
mean completion length (tokens, EOS included) and truncation rate, with one record per item.
Other metrics on the same model (decode-only NLL on held-out traces) are separate functions
whose results are merged into the same JSON by the caller.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from resp.generation import SamplingSpec, generate
from resp.tasks import Item, extract_answer, is_correct, render_prompt

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    pass


def evaluate_task(model, tokenizer, items: list[Item], fmt: str, spec: SamplingSpec, batch_size: int,
                  seed: int) -> dict:
    """Accuracy, mean completion tokens, truncation rate and per-item records over `items`."""
    if not items:
        raise EvaluationError("no items to evaluate: check the task's split and --limit")
    prompts = [render_prompt(tokenizer, item.message, enable_thinking=True) for item in items]
    completions = generate(model, tokenizer, prompts, spec, batch_size=batch_size, seed=seed,
                           desc=f"evaluate {fmt}")
    records = []
    for item, completion in zip(items, completions):
        records.append({
            "id": item.id,
            "gold": item.gold,
            "answer": extract_answer(fmt, completion.text),
            "correct": is_correct(fmt, completion.text, item.gold),
            "completion_tokens": len(completion.completion_ids),
            "truncated": completion.truncated,
        })
    n = len(records)
    result = {
        "n": n,
        "accuracy": sum(r["correct"] for r in records) / n,
        "mean_completion_tokens": sum(r["completion_tokens"] for r in records) / n,
        "truncation_rate": sum(r["truncated"] for r in records) / n,
        "records": records,
    }
    log.info("%s: accuracy %.4f over %d items, mean completion %.1f tokens, truncation rate %.4f",
             fmt, result["accuracy"], n, result["mean_completion_tokens"], result["truncation_rate"])
    return result


def write_json(path: str | Path, obj) -> Path:
    """Write `obj` as indented JSON, atomically (temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path
