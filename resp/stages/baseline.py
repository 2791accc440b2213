"""One-shot baselines (method.md, "Baselines"): a scorer's masks at every target from one calibration pass."""

from __future__ import annotations

import logging
from pathlib import Path

from resp import artifacts
from resp.config import Method, Params
from resp.stages.common import loaded_model

log = logging.getLogger(__name__)


def baseline(params: Params, task: str, method: Method, base: dict, calibration: str | None,
             out_dir: str) -> dict[str, str]:
    """Masks at every target of a one-shot scorer (Wanda-sp, OWL-sp, FLAP, magnitude, random)."""
    from resp.baselines import baseline_masks
    from resp.masks import Mask
    from resp.traces import TraceSet, decode_only_batches

    declared, p = method.declaration, params.prune
    loaded = loaded_model(params, base)
    s = loaded.masked.s
    loaded.masked.set(Mask.dense(s))
    batches = None
    if calibration is not None:
        batches = list(decode_only_batches(TraceSet.load(calibration).traces, params.importance.batch_size,
                                           loaded.tokenizer.pad_token_id))
    b = params.baselines
    masks = baseline_masks(declared.scorer, loaded.model, s, p.targets, batches, p.seed, params.importance.normalize,
                           b.owl_outlier_m, b.owl_lambda, declared.bias_compensation, b.flap_statistics_dtype)
    if declared.scorer == "flap" and declared.bias_compensation and not (s.o_bias and s.mlp_bias):
        log.info("flap: bias compensation goes into o_proj/down_proj biases this architecture lacks: they are created "
                 "when a mask is applied and carried by the compact export (a masked export refuses such a mask)")
    return {artifacts.target_key(t): str(masks[t].save(Path(out_dir) / "steps" / "baseline" /
                                                       f"{artifacts.target_name(t)}.safetensors", {"kind": "step"}))
            for t in p.targets}
