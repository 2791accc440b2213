"""Creating a version: log its files, verify the logged copies, then register; withdraw versions whose
registration was killed; what a version records of the code (commit) and of DVC (stage)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import yaml

from resp.artifacts import file_digest
from resp.config import Params
from resp.registry.store import (DATASET_DIGEST_CHARS, LINEAGE, RegistryError, _artifact_root, _info,
                                 _local_artifact_root, _versions)
from resp.stages.table import stage_params

log = logging.getLogger("resp.registry")


def _finished(client, versions: list) -> list:
    """`versions` less those whose registration never finished, which are withdrawn (a version left
    by a killed registration would otherwise count as registered and never verify)."""
    kept = []
    for v in versions:
        why = _unfinished(client, v)
        if why is None:
            kept.append(v)
        else:
            _withdraw(client, v, why)
    return kept


def _flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as dotted keys (lists, booleans and strings left out)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_numbers(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _dir_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _dvc_stage(path: Path) -> dict | None:
    """The dvc.lock stage (in the working directory) whose output holds `path`, if any."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        log.warning("dvc.lock is not valid YAML; registering without the DVC stage")
        return None
    target = path.resolve()
    for name, stage in stages.items():
        for out in stage.get("outs", []) or []:
            out_path = Path(out["path"]).resolve()
            if target == out_path or out_path in target.parents:
                return {"stage": name, "out": out["path"], "md5": out.get("md5")}
    return None


def _entry(role: str, artifact: str | None, path: Path | None, sha256: str | None = None, **extra) -> dict:
    return {"role": role, "artifact": artifact, "path": None if path is None else str(path),
            "sha256": sha256 or file_digest(path), **extra}


def _artifacts_digest(entries: list[dict]) -> str:
    """sha256 over what each file is (role, artifact name or local path) and its sha256."""
    rows = sorted((e["role"], e["artifact"] or e["path"] or "", e["sha256"]) for e in entries)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _log_entries(client, run_id: str, entries: list[dict]) -> None:
    """Log every entry with a local file under its artifact path (same basename)."""
    for e in entries:
        if e["artifact"] is None or e["path"] is None:
            continue
        if Path(e["path"]).name != Path(e["artifact"]).name:
            raise RegistryError(f"internal: artifact {e['artifact']} must keep the name of {e['path']}")
        parent = str(Path(e["artifact"]).parent)
        client.log_artifact(run_id, e["path"], None if parent == "." else parent)


def _verify_logged(client, run, entries: list[dict]) -> None:
    """Compare the digest of every logged file with the one computed from the local file."""
    with _artifact_root(client, run) as root:
        for e in entries:
            if e["artifact"] is None:
                continue
            logged = root / e["artifact"]
            if not logged.is_file():
                raise RegistryError(f"logged artifact {e['artifact']} is missing from run {run.info.run_id}: "
                                    "the artifact store did not keep it; check its free space and permissions")
            digest = file_digest(logged)
            if digest != e["sha256"]:
                raise RegistryError(f"logged artifact {e['artifact']} does not match its source {e['path']} "
                                    f"(sha256 {digest[:12]} != {e['sha256'][:12]}): nothing was registered; retry")


def _discard_run(client, run) -> None:
    """Delete a half-made run and (for a local store) its artifact folder."""
    try:
        client.delete_run(run.info.run_id)
    finally:
        local = _local_artifact_root(run.info.artifact_uri)
        if local is not None and local.exists():
            shutil.rmtree(local.parent if local.name == "artifacts" else local, ignore_errors=True)


def _create_version(client, experiment_id: str, run_name: str, name: str, description: str, tags: dict,
                    entries: list[dict], generated: dict[str, bytes], lineage: dict, params_flat: dict,
                    metrics: dict, datasets: list, same_as: str | None = None) -> dict:
    """Log, verify, then register. `generated` maps artifact paths to bytes written here (params.json)."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, "mlflow.note.content": description,
                                                                      "resp.pid": str(os.getpid()),
                                                                      "resp.host": socket.gethostname()})
    created_model = False
    try:
        with tempfile.TemporaryDirectory(prefix="resp-register-") as tmp:
            for artifact, body in generated.items():
                local = Path(tmp) / artifact
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(body)
                entries.append(_entry("generated", artifact, local))
            _log_entries(client, run.info.run_id, entries)
            lineage["files"] = [{**e, "path": None} if e["role"] == "generated" else e for e in entries]
            body = json.dumps(lineage, indent=2, sort_keys=True).encode()
            (Path(tmp) / LINEAGE).write_bytes(body)
            client.log_artifact(run.info.run_id, str(Path(tmp) / LINEAGE))
            lineage_entry = _entry("lineage", LINEAGE, Path(tmp) / LINEAGE)
            _verify_logged(client, run, [*entries, lineage_entry])
        tags = {**tags, "lineage_digest": lineage_entry["sha256"]}
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params_flat.items())],
                         metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())])
        if datasets:
            client.log_inputs(run.info.run_id, datasets)
        client.set_tag(run.info.run_id, "lineage_digest", lineage_entry["sha256"])
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name, description=f"RESP models: {name}")
            created_model = True
        version = client.create_model_version(name, run.info.artifact_uri, run.info.run_id, tags=tags,
                                              description=description)
        client.set_terminated(run.info.run_id, "FINISHED")
    except BaseException:
        _discard_run(client, run)
        if created_model:
            client.delete_registered_model(name)
        raise
    # One version per identity, enforced: a concurrent registration of the same files (a store no
    # lock serialises, e.g. a shared server) keeps the oldest version and withdraws the others.
    same = _versions(client, f"name = '{name}' AND {same_as}") if same_as else []
    if same and int(same[0].version) < int(version.version):
        log.info("%s version %s was registered concurrently with the same files; withdrawing version %s", name,
                 same[0].version, version.version)
        client.delete_model_version(name, version.version)
        _discard_run(client, run)
        return _info(same[0], created=False)
    log.info("registered %s version %s (run %s)", name, version.version, run.info.run_id)
    return _info(version, created=True)


def _clean_stale_runs(client, experiment_id: str) -> None:
    """Runs left RUNNING by a registration that was killed (its process on this host is gone):
    a version already created on such a run is withdrawn (it is registered again by this
    registration), and the run is marked FAILED and deleted with its artifacts."""
    host = socket.gethostname()
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        if _killed(run, host):
            for v in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
                _withdraw(client, v, f"its registration (pid {run.data.tags.get('resp.pid')}) was killed before it "
                                     "finished")
            log.warning("run %s of a killed registration (pid %s) is marked failed and deleted", run.info.run_id,
                        run.data.tags.get("resp.pid"))
            client.set_terminated(run.info.run_id, "FAILED")
            _discard_run(client, run)


def _killed(run, host: str) -> bool:
    from resp.locking import pid_alive

    pid = run.data.tags.get("resp.pid", "")
    return run.data.tags.get("resp.host") == host and pid.isdigit() and not pid_alive(int(pid))


def _unfinished(client, version) -> str | None:
    """Why a version can never verify (its run was not finished: killed mid-registration), or None."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(version.run_id)
    except MlflowException:
        return f"its run {version.run_id} is gone"
    if run.info.lifecycle_stage == "deleted":
        return f"its run {version.run_id} was deleted"
    if run.info.status == "FINISHED":
        return None
    if run.info.status == "RUNNING" and not _killed(run, socket.gethostname()):
        return None   # being registered right now (or on another host): not ours to judge
    return f"its run {version.run_id} was never finished (status {run.info.status}: the registration was killed)"


def _withdraw(client, version, why: str) -> None:
    log.warning("%s version %s is withdrawn: %s; the mask is registered again", version.name, version.version, why)
    client.delete_model_version(version.name, version.version)


def _dataset_inputs(trace_entries: list[dict]) -> list:
    """Each trace set as an MLflow dataset input: its prompt ids and lengths, named by tag."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for e in trace_entries:
        rows = [json.loads(line) for line in Path(e["path"]).read_text().splitlines() if line.strip()]
        frame = pd.DataFrame({"prompt_id": [r["prompt_id"] for r in rows],
                              "completion_tokens": [len(r["completion_ids"]) for r in rows],
                              "truncated": [bool(r["truncated"]) for r in rows]})
        with warnings.catch_warnings():
            # MLflow registers its local artifact source twice and warns that a path is ambiguous, and
            # hints that integer columns cannot hold missing values (these have none)
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=str(Path(e["path"]).resolve()), name=e["tag"],
                                              digest=e["sha256"][:DATASET_DIGEST_CHARS])._to_mlflow_entity()
        context = "calibration" if e["index"] == 0 else "regeneration"
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context), InputTag("sha256", e["sha256"])]))
    return inputs


def _git_commit() -> dict:
    """The commit of the checkout registering, and whether its code (resp/, flows/) has uncommitted changes.
    The artifacts themselves record their code by content (`resp.stages.table.code_record`)."""
    root = Path(__file__).resolve().parents[2]   # the checkout: resp/registry/versions.py
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # only code counts: `dvc repro` itself rewrites dvc.lock and data/ while it runs
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "resp", "flows",
                                     "pyproject.toml"], cwd=root, capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def logged_params(params: Params, stage: str, task: str, method: str) -> dict:
    """The params a version logs: every section its stage declares (`resp.stages.table`), one level deep."""

    flat = {}
    for section, value in stage_params(params, stage, task=task, method=method).items():
        if isinstance(value, dict):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    return flat
