"""Registering a run: one version per mask of a pruning run, each joined to its exports and metrics,
with the dense base model as its parent."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from resp.artifacts import ArtifactError, file_digest, manifest_path, masks_in_dir, target_key
from resp.config import Params
from resp.masks import Mask
from resp.registry.store import (RegistryError, _client, _experiment_id, _identity, _info, _sanitize, _store_errors,
                                 _store_lock, _versions, dense_model_name, model_name, tracking_uri)
from resp.registry.versions import (_artifacts_digest, _clean_stale_runs, _create_version, _dataset_inputs, _dir_files,
                                    _dvc_stage, _entry, _finished, _flat_numbers, _git_commit, logged_params)
from resp.stages.table import params_hash

log = logging.getLogger("resp.registry")


def register_dense(params: Params, base: dict) -> dict:
    """The dense base model as a version of `resp-{base}-dense` (one per base identity); idempotent."""
    uri = tracking_uri(params)
    with _store_lock(uri):
        client, uri = _client(params, lock=False)
        with _store_errors(uri):
            return _register_dense(client, _experiment_id(client, params), base)


def _register_dense(client, experiment_id: str, base: dict) -> dict:
    name = dense_model_name(base)
    existing = _finished(client, _versions(client, f"name = '{name}' AND tags.base_key = '{base['key']}'"))
    if existing:
        return _info(existing[-1], created=False)
    identity = _identity(base)
    about = {"base": identity}
    config = Path(base["name"]) / "config.json"
    if base.get("content_hash") and config.is_file():
        about["config"] = json.loads(config.read_text())
    tags = {"kind": "dense", "base_name": str(base["name"]), "base_revision": str(base.get("revision")),
            "base_content_hash": str(base.get("content_hash")), "base_key": base["key"]}
    lineage = {"kind": "dense", "model": name, "base": identity}
    description = f"dense base model {base['name']} ({base['key'][:12]})"
    return _create_version(client, experiment_id, f"dense-{base['key'][:12]}", name, description, tags, [],
                           {"base_model.json": json.dumps(about, indent=2, sort_keys=True).encode()},
                           lineage, {"base_key": base["key"]}, {}, [], same_as=f"tags.base_key = '{base['key']}'")


def mask_files(masks_dir: str | Path) -> dict[float, Path]:
    """The `sparsity-<t>.safetensors` masks in `masks_dir`, by target."""
    try:
        return masks_in_dir(masks_dir)
    except ArtifactError as e:
        raise RegistryError(str(e)) from None


def _check_trace_sets(meta: dict, mask_path: Path) -> None:
    for t in meta.get("trace_sets", []):
        path = Path(t["path"])
        if not path.is_file():
            raise RegistryError(f"trace set {path} recorded in {manifest_path(mask_path)} is missing: restore it "
                                "(dvc pull / dvc checkout) or re-run `resp prune`")
        digest = file_digest(path)
        if digest != t["digest"]:
            raise RegistryError(f"trace set {path} was edited after pruning (sha256 {digest[:12]} != recorded "
                                f"{t['digest'][:12]} in {manifest_path(mask_path).name}): restore it or re-run `resp prune`")


def _read_metrics(path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
        if not isinstance(report.get("results"), dict):
            raise KeyError("results")
        return report
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as e:
        raise RegistryError(f"metrics file {path} cannot be read ({type(e).__name__}: {str(e)[:120]}): pass the JSON "
                            "written by `resp evaluate`") from None


def _check_request(params: Params, task: str, method: str) -> None:
    if task not in params.tasks:
        raise RegistryError(f"task {task!r} is not in params.yaml tasks; defined: {sorted(params.tasks)}")
    if method not in params.methods:
        raise RegistryError(f"method {method!r} is unknown; choose one of {', '.join(params.methods)}")


def register_method(params: Params, task: str, method: str, masks_dir: str | Path,
                    exports: dict[float, dict[str, str | Path]] | None = None,
                    metrics: str | Path | None = None) -> list[dict]:
    """Register one version per mask in `masks_dir` (the summary.json beside it is logged too).

    `exports` maps each target to its export directories by format; `metrics` is the evaluation
    JSON of the method (`resp.evaluation.evaluate_masks`). Returns one dict per version
    (name, version, run_id, created, target, sparsity, replaces, parent, base_key).
    """

    _check_request(params, task, method)
    masks = mask_files(masks_dir)
    summary = Path(masks_dir).parent / "summary.json"
    if not summary.is_file():
        raise RegistryError(f"{summary} not found: it is written with the masks by `resp prune`; re-run it")
    report = _read_metrics(metrics) if metrics is not None else None
    expected_hash = params_hash(params, task, method)
    exports = {round(float(t), 6): v for t, v in (exports or {}).items()}
    with _store_lock(tracking_uri(params)):
        client, uri = _client(params, lock=False)
        with _store_errors(uri):
            experiment_id = _experiment_id(client, params)
            _clean_stale_runs(client, experiment_id)
            return _register_masks(client, experiment_id, params, task, method, masks, summary, exports, report,
                                   metrics, expected_hash)


def _register_masks(client, experiment_id, params: Params, task: str, method: str, masks: dict[float, Path],
                    summary: Path, exports: dict, report: dict | None, metrics, expected_hash: str) -> list[dict]:
    from resp.lineage import read_mask

    checked = []
    for target, mask_path in sorted(masks.items()):  # every mask and join checked before anything is created
        mask, meta = read_mask(mask_path)  # refuses a mask edited after it was written
        if meta.get("task") != task or meta.get("method") != method:
            raise RegistryError(f"{mask_path} was made for {meta.get('task')}/{meta.get('method')}, not {task}/{method}")
        if meta["params_hash"] != expected_hash:
            raise RegistryError(f"{mask_path} was made with other params (params hash {meta['params_hash'][:12]} != "
                                f"{expected_hash[:12]} from the given params): register with the params it was made "
                                "with, or re-run `resp prune` (dvc repro)")
        _check_trace_sets(meta, mask_path)
        mask_exports = exports.get(round(target, 6), {})
        _check_joins(mask.digest(), mask_path, target, mask_exports, report, metrics)
        checked.append((mask, meta, mask_path, mask_exports))
    return [_register_mask(client, experiment_id, params, mask, meta, mask_path, summary, mask_exports, report, metrics)
            for mask, meta, mask_path, mask_exports in checked]


def _check_joins(digest: str, mask_path: Path, target: float, exports: dict, report: dict | None, metrics_path) -> None:
    """Metrics and exports given for a mask must have been computed from that mask (by digest)."""
    from resp.lineage import export_digest

    if report is not None:
        result = report.get("results", {}).get(target_key(target))
        if result is not None and result.get("mask_digest") != digest:
            raise RegistryError(f"metrics file {metrics_path} (sparsity {target_key(target)}) was computed from mask "
                                f"{str(result.get('mask_digest'))[:12]}, not {mask_path} ({digest[:12]}): evaluate this "
                                f"run (`resp evaluate --masks-dir {mask_path.parent}`) and pass that --metrics")
    for fmt, directory in sorted(exports.items()):
        made_from = export_digest(directory)
        if Path(directory).is_dir() and made_from != digest:
            raise RegistryError(f"{fmt} export {directory} was made from mask {str(made_from)[:12]}, not {mask_path} "
                                f"({digest[:12]}): re-export this run (`resp export --masks-dir {mask_path.parent}`) "
                                "and pass that --exports-dir")


def _register_mask(client, experiment_id, params: Params, mask: Mask, meta: dict, mask_path: Path,
                   summary: Path, exports: dict[str, str | Path], report: dict | None, metrics_path) -> dict:
    task, method, target = meta["task"], meta["method"], float(meta["target"])
    base, digest, label = meta["model"], mask.digest(), target_key(target)
    name = model_name(base, task, method)
    entries, trace_entries = _mask_entries(params, meta, mask_path, summary, exports)
    numbers = {}
    if report is not None:
        numbers = _result_numbers(report, label, metrics_path)
        entries.append(_entry("metrics", f"metrics/{Path(metrics_path).name}", Path(metrics_path)))
    # what the pruning run that wrote this mask spent, by step kind (resp.cost: the whole run, to its last target)
    run_cost = json.loads(summary.read_text()).get("cost")
    numbers.update(_flat_numbers({"run_cost": run_cost or {}}))

    # The same mask, base and params with byte-identical files is the same version. Anything else
    # (a re-export, new metrics, new code in the manifests) is a new version replacing the old one,
    # so that an audit of the newest version always checks the files now on disk.
    # params_hash names the model by path only: the base identity decides whether it is the same model
    same_as = (f"tags.mask_digest = '{digest}' AND tags.params_hash = '{meta['params_hash']}' "
               f"AND tags.base_key = '{base['key']}' AND tags.artifacts_digest = '{_artifacts_digest(entries)}'")
    existing = _finished(client, _versions(client, f"name = '{name}' AND {same_as}"))
    if existing:
        log.info("%s version %s already holds mask %s of this base with these params and files", name,
                 existing[-1].version, digest[:12])
        return _info(existing[-1], created=False)
    parent = _register_dense(client, experiment_id, base)
    previous = _versions(client, f"name = '{name}' AND tags.target = '{label}'")
    replaces = previous[-1].version if previous else None
    lineage, tags = _pruned_record(meta, name, mask_path, digest, exports, parent, replaces, _artifacts_digest(entries),
                                  run_cost)
    params_flat = {"task": task, "method": method, "target": label, "params_hash": meta["params_hash"],
                   **logged_params(params, "prune", task, method)}
    description = (f"{method} on {task}: parameter sparsity {meta['sparsity']:.4f} (target {label}) "
                   f"of {base['name']} ({base['key'][:12]})")
    params_json = json.dumps(params.model_dump(mode="json"), indent=2, sort_keys=True).encode()
    return _create_version(client, experiment_id, f"{task}-{method}-{label}", name, description, tags, entries,
                           {"params.json": params_json}, lineage, params_flat, numbers,
                           _dataset_inputs(trace_entries), same_as=same_as)


def _mask_entries(params: Params, meta: dict, mask_path: Path, summary: Path,
                  exports: dict[str, str | Path]) -> tuple[list[dict], list[dict]]:
    """The files a pruned version logs (mask, manifest, summary, trace sets and theirs, exports), and the trace sets."""
    trace_entries, trace_manifests = [], []
    for i, t in enumerate(meta.get("trace_sets", [])):
        path = Path(t["path"])
        folder = f"traces/{i}-{_sanitize(t.get('tag', 'traces'))}"
        trace_entries.append(_entry("trace_set", f"{folder}/{path.name}", path, t["digest"], index=i, tag=t.get("tag")))
        manifest = manifest_path(path)
        if manifest.is_file():
            trace_manifests.append(_entry("trace_manifest", f"{folder}/{manifest.name}", manifest, index=i))
    entries = [_entry("mask", f"mask/{mask_path.name}", mask_path),
               _entry("mask_manifest", f"mask/{manifest_path(mask_path).name}", manifest_path(mask_path)),
               _entry("summary", "summary.json", summary), *trace_entries, *trace_manifests]
    for fmt, directory in sorted(exports.items()):
        directory = Path(directory)
        if not directory.is_dir():
            raise RegistryError(f"export directory {directory} not found: run `resp export` first")
        for f in _dir_files(directory):
            rel = f.relative_to(directory).as_posix()
            artifact = f"exports/{fmt}/{rel}" if params.registry.log_exports else None
            entries.append(_entry("export", artifact, f, format=fmt))
    return entries, trace_entries


def _result_numbers(report: dict, label: str, metrics_path) -> dict[str, float]:
    """The numbers of one target's result in a metrics file, as flat metrics."""
    result = report.get("results", {}).get(label)
    if result is None:
        raise RegistryError(f"metrics file {metrics_path} has no results for sparsity {label}: re-run `resp evaluate`")
    return _flat_numbers({k: v for k, v in result.items() if k != "target"})


def _pruned_record(meta: dict, name: str, mask_path: Path, digest: str, exports: dict, parent: dict,
                   replaces: str | None, artifacts: str, run_cost: dict | None) -> tuple[dict, dict]:
    """lineage.json and the searchable tags of a pruned version (the tags repeat what lineage.json says)."""
    task, method, target, base = meta["task"], meta["method"], float(meta["target"]), meta["model"]
    label = target_key(target)
    code = {**(meta.get("code") or {}), "registered_from": _git_commit()}
    dvc = _dvc_stage(mask_path.parent)
    trace_sets = [{k: t.get(k) for k in ("tag", "path", "digest", "sparsity", "at_step", "n",
                                         "mean_completion_tokens", "truncation_rate", "answer_accuracy")}
                  for t in meta.get("trace_sets", [])]
    lineage = {
        "kind": "pruned", "model": name, "task": task, "method": method, "target": target,
        "sparsity": meta["sparsity"], "base": _identity(base), "prompt_ids_digest": meta.get("prompt_ids_digest"),
        "params_hash": meta["params_hash"], "code": code, "dvc": dvc, "trace_sets": trace_sets,
        "mask": {"path": str(mask_path), "digest": digest},
        "exports": {fmt: str(d) for fmt, d in sorted(exports.items())},
        "parent": {"name": parent["name"], "version": parent["version"]}, "replaces": replaces,
        "run_cost": run_cost,
    }
    tags = {
        "kind": "pruned", "task": task, "method": method, "target": label, "sparsity": f"{meta['sparsity']:.6f}",
        "base_name": str(base["name"]), "base_revision": str(base.get("revision")),
        "base_content_hash": str(base.get("content_hash")), "base_key": base["key"],
        "prompt_ids_digest": str(meta.get("prompt_ids_digest")), "params_hash": meta["params_hash"],
        "mask_digest": digest, "artifacts_digest": artifacts,
        "trace_digests": ",".join(t["digest"] for t in trace_sets),
        "trace_tags": ",".join(str(t["tag"]) for t in trace_sets),
        "code_step": str(code.get("step")), "code_digest": str(code.get("digest")),
        "registered_from_commit": str(code["registered_from"]["commit"]),
        "registered_from_dirty": str(code["registered_from"]["dirty"]),
        "dvc_stage": dvc["stage"] if dvc else "none", "dvc_md5": str(dvc.get("md5")) if dvc else "none",
        "parent": f"{parent['name']}/{parent['version']}",
    }
    if replaces is not None:
        tags["replaces"] = str(replaces)
    return lineage, tags
