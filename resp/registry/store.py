"""The tracking store: reaching it (one-line errors naming the fix), one writer at a time for a sqlite
file, the experiment, run artifact folders, and the names of registered models."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from resp.config import Params
from resp.models import IDENTITY_SCHEME

log = logging.getLogger("resp.registry")


DIGEST = re.compile(r"^[0-9a-f]{8,64}$")


LINEAGE = "lineage.json"


# MLflow stores a dataset digest in 36 characters; the full sha256 goes into an input tag.
DATASET_DIGEST_CHARS = 32


class RegistryError(ValueError):
    """The registry cannot be reached, or what is to be registered/audited is inconsistent."""


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


def _info(version, created: bool) -> dict:
    tags = dict(version.tags)
    return {"name": version.name, "version": str(version.version), "run_id": version.run_id, "created": created,
            "target": tags.get("target"), "sparsity": tags.get("sparsity"), "replaces": tags.get("replaces"),
            "parent": tags.get("parent"), "base_key": tags.get("base_key")}
