"""Registering a healed model (`resp heal`) as a version whose parent is the pruned version it healed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from resp.artifacts import file_digest, manifest_path, mask_file, target_key
from resp.config import Params
from resp.masks import Mask
from resp.registry.register import _check_joins, _check_request, _read_metrics
from resp.registry.store import (RegistryError, _client, _experiment_id, _identity, _info, _store_errors, _store_lock,
                                 _versions, model_name, tracking_uri)
from resp.registry.versions import (_artifacts_digest, _create_version, _dataset_inputs, _dir_files, _dvc_stage, _entry,
                                    _flat_numbers, _git_commit, logged_params)
from resp.stages.table import stage_params

log = logging.getLogger("resp.registry")


HEAL_MANIFEST = "resp_heal.json"   # resp.healing.MANIFEST (not imported: it pulls in torch)


HEALED_MASK_DIR = "mask"           # resp.healing.MASK_DIR


def register_healed(params: Params, healed_dir: str | Path, exports: dict[str, str | Path] | None = None,
                    metrics: str | Path | None = None) -> dict:
    """Register a healed model directory (`resp heal`) as a version of `resp-{base}-{task}-{method}`, the
    method whose heal settings ran. Its parent is the registered pruned version of the mask it healed
    (register that run first); its lineage names the teacher, the healing traces (logged and verified
    by `resp audit` like any trace set), the heal settings and steps, and the code. `exports` maps
    formats to export directories of the healed model; `metrics` is `resp evaluate` on it."""
    from resp.lineage import read_mask

    healed_dir = Path(healed_dir)
    if not (healed_dir / HEAL_MANIFEST).is_file():
        raise RegistryError(f"{healed_dir} holds no {HEAL_MANIFEST}: it is not a healed model; run `resp heal` first")
    heal = json.loads((healed_dir / HEAL_MANIFEST).read_text())
    _check_request(params, heal["task"], heal["method"])
    declared = params.methods[heal["method"]].heal
    if declared is None or declared.model_dump(mode="json") != heal["heal"]:
        raise RegistryError(f"{healed_dir} was healed with other settings than methods.{heal['method']}.heal of the given "
                            "params: register with the params it was healed with, or re-run `resp heal`")
    mask_path = mask_file(healed_dir / HEALED_MASK_DIR, heal["target"])
    mask, meta = read_mask(mask_path)
    for t in heal["traces"]:
        if not Path(t["path"]).is_file() or file_digest(t["path"]) != t["digest"]:
            raise RegistryError(f"healing traces {t['path']} recorded in {healed_dir / HEAL_MANIFEST} are missing or were "
                                "edited after healing: restore them or re-run `resp heal`")
    report = _read_metrics(metrics) if metrics is not None else None
    exports = dict(exports or {})
    with _store_lock(tracking_uri(params)):
        client, uri = _client(params, lock=False)
        with _store_errors(uri):
            experiment_id = _experiment_id(client, params)
            _check_joins(mask.digest(), mask_path, float(heal["target"]), exports, report, metrics)
            return _register_healed(client, experiment_id, params, healed_dir, heal, mask, mask_path, exports,
                                    report, metrics)


def _register_healed(client, experiment_id, params: Params, healed_dir: Path, heal: dict, mask: Mask, mask_path: Path,
                     exports: dict, report: dict | None, metrics_path) -> dict:
    from resp.artifacts import json_digest

    task, method, target = heal["task"], heal["method"], float(heal["target"])
    teacher, label = heal["teacher"], target_key(target)
    pruned_digest = heal["mask"]["digest"]
    parents = _versions(client, f"tags.kind = 'pruned' AND tags.mask_digest = '{pruned_digest}' "
                                f"AND tags.base_key = '{teacher['key']}'")
    if not parents:
        raise RegistryError(f"the pruned model healed here (mask {heal['mask']['path']}, digest {pruned_digest[:12]}) is "
                            "not registered: register its run first (`resp register`), then the healed model")
    name = model_name(teacher, task, method)
    # the same mask of the same base can be registered under several methods (identical declarations, or copies
    # of one base directory): the parent is the method's own pruned version when it has one
    parent = _info(([v for v in parents if v.name == name] or parents)[-1], created=False)
    trace_entries, entries = [], []
    for i, t in enumerate(heal["traces"]):
        path = Path(t["path"])
        trace_entries.append(_entry("trace_set", f"traces/{i}-heal/{path.name}", path, t["digest"], index=i, tag="heal"))
        if manifest_path(path).is_file():
            entries.append(_entry("trace_manifest", f"traces/{i}-heal/{manifest_path(path).name}", manifest_path(path),
                                  index=i))
    entries += [_entry("mask", f"mask/{mask_path.name}", mask_path),
                _entry("mask_manifest", f"mask/{manifest_path(mask_path).name}", manifest_path(mask_path)),
                _entry("heal_manifest", f"heal/{HEAL_MANIFEST}", healed_dir / HEAL_MANIFEST), *trace_entries]
    for fmt, directory in sorted({"healed": healed_dir, **exports}.items()):
        for f in _dir_files(Path(directory)):
            rel = f.relative_to(directory).as_posix()
            entries.append(_entry("export", f"exports/{fmt}/{rel}" if params.registry.log_exports else None, f,
                                  format=fmt))
    numbers = {}
    if report is not None:
        result = report.get("results", {}).get(label)
        if result is None:
            raise RegistryError(f"metrics file {metrics_path} has no results for sparsity {label}: re-run `resp evaluate`")
        numbers = _flat_numbers({k: v for k, v in result.items() if k != "target"})
        entries.append(_entry("metrics", f"metrics/{Path(metrics_path).name}", Path(metrics_path)))
    artifacts = _artifacts_digest(entries)
    same_as = f"tags.kind = 'healed' AND tags.heal_run_key = '{heal['run_key']}' AND tags.artifacts_digest = '{artifacts}'"
    existing = _versions(client, f"name = '{name}' AND {same_as}")
    if existing:
        return _info(existing[-1], created=False)
    params_hash = json_digest(stage_params(params, "heal", task=task, method=method))
    code = {**(heal.get("code") or {}), "registered_from": _git_commit()}
    h = heal["heal"]
    lineage = {
        "kind": "healed", "model": name, "task": task, "method": method, "target": target,
        "sparsity": heal["mask"]["sparsity"], "base": _identity(teacher),
        "prompt_ids_digest": heal["traces"][0]["prompt_ids_digest"], "params_hash": params_hash, "code": code,
        "dvc": _dvc_stage(healed_dir), "mask": {"path": str(mask_path), "digest": mask.digest()},
        "trace_sets": [{"tag": "heal", "path": t["path"], "digest": t["digest"], "n": t["n"], "sparsity": 0.0}
                       for t in heal["traces"]],
        "healed": {"teacher": _identity(teacher), "pruned_mask": heal["mask"], "heal": h, "steps": h["steps"],
                   "run_key": heal["run_key"], "trained_tokens": heal["trained_tokens"], "loss": heal["loss"],
                   "model": heal["healed_model"]},
        "exports": {fmt: str(d) for fmt, d in sorted({"healed": healed_dir, **exports}.items())},
        "parent": {"name": parent["name"], "version": parent["version"]}, "replaces": None,
    }
    tags = {"kind": "healed", "task": task, "method": method, "target": label, "sparsity": f"{lineage['sparsity']:.6f}",
            "base_name": str(teacher["name"]), "base_key": teacher["key"], "teacher_key": teacher["key"],
            "base_content_hash": str(teacher.get("content_hash")), "base_revision": str(teacher.get("revision")),
            "mask_digest": mask.digest(), "pruned_mask_digest": heal["mask"]["digest"],
            "healed_model_key": heal["healed_model"]["key"], "heal_run_key": heal["run_key"],
            "heal_steps": str(h["steps"]), "heal_loss": h["loss"], "heal_mode": h["mode"],
            "params_hash": params_hash, "artifacts_digest": artifacts,
            "prompt_ids_digest": str(lineage["prompt_ids_digest"]),
            "trace_digests": ",".join(t["digest"] for t in heal["traces"]), "trace_tags": ",".join("heal" for _ in heal["traces"]),
            "code_step": str(code.get("step")), "code_digest": str(code.get("digest")),
            "registered_from_commit": str(code["registered_from"]["commit"]),
            "registered_from_dirty": str(code["registered_from"]["dirty"]),
            "parent": f"{parent['name']}/{parent['version']}"}
    params_flat = {"task": task, "method": method, "target": label, "params_hash": params_hash,
                   **logged_params(params, "heal", task, method)}
    description = (f"{method} on {task}: {label} mask of {teacher['name']} healed {h['steps']} steps ({h['loss']}, "
                   f"{h['mode']}) on the dense model's traces; parent {parent['name']}/{parent['version']}")
    params_json = json.dumps(params.model_dump(mode="json"), indent=2, sort_keys=True).encode()
    return _create_version(client, experiment_id, f"{task}-{method}-{label}-healed", name, description, tags, entries,
                           {"params.json": params_json}, lineage, params_flat, numbers, _dataset_inputs(trace_entries),
                           same_as=same_as)
