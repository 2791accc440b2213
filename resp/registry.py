"""The MLflow model registry: lineage of every pruned model, and its audit (after method step 10).

One registered model per (base model, task, method), `resp-{base}-{task}-{method}`, holds one
version per saved sparsity. The dense base model is `resp-{base}-dense`, one version per base
identity (hub revision or content hash), and each pruned version's `parent` tag names it.

A version's run holds the mask and its manifest, the method's summary, every trace set the
method calibrated on (dense and regenerated, also logged as MLflow inputs), the exports, the
metrics, the params and `lineage.json`: what produced the model, with the sha256 of every
logged file and the local path it came from, and what its pruning run spent (`run_cost`, the
summary's cost by step kind, also logged as `run_cost.*` metrics). Tags repeat the searchable keys (base_key,
trace_digests, prompt_ids_digest, params_hash, mask_digest, code digest, DVC stage, parent, replaces),
so lineage answers both ways: `audit` walks from a version to its inputs and verifies every
digest; `versions_with_traces` lists the versions a trace set went into.

A version is created only after its files are logged and their logged copies verified; any
failure before that deletes the half-made run. A registration killed after creating its version
but before finishing its run leaves a version that can never verify: `audit` names it as broken,
and the next registration withdraws it and registers the mask again. Reading the registry
(`audit`, `versions_with_traces`) never creates a store. Registering the same mask of the same base
model with the same params and byte-identical files again returns the existing version; if any
file changed (a re-export, new metrics), a new version replaces it. This is the only module of
`resp` that imports MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from resp.artifacts import ArtifactError, atomic_path, file_digest, manifest_path, mask_file, masks_in_dir, target_key
from resp.config import Params
from resp.masks import Mask
from resp.models import IDENTITY_FILES, IDENTITY_SCHEME, LEGACY_IDENTITY_FILES, content_hash

log = logging.getLogger(__name__)

DIGEST = re.compile(r"^[0-9a-f]{8,64}$")
LINEAGE = "lineage.json"
# MLflow stores a dataset digest in 36 characters; the full sha256 goes into an input tag.
DATASET_DIGEST_CHARS = 32


class RegistryError(ValueError):
    """The registry cannot be reached, or what is to be registered/audited is inconsistent."""


# ---------------------------------------------------------------- store access

def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI when set (shared servers are configuration), else registry.tracking_uri."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.registry.tracking_uri


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextmanager
def _store_errors(uri: str):
    """Turn MLflow/SQLAlchemy store failures into one-line errors naming the store and the fix."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as e:  # MLflow raises MlflowException, SQLAlchemy errors and requests errors alike
        text = str(e)
        if "database is locked" in text:
            raise RegistryError(
                f"tracking store {uri} is locked by another process (sqlite 'database is locked'): wait for the other "
                f"writer to finish, or serve the store with `mlflow server --backend-store-uri {uri}` and set "
                "MLFLOW_TRACKING_URI to the server's URL") from None
        if any(s in text for s in ("unable to open database file", "Max retries exceeded", "Connection refused",
                                   "Failed to establish a new connection")):
            raise RegistryError(f"tracking store {uri} is unreachable ({_first_line(e)[:160]}): start it, or set "
                                "registry.tracking_uri (or MLFLOW_TRACKING_URI) to a reachable store") from None
        raise


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(unquote(rest))


STORE_WAIT_S = 600.0   # a registration waits this long for another writer of the same sqlite store


@contextmanager
def _store_lock(uri: str):
    """Serialise writers of one sqlite store (and its first initialisation) across processes."""
    from resp.locking import exclusive

    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    _check_sqlite(uri, db)  # before the lock file is made: never a folder for a mistyped path
    with exclusive(db, "tracking store", "wait for the other registration to finish", wait_s=STORE_WAIT_S):
        yield


def _check_sqlite(uri: str, db: Path, must_exist: bool = False) -> None:
    folder = db.absolute().parent
    if not folder.is_dir():
        raise RegistryError(f"tracking store {uri}: folder {folder} does not exist (a mistyped path would create a "
                            "new, empty store): fix registry.tracking_uri (or MLFLOW_TRACKING_URI) or create the folder")
    if db.exists() and not db.is_file():
        raise RegistryError(f"tracking store {uri}: {db} is not a file: fix registry.tracking_uri")
    if must_exist and not db.exists():
        raise RegistryError(f"tracking store {uri}: {db} does not exist, so nothing is registered there (nothing was "
                            "created): fix registry.tracking_uri (or MLFLOW_TRACKING_URI)")


def _check_reachable(uri: str, timeout_s: float, must_exist: bool = False) -> None:
    """Before MLflow's own retries (minutes): a sqlite file's folder exists (and, for reading, the file:
    MLflow would create an empty store), a server answers."""
    db = _sqlite_path(uri)
    if db is not None:
        _check_sqlite(uri, db, must_exist)
        return
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import socket

        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
                pass
        except OSError as e:
            reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
            raise RegistryError(f"tracking store {uri} is unreachable ({reason} within {timeout_s:g} s): start it, or set "
                                "registry.tracking_uri (or MLFLOW_TRACKING_URI) to a reachable store") from None


def _client(params: Params, lock: bool = True, must_exist: bool = False):
    """A client of the tracking store; `must_exist` for queries (audit): a missing sqlite file is an error."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    uri = tracking_uri(params)
    _check_reachable(uri, params.registry.connect_timeout_s, must_exist)
    from mlflow import MlflowClient

    try:
        with _store_errors(uri), (_store_lock(uri) if lock else _nothing()):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_registered_models(max_results=1)  # open the store now, not halfway through a registration
    except RegistryError:
        raise
    except Exception as e:
        raise RegistryError(f"tracking store {uri} cannot be opened ({_first_line(e)[:160]}): set "
                            "registry.tracking_uri (or MLFLOW_TRACKING_URI) to e.g. sqlite:///mlflow.db or "
                            "http://host:5000") from None
    return client, uri


@contextmanager
def _nothing():
    yield


def _experiment_id(client, params: Params) -> str:
    name = params.registry.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = params.registry.artifact_location
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _local_artifact_root(artifact_uri: str) -> Path | None:
    parsed = urlparse(artifact_uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


@contextmanager
def _artifact_root(client, run):
    """The run's artifact folder: in place for a local store, else a downloaded copy."""
    local = _local_artifact_root(run.info.artifact_uri)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="resp-audit-") as tmp:
        yield Path(client.download_artifacts(run.info.run_id, "", tmp))


# ---------------------------------------------------------------- names and small helpers

def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def base_name(base: dict) -> str:
    """Short name of a base model: a local directory's name, or the hub id with '/' as '-'."""
    name = base["name"]
    return _sanitize(Path(name).name if base.get("content_hash") else name.replace("/", "-"))


def model_name(base: dict, task: str, method: str) -> str:
    return _sanitize(f"resp-{base_name(base)}-{task}-{method}")


def dense_model_name(base: dict) -> str:
    return _sanitize(f"resp-{base_name(base)}-dense")


def _identity(base: dict) -> dict:
    """The base model as lineage records it; a content hash names the files it covers (old records: weights and config)."""
    identity = {k: base.get(k) for k in ("name", "revision", "content_hash", "key")}
    if base.get("content_hash"):
        identity["content_files"] = IDENTITY_SCHEME
    return identity


def _versions(client, filter_string: str) -> list:
    return sorted(client.search_model_versions(filter_string), key=lambda v: int(v.version))


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


def _info(version, created: bool) -> dict:
    tags = dict(version.tags)
    return {"name": version.name, "version": str(version.version), "run_id": version.run_id, "created": created,
            "target": tags.get("target"), "sparsity": tags.get("sparsity"), "replaces": tags.get("replaces"),
            "parent": tags.get("parent"), "base_key": tags.get("base_key")}


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


# ---------------------------------------------------------------- logging and verifying a run

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


# ---------------------------------------------------------------- registration

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


def _git_commit() -> dict:
    """The commit of the checkout registering, and whether its code (resp/, flows/) has uncommitted changes.
    The artifacts themselves record their code by content (`steps.code_record`)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # only code counts: `dvc repro` itself rewrites dvc.lock and data/ while it runs
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "resp", "flows",
                                     "pyproject.toml"], cwd=root, capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


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
    from resp.steps import params_hash

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
    base = meta["model"]
    name = model_name(base, task, method)
    digest = mask.digest()
    label = target_key(target)

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
    numbers = {}
    if report is not None:
        result = report.get("results", {}).get(label)
        if result is None:
            raise RegistryError(f"metrics file {metrics_path} has no results for sparsity {label}: re-run `resp evaluate`")
        numbers = _flat_numbers({k: v for k, v in result.items() if k != "target"})
        entries.append(_entry("metrics", f"metrics/{Path(metrics_path).name}", Path(metrics_path)))

    # The same mask, base and params with byte-identical files is the same version. Anything else
    # (a re-export, new metrics, new code in the manifests) is a new version replacing the old one,
    # so that an audit of the newest version always checks the files now on disk.
    artifacts = _artifacts_digest(entries)
    # params_hash names the model by path only: the base identity decides whether it is the same model
    existing = _finished(client, _versions(client, f"name = '{name}' AND tags.mask_digest = '{digest}' "
                                                   f"AND tags.params_hash = '{meta['params_hash']}' "
                                                   f"AND tags.base_key = '{base['key']}' "
                                                   f"AND tags.artifacts_digest = '{artifacts}'"))
    if existing:
        log.info("%s version %s already holds mask %s of this base with these params and files", name,
                 existing[-1].version, digest[:12])
        return _info(existing[-1], created=False)
    parent = _register_dense(client, experiment_id, base)
    previous = _versions(client, f"name = '{name}' AND tags.target = '{label}'")
    replaces = previous[-1].version if previous else None

    code = {**(meta.get("code") or {}), "registered_from": _git_commit()}
    # what the pruning run that wrote this mask spent, by step kind (resp.cost: the whole run, to its last target)
    run_cost = json.loads(summary.read_text()).get("cost")
    numbers.update(_flat_numbers({"run_cost": run_cost or {}}))
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
        "parent": {"name": parent["name"], "version": parent["version"]}, "replaces": replaces, "run_cost": run_cost,
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
    params_flat = {"task": task, "method": method, "target": label, "params_hash": meta["params_hash"],
                   **{f"{section}.{k}": v for section in ("calibration", "generation", "importance", "prune")
                      for k, v in getattr(params, section).model_dump().items()}}
    description = (f"{method} on {task}: parameter sparsity {meta['sparsity']:.4f} (target {label}) "
                   f"of {base['name']} ({base['key'][:12]})")
    params_json = json.dumps(params.model_dump(mode="json"), indent=2, sort_keys=True).encode()
    same_as = (f"tags.mask_digest = '{digest}' AND tags.params_hash = '{meta['params_hash']}' "
               f"AND tags.base_key = '{base['key']}' AND tags.artifacts_digest = '{artifacts}'")
    return _create_version(client, experiment_id, f"{task}-{method}-{label}", name, description, tags, entries,
                           {"params.json": params_json}, lineage, params_flat, numbers,
                           _dataset_inputs(trace_entries), same_as=same_as)


# ---------------------------------------------------------------- healed versions (resp heal)

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


def _healed_line(healed: dict) -> str:
    h = healed["heal"]
    how = h["mode"] + (f" rank {h['lora_rank']}" if h["mode"] == "lora" else "")
    return (f"healed from mask {healed['pruned_mask']['path']} (digest {healed['pruned_mask']['digest'][:16]}) by teacher "
            f"{healed['teacher']['name']} ({healed['teacher']['key'][:16]}): {h['steps']} steps, {h['loss']}, {how}, "
            f"lr {h['lr']}, seed {h['seed']}, {healed['trained_tokens']} completion tokens")


def _register_healed(client, experiment_id, params: Params, healed_dir: Path, heal: dict, mask: Mask, mask_path: Path,
                     exports: dict, report: dict | None, metrics_path) -> dict:
    from resp.artifacts import json_digest
    from resp.steps import step_params

    task, method, target = heal["task"], heal["method"], float(heal["target"])
    teacher, label = heal["teacher"], target_key(target)
    pruned_digest = heal["mask"]["digest"]
    parents = _versions(client, f"tags.kind = 'pruned' AND tags.mask_digest = '{pruned_digest}' "
                                f"AND tags.base_key = '{teacher['key']}'")
    if not parents:
        raise RegistryError(f"the pruned model healed here (mask {heal['mask']['path']}, digest {pruned_digest[:12]}) is "
                            "not registered: register its run first (`resp register`), then the healed model")
    parent = _info(parents[-1], created=False)
    name = model_name(teacher, task, method)
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
    params_hash = json_digest(step_params(params, "heal", task=task, method=method))
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
                   **{f"heal.{k}": v for k, v in h.items()}}
    description = (f"{method} on {task}: {label} mask of {teacher['name']} healed {h['steps']} steps ({h['loss']}, "
                   f"{h['mode']}) on the dense model's traces; parent {parent['name']}/{parent['version']}")
    params_json = json.dumps(params.model_dump(mode="json"), indent=2, sort_keys=True).encode()
    return _create_version(client, experiment_id, f"{task}-{method}-{label}-healed", name, description, tags, entries,
                           {"params.json": params_json}, lineage, params_flat, numbers, _dataset_inputs(trace_entries),
                           same_as=same_as)


# ---------------------------------------------------------------- queries

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


# ---------------------------------------------------------------- restoring files from DVC

def _dvc_command() -> str:
    """The dvc installed with this Python, else the one on PATH."""
    found = shutil.which("dvc", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise RegistryError("the dvc command is not installed: `pip install dvc` (with your remote's extra, e.g. "
                            "'dvc[s3]'), then run `resp audit --fetch` again")
    return found


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_dvc_command(), *args], cwd=project, capture_output=True, text=True)


def _dvc_project(path: Path) -> Path | None:
    """The nearest folder above `path` holding a `.dvc` folder."""
    return next((folder for folder in path.absolute().parents if (folder / ".dvc").is_dir()), None)


def _dvc_reason(result: subprocess.CompletedProcess) -> str:
    """DVC's first error line, without its prefixes."""
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    text = (errors or lines or [f"dvc exited with status {result.returncode}"])[0]
    return text.removeprefix("ERROR: ").removeprefix("unexpected error - ")[:200]


def _fetch_error(project: Path, what: str, path: Path, name: str, result: subprocess.CompletedProcess) -> RegistryError:
    reason = _dvc_reason(result)
    if reason == repr([name]):   # how `dvc get` says that no output of this checkout holds the file
        return RegistryError(f"{what} {path} is not tracked by DVC in {project} (no output of its dvc.yaml or .dvc files "
                             "holds it in this checkout): check out the commit whose dvc.lock recorded it, or re-run "
                             "the stage that writes it (`dvc repro`)")
    remote = _dvc(project, "remote", "default")
    remote_name = remote.stdout.strip() if remote.returncode == 0 else ""
    if not remote_name:
        return RegistryError(f"{what} {path} is not in the DVC cache of {project} and no default DVC remote is configured "
                             f"({reason}): add the remote its producer pushes to (`dvc remote add -d storage URL`), "
                             "then run `resp audit --fetch` again")
    return RegistryError(f"{what} {path} cannot be fetched from DVC remote {remote_name!r} ({reason}): run `dvc push` on the "
                         "machine that produced it (or fix the remote's URL and credentials), then `resp audit --fetch` again")


def fetch_file(path: str | Path, sha256: str, what: str = "file") -> Path:
    """Restore the missing file `path` from the DVC cache or default remote of the project holding
    it, and keep it only if its sha256 is `sha256`.

    `dvc get` writes only the file it is told to: a `dvc pull`/`dvc checkout` of one file of a
    directory output that fails (object missing) deletes the whole directory, edited files
    included. The fetched copy is verified before it is renamed into place.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise RegistryError(f"{what} {path} exists: only a missing file is fetched, an existing one is never replaced")
    project = _dvc_project(path)
    if project is None:
        raise RegistryError(f"{what} {path} is missing and no DVC project holds it (no .dvc folder above it): run "
                            "`resp audit --fetch` in the clone of the project that produced it")
    missing_dirs = [folder for folder in path.absolute().parents if not folder.exists()]  # nearest first
    try:
        with atomic_path(path) as tmp:
            name = path.absolute().relative_to(project).as_posix()
            result = _dvc(project, "get", str(project), name, "-o", str(tmp))
            if result.returncode != 0 or not tmp.is_file():
                raise _fetch_error(project, what, path, name, result)
            digest = file_digest(tmp)
            if digest != sha256:
                raise RegistryError(f"{what} {path} fetched from DVC does not match the registry (sha256 {digest[:12]} != "
                                    f"recorded {sha256[:12]}); nothing was written: check out the dvc.lock that recorded "
                                    "the registered file (`git log -- dvc.lock`) and fetch again, or `dvc push` it from "
                                    "the machine that produced it")
            if os.path.lexists(path):
                raise RegistryError(f"{what} {path} appeared while it was fetched: it was kept as it is; audit again")
    except BaseException:
        for folder in missing_dirs:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    log.info("restored %s %s from DVC (sha256 %s verified)", what, path, sha256[:12])
    return path


def _fetch_missing(entries: list[dict]) -> set[str]:
    """Restore every recorded local file that is missing (see `fetch_file`); the paths restored."""
    restored = set()
    for e in entries:
        if e["path"] is not None and not os.path.lexists(e["path"]):
            fetch_file(e["path"], e["sha256"], e["role"].replace("_", " "))
            restored.add(e["path"])
    return restored


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
