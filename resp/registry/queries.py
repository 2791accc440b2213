"""Reading the registry: the lineage of a version with every recorded digest checked (`audit`,
`lineage_lines`), the versions a trace set went into, the newest registered base."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from resp.artifacts import file_digest, target_key
from resp.config import Params
from resp.models import IDENTITY_FILES, IDENTITY_SCHEME, LEGACY_IDENTITY_FILES, content_hash
from resp.registry.restore import _fetch_missing
from resp.registry.store import (DIGEST, LINEAGE, RegistryError, _artifact_root, _client, _info, _store_errors,
                                 _versions, dense_model_name)
from resp.registry.versions import _unfinished

log = logging.getLogger("resp.registry")


def _healed_line(healed: dict) -> str:
    h = healed["heal"]
    how = h["mode"] + (f" rank {h['lora_rank']}" if h["mode"] == "lora" else "")
    return (f"healed from mask {healed['pruned_mask']['path']} (digest {healed['pruned_mask']['digest'][:16]}) by teacher "
            f"{healed['teacher']['name']} ({healed['teacher']['key'][:16]}): {h['steps']} steps, {h['loss']}, {how}, "
            f"lr {h['lr']}, seed {h['seed']}, {healed['trained_tokens']} completion tokens")


def latest_base(params: Params, base: dict) -> dict | None:
    """The newest registered dense version of the base model `base` names (None if none yet)."""
    client, uri = _client(params)
    with _store_errors(uri):
        versions = _versions(client, f"name = '{dense_model_name(base)}'")
    return _info(versions[-1], created=False) if versions else None


def versions_with_traces(params: Params, file_or_digest: str) -> dict:
    """Every registered version whose lineage contains the trace set (a file, or its sha256 or a prefix)."""
    path = Path(file_or_digest)
    if path.is_file():
        digest = file_digest(path)
    elif DIGEST.match(file_or_digest):
        digest = file_or_digest
    else:
        raise RegistryError(f"{file_or_digest!r} is neither a trace file nor a sha256 digest (8-64 hex characters)")
    client, uri = _client(params, must_exist=True)
    with _store_errors(uri):
        found = _versions(client, f"tags.trace_digests LIKE '%{digest}%'")
    matches = []
    for v in sorted(found, key=lambda v: (v.name, int(v.version))):
        tags = dict(v.tags)
        digests, labels = tags["trace_digests"].split(","), tags.get("trace_tags", "").split(",")
        used_as = [label for d, label in zip(digests, labels) if d.startswith(digest)]
        matches.append({**_info(v, created=False), "task": tags.get("task"), "method": tags.get("method"),
                        "trace_tags": used_as})
    return {"query": file_or_digest, "digest": digest, "versions": matches}


def _check_file(entry: dict, root: Path | None, restored: bool = False) -> dict:
    local = "not recorded"
    if entry["path"] is not None:
        path = Path(entry["path"])
        local = "missing" if not path.is_file() else ("ok" if file_digest(path) == entry["sha256"] else "mismatch")
    logged = "not logged"
    if entry["artifact"] is not None and root is not None:
        path = root / entry["artifact"]
        logged = "missing" if not path.is_file() else ("ok" if file_digest(path) == entry["sha256"] else "mismatch")
    return {**entry, "local": local, "logged": logged, "restored": restored}


def _problem(check: dict) -> str | None:
    where = check["path"] or check["artifact"]
    what = check["role"].replace("_", " ")
    if check["local"] == "mismatch":
        return f"{what} {where}: local file does not match the recorded sha256 {check['sha256'][:12]} (edited after registration)"
    if check["logged"] == "mismatch":
        return f"{what} {check['artifact']}: logged artifact does not match the recorded sha256 {check['sha256'][:12]}"
    if check["logged"] == "missing":
        return f"{what} {check['artifact']}: logged artifact is missing from the run"
    if check["local"] == "missing" and check["logged"] == "not logged":
        return f"{what} {where}: local file is missing and no copy was logged"
    return None


def audit(params: Params, name: str, version: str | int, fetch: bool = False) -> dict:
    """The lineage of a registered version, with every recorded digest checked.

    Returns the version's tags, its lineage record, one check per file (local file at the
    recorded path and logged copy: ok, mismatch, missing, not recorded/logged), the base-model
    check, and `problems` (one line each; empty when everything verifies). `fetch`: first
    restore the recorded local files that are missing from DVC (`fetch_file`); `restored` lists them.
    """
    from mlflow.exceptions import MlflowException

    client, uri = _client(params, must_exist=True)
    with _store_errors(uri):
        try:
            mv = client.get_model_version(name, str(version))
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise RegistryError(f"model {name!r} version {version} is not in the registry at {uri}: "
                                "find versions with `resp audit --traces FILE` or in the MLflow UI") from None
        broken = _unfinished(client, mv)
        if broken is not None:
            tags = dict(mv.tags)
            raise RegistryError(f"{name} version {version} is broken: {broken}; `resp register --task {tags.get('task')} "
                                f"--method {tags.get('method')}` withdraws it and registers its mask again")
        run = client.get_run(mv.run_id)
        tags = dict(mv.tags)
        problems: list[str] = []
        with _artifact_root(client, run) as root:
            record = root / LINEAGE
            if not record.is_file():
                raise RegistryError(f"run {mv.run_id} of {name} version {version} has no {LINEAGE}: "
                                    "it was not registered by resp")
            if file_digest(record) != tags.get("lineage_digest"):
                if fetch:
                    raise RegistryError(f"{LINEAGE} of run {mv.run_id} ({name} version {version}) does not match the "
                                        "version's lineage_digest tag: its digests cannot be trusted, so nothing was "
                                        "fetched; audit without --fetch and re-register the model")
                problems.append(f"{LINEAGE} of run {mv.run_id} does not match the version's lineage_digest tag")
            lineage = json.loads(record.read_text())
            restored = _fetch_missing(lineage.get("files", [])) if fetch else set()
            checks = [_check_file(e, root, e["path"] in restored) for e in lineage.get("files", [])]
            joins = _join_checks(lineage, checks, root)
    problems += [p for p in map(_problem, checks) if p]
    problems += [j["problem"] for j in joins if j["problem"]]
    tag_checks = _tag_checks(tags, lineage)
    problems += [t["problem"] for t in tag_checks if t["problem"]]
    base = lineage["base"]
    base_check = "not checked (hub revision)" if not base.get("content_hash") else "missing"
    base_note = None
    if base.get("content_hash") and base.get("content_files") != IDENTITY_SCHEME:
        base_note = ("registered before the tokenizer, chat template and generation config joined the base model's "
                     "identity: only its weights and config.json are checked; re-register to cover them")
    if base.get("content_hash") and Path(base["name"]).is_dir():
        current = content_hash(base["name"], IDENTITY_FILES if base_note is None else LEGACY_IDENTITY_FILES)
        base_check = "ok" if current == base["content_hash"] else "mismatch"
        if base_check == "mismatch":
            problems.append(f"base model {base['name']}: its content (sha256 {current[:12]}) changed since "
                            f"registration (recorded {base['content_hash'][:12]})")
    return {"name": name, "version": str(version), "run_id": mv.run_id, "tracking_uri": uri, "tags": tags,
            "lineage": lineage, "checks": checks, "joins": joins, "tag_checks": tag_checks, "base_check": base_check,
            "base_note": base_note, "problems": problems, "restored": sorted(restored)}


def _tag_checks(tags: dict, lineage: dict) -> list[dict]:
    """The version's searchable tags must say what its (digest-verified) lineage.json says: a tag edited
    in the registry would send `--traces` queries and re-registration to the wrong version."""
    base = lineage.get("base") or {}
    expected = {"kind": lineage.get("kind"), "base_key": base.get("key"),
                "base_content_hash": str(base.get("content_hash")), "base_revision": str(base.get("revision"))}
    if lineage.get("kind") == "pruned":
        trace_sets = lineage.get("trace_sets") or []
        expected.update({"task": lineage.get("task"), "method": lineage.get("method"),
                         "target": target_key(float(lineage["target"])), "mask_digest": lineage["mask"]["digest"],
                         "params_hash": lineage.get("params_hash"),
                         "prompt_ids_digest": str(lineage.get("prompt_ids_digest")),
                         "trace_digests": ",".join(t["digest"] for t in trace_sets)})
    checks = []
    for tag, value in expected.items():
        found = tags.get(tag)
        checks.append({"tag": tag, "value": found,
                       "problem": None if found == value else
                       f"registry tag {tag}={str(found)[:16]} does not match lineage.json ({str(value)[:16]}): the tag "
                       "was edited after registration; re-register the model"})
    return checks


def _readable(check: dict, root: Path) -> Path | None:
    """The logged copy of a checked file when it verifies, else the local file when it does."""
    if check["logged"] == "ok":
        return root / check["artifact"]
    if check["local"] == "ok":
        return Path(check["path"])
    return None


def _join_checks(lineage: dict, checks: list[dict], root: Path) -> list[dict]:
    """The metrics and every export of a pruned version must have been computed from its mask."""
    from resp.lineage import EXPORT_MANIFEST

    if lineage.get("kind") != "pruned":
        return []
    digest, label = lineage["mask"]["digest"], target_key(float(lineage["target"]))
    joins = []
    for c in checks:
        source = _readable(c, root)
        if c["role"] == "metrics" and source is not None:
            try:
                made_from = json.loads(source.read_text())["results"][label].get("mask_digest")
            except (ValueError, KeyError, TypeError, AttributeError):
                made_from = None
            joins.append({"join": "metrics", "path": c["path"], "mask_digest": made_from,
                          "problem": None if made_from == digest else
                          f"metrics {c['path'] or c['artifact']} (sparsity {label}) were computed from mask "
                          f"{str(made_from)[:12]}, not this version's mask {digest[:12]}"})
        elif c["role"] == "export" and Path(c["path"] or c["artifact"]).name == EXPORT_MANIFEST and source is not None:
            try:
                made_from = json.loads(source.read_text()).get("mask_digest")
            except (ValueError, AttributeError):
                made_from = None
            joins.append({"join": f"export {c.get('format')}", "path": c["path"], "mask_digest": made_from,
                          "problem": None if made_from == digest else
                          f"{c.get('format')} export {Path(c['path'] or c['artifact']).parent} was made from mask "
                          f"{str(made_from)[:12]}, not this version's mask {digest[:12]}"})
    return joins


def _status(check: dict) -> str:
    restored = " (restored from DVC)" if check.get("restored") else ""
    return f"local {check['local']}{restored}, logged {check['logged']}"


def lineage_lines(report: dict) -> list[str]:
    """`audit`'s report as an indented tree, base model first, one line per artifact."""
    lin, tags = report["lineage"], report["tags"]
    base = lin["base"]
    lines = [f"{report['name']} version {report['version']} (run {report['run_id']}, {report['tracking_uri']})"]
    ident = f"revision {base['revision']}" if base.get("revision") else f"content sha256 {str(base.get('content_hash'))[:16]}"
    lines.append(f"base model {base['name']} {ident} [{report['base_check']}]")
    if report.get("base_note"):
        lines.append(f"  note: {report['base_note']}")
    if lin["kind"] == "dense":
        lines += [f"  {c['role']} {c['artifact']} sha256 {c['sha256'][:16]} [{_status(c)}]" for c in report["checks"]]
        return lines
    by_role: dict[str, list[dict]] = {}
    for c in report["checks"]:
        by_role.setdefault(c["role"], []).append(c)
    lines.append(f"  prompt ids sha256 {str(lin['prompt_ids_digest'])[:16]}")
    lines.append("    trace sets")
    manifests = {c["index"]: c for c in by_role.get("trace_manifest", [])}
    for c in by_role.get("trace_set", []):
        ts = lin["trace_sets"][c["index"]]
        sparsity = ts.get("sparsity") if ts.get("sparsity") is not None else 0.0
        manifest = manifests.get(c["index"])
        about = f", manifest {'ok' if manifest and not _problem(manifest) else 'does not verify'}" if manifest else ""
        lines.append(f"      {ts['tag']:<16} sparsity {sparsity:.4f}  {c['path']}  sha256 {c['sha256'][:16]} "
                     f"[{_status(c)}{about}]")
    for c in by_role.get("mask", []):
        lines.append(f"        mask {c['path']} (target {target_key(lin['target'])}, sparsity {lin['sparsity']:.4f}, "
                     f"mask digest {lin['mask']['digest'][:16]}) [{_status(c)}]")
    for role in ("mask_manifest", "summary", "metrics", "generated", "heal_manifest"):
        for c in by_role.get(role, []):
            lines.append(f"          {role.replace('_', ' ')} {c['path'] or c['artifact']} [{_status(c)}]")
    exports = by_role.get("export", [])
    for fmt, directory in lin["exports"].items():
        files = [c for c in exports if c.get("format") == fmt]
        bad = [c for c in files if _problem(c)]
        state = "ok" if not bad else f"{len(bad)} of {len(files)} files do not verify"
        lines.append(f"          export {fmt} {directory} ({len(files)} files) [{state}]")
    for j in report.get("joins", []):
        lines.append(f"          {j['join']} made from mask {str(j['mask_digest'])[:16]} "
                     f"[{'ok' if not j['problem'] else 'not this version' + chr(39) + 's mask'}]")
    if lin["kind"] == "healed":
        lines.append(_healed_line(lin["healed"]))
    code = lin.get("code") or {}
    dvc = lin.get("dvc")
    source = code.get("registered_from") or {}
    lines.append(f"params sha256 {lin['params_hash'][:16]}, code of step {code.get('step')} sha256 "
                 f"{str(code.get('digest'))[:16]} (registered from commit {source.get('commit')}, "
                 f"dirty: {source.get('dirty')}), "
                 f"dvc stage {dvc['stage'] + ' md5 ' + str(dvc['md5']) if dvc else 'none'}")
    lines.append(f"parent {tags.get('parent')}" + (f", replaces version {tags['replaces']}" if tags.get("replaces") else ""))
    tag_checks = report.get("tag_checks", [])
    wrong = [t["tag"] for t in tag_checks if t["problem"]]
    lines.append(f"registry tags: {len(tag_checks) - len(wrong)} of {len(tag_checks)} agree with {LINEAGE}"
                 + (f" (not: {', '.join(wrong)})" if wrong else ""))
    return lines
