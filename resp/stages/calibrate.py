"""The calibration a method declares (`methods.<m>.calibration`), as a trace file: one entry per
source in `SOURCES`. Adding a calibration source = one function and one entry (and the name in
`resp.config.CALIBRATION_SOURCES`)."""

from __future__ import annotations

import logging

from resp.config import Method, Params
from resp.stages.common import LoadedModel, loaded_model, run_manifest, sampling_spec

log = logging.getLogger(__name__)


def _self(params: Params, task: str, loaded: LoadedModel, dense_traces: str | None, manifest: dict):
    """The dense model's own traces (`resp traces`), used as they are (their own path)."""
    from resp.traces import TraceSet

    return TraceSet.load(dense_traces)


def _self_selected(params: Params, task: str, loaded: LoadedModel, dense_traces: str | None, manifest: dict):
    """Sample `select_candidates` calibration prompts `select_samples` times each from the dense model
    and keep `num_prompts` challenging, moderately long traces."""
    from resp.tasks import calibration_items
    from resp.traces import select_challenging, self_generated_traces

    c, t = params.calibration, params.tasks[task]
    candidates = calibration_items(t, c.select_candidates, c.seed)
    repeated = [item for item in candidates for _ in range(c.select_samples)]
    sampled = self_generated_traces(loaded.model, loaded.tokenizer, repeated, t.format, sampling_spec(params),
                                    params.generation.batch_size, params.generation.seed,
                                    {**manifest, "mask_digest": None,
                                     "prompt_ids": [i.id for i in repeated]}, desc=f"candidates {task}",
                                    backend=params.generation.backend, model_dir=params.model.name_or_path,
                                    gpu_memory_utilization=params.scale.vllm_gpu_memory_utilization)
    chosen = select_challenging(sampled, c.select_samples, c.num_prompts, c.select_length_quantiles)
    chosen.manifest["prompt_ids"] = [tr.prompt_id for tr in chosen.traces]
    log.info("selected %d of %d candidate prompts (length range %s, mean difficulty %.3f)", len(chosen.traces),
             len(candidates), chosen.manifest["selection"]["length_range"],
             sum(chosen.manifest["selection"]["difficulty"]) / len(chosen.traces))
    return chosen


def _gold(params: Params, task: str, loaded: LoadedModel, dense_traces: str | None, manifest: dict):
    """The task's human-written solutions after the same 0-shot prompt."""
    from resp.tasks import calibration_items
    from resp.traces import gold_traces

    items = calibration_items(params.tasks[task], params.calibration.num_prompts, params.calibration.seed)
    return gold_traces(loaded.tokenizer, items, {**manifest, "prompt_ids": [i.id for i in items]})


def _generic(params: Params, task: str, loaded: LoadedModel, dense_traces: str | None, manifest: dict):
    """prose_task text (full-sequence loss)."""
    from resp.tasks import calibration_items
    from resp.traces import text_traces

    items = calibration_items(params.tasks[params.prose_task], params.calibration.num_prompts, params.calibration.seed)
    return text_traces(loaded.tokenizer, items, {**manifest, "prompt_ids": [i.id for i in items]})


SOURCES = {"self": _self, "self_selected": _self_selected, "gold": _gold, "generic": _generic, "none": None}


def calibrate(params: Params, task: str, method: Method, base: dict, dense_traces: str | None, out: str) -> str | None:
    """The calibration traces `method` declares, as a file: the dense model's own traces for
    `self` (returned as is), else built here and written to `out`; None for `none`."""
    from resp.traces import check_usable

    source = SOURCES[method.declaration.calibration]
    if source is None:
        return None
    traces = source(params, task, loaded_model(params, base), dense_traces, run_manifest(params, task, method, base))
    path = dense_traces if source is _self else out
    if source is not _self:
        traces.save(out)
    check_usable(traces, f"{method.name} calibration traces")
    return str(path)
