"""The run's outputs (method step 9): masks at every target with manifests saying what produced them,
and summary.json."""

from __future__ import annotations

import logging
from pathlib import Path

from resp import artifacts
from resp.config import Method, Params
from resp.stages.common import loaded_model, run_manifest

log = logging.getLogger(__name__)


def write_run(params: Params, task: str, method: Method, base: dict, record: dict, out_dir: str) -> dict[str, str]:
    """The run's outputs: `masks/sparsity-<t>.safetensors` with manifests saying what produced them,
    and `summary.json` (no wall-clock time in it, losses at artifacts.LOSS_DIGITS: a rerun with the same params
    writes the same bytes, on another CPU too;
    its `cost` counts what the score and regenerate stages processed, `resp.cost.run_cost`).
    `record`: {"saved": {target key: mask file}, "trace_sets": [...], "used_by": {target key: n},
    "steps": [...], "spent": [files the score and regenerate stages wrote]}."""
    from resp.cost import matmul_params, run_cost
    from resp.masks import Mask
    from resp.schedule import reported_steps
    from resp.traces import TraceSet

    p = params.prune
    s = loaded_model(params, base).masked.s
    history = record["trace_sets"]
    first = TraceSet.load(history[0]["path"]) if history else None
    written, masks = {}, {}
    for target in p.targets:
        key = artifacts.target_key(target)
        mask = masks[target] = Mask.load(record["saved"][key])[0]
        manifest = {**run_manifest(params, task, method, base), "target": target, "sparsity": mask.sparsity(s),
                    "structure_ratio": mask.structure_ratio(s), "attention_unit": s.attention_unit,
                    "protected_layers": list(s.protected), "kept_per_layer": mask.kept_per_layer(),
                    "trace_sets": history[:record["used_by"][key]],
                    "prompt_ids_digest": first.prompt_ids_digest() if first is not None else None,
                    "label": method.name}
        written[key] = str(mask.save(artifacts.mask_file(Path(out_dir) / "masks", target), manifest))
        log.info("%s %s: mask at target %.2f has parameter sparsity %.4f, structure ratio %.4f -> %s",
                 method.name, task, target, manifest["sparsity"], manifest["structure_ratio"], written[key])
    summary = {"method": method.name, "task": task, "trace_sets": history, "steps": reported_steps(record["steps"]),
               "cost": run_cost(record["spent"], matmul_params(loaded_model(params, base).model)),
               "masks": {artifacts.target_key(t): {"path": written[artifacts.target_key(t)],
                                                   "sparsity": masks[t].sparsity(s)} for t in p.targets}}
    artifacts.write_json(Path(out_dir) / "summary.json", summary)
    return written
