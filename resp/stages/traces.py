"""The dense model's own traces (method step 1): calibration traces (`dense_traces`), held-out traces
for NLL (`heldout_traces`) and the healing data (`heal_traces`), all sampled by `make_traces`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from resp.config import Method, Params
from resp.stages.common import base_model, loaded_model, sampling_spec
from resp.stages.table import code_record

log = logging.getLogger(__name__)


def make_traces(params: Params, task: str, split: str, limit: int | None, out: str | Path,
                model_dir: str | None = None, base: dict | None = None) -> Path:
    """Sample one completion per prompt from the (dense) model; calibration prompts when split is
    the task's calibration split (seeded selection), else the first `limit` items of `split`.
    `base`: the model's identity when the caller already resolved it (`base_model`)."""
    from resp.masks import Mask
    from resp.models import load_model, model_identity
    from resp.tasks import calibration_items, load_items
    from resp.traces import check_usable, self_generated_traces

    t = params.tasks[task]
    model_path = model_dir or params.model.name_or_path
    if model_dir is None:
        base = base or base_model(params)
        loaded = loaded_model(params, base)
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
                "code": code_record("dense_traces" if split == t.calibration_split else "heldout_traces")}
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


def dense_traces(params: Params, task: str, out: str, base: dict) -> str:
    """The dense model's traces on calibration.num_prompts calibration prompts (methods calibrated on `self`)."""
    return str(make_traces(params, task, params.tasks[task].calibration_split, None, out, base=base))


def heldout_traces(params: Params, task: str, out: str, base: dict) -> str:
    """The dense model's traces on the first evaluation.nll_traces items of the eval split (held-out NLL)."""
    return str(make_traces(params, task, params.tasks[task].eval_split, params.evaluation.nll_traces, out, base=base))


def heal_traces(params: Params, task: str, method: Method, out: str, base: dict) -> str:
    """The dense model's traces on the first heal.num_prompts calibration prompts (the healing data)."""
    return str(make_traces(params, task, params.tasks[task].calibration_split, method.declaration.heal.num_prompts,
                           out, base=base))
