"""Traces, masks and checkpoints through a DVC remote: `dvc push` / `dvc pull` round-trip them
byte for byte through a local-directory remote, and `resp audit --fetch` restores a registered
version's missing files from that remote, verified against the registry; bad copies, missing
objects and a missing remote end in one line naming the fix. DVC runs as a subprocess, as a
user runs it; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import dvc, dvc_project, tiny_overrides
from mlflow import MlflowClient
from typer.testing import CliRunner

from resp import recipe, registry
from resp.artifacts import file_digest, manifest_path
from resp.cli import app
from resp.config import declared_method, load_params
from resp.checkpoints import export_model
from resp.masks import Mask
from resp.models import load_model, model_identity
from resp.registry import RegistryError
from resp.structures import structures_for

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# the layout dvc.yaml's calibrate, prune_self and export stages write, relative to the project
TRACES = Path("data/runs/arith/traces/dense.jsonl")
RUN = Path("data/runs/arith/resp_noregen")
MASK = RUN / "masks" / "sparsity-0.10.safetensors"
EXPORTS = Path("data/checkpoints/arith/resp_noregen")
EXPORT = EXPORTS / "sparsity-0.10" / "masked"
OUTS = [TRACES.as_posix(), manifest_path(TRACES).as_posix(), RUN.as_posix(), EXPORTS.as_posix()]


def outputs(project: Path) -> dict[str, str]:
    """sha256 of every file of the DVC outputs (OUTS) in `project`, by path in the project."""
    found = {}
    for out in map(project.joinpath, OUTS):
        for path in sorted(out.rglob("*")) if out.is_dir() else [out] if out.exists() else []:
            if path.is_file():
                found[path.relative_to(project).as_posix()] = file_digest(path)
    return found


def remote_object(remote: Path, path: Path) -> Path:
    """Where a DVC 3 remote keeps a file's bytes: files/md5/<first 2 hex>/<other 30>."""
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return remote / "files" / "md5" / md5[:2] / md5[2:]


@pytest.fixture(scope="module")
def dvc_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site")))
        mp.setenv("DVC_NO_ANALYTICS", "true")
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_world_dir, mlflow_store, dvc_env):
    """A DVC project holding a pruned tiny model's dense traces, run directory and masked export at
    the paths dvc.yaml uses, committed to its DVC cache and pushed to a local-directory remote, and
    the registered version of that mask (exports not logged to MLflow: their only copy is DVC's).
    The module runs in the project, as `dvc repro` and `resp register` do."""
    root = dvc_project(tmp_path_factory.mktemp("producer") / "resp")
    remote = root.parent / "remote"
    # calibration.seed=3: trace digests no other module of the session registers
    params = load_params(ROOT / "params.yaml", [*tiny_overrides(tiny_model_dir, tiny_world_dir), *mlflow_store,
                                                "export.formats=[masked]", "calibration.seed=3", "prune.targets=[0.1]",
                                                "prune.milestones=[0.05]", "registry.log_exports=false"])
    params_file = root.parent / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        recipe.make_traces(params, "arith", "train", None, TRACES)
        recipe.prune(params, "arith", declared_method(params, "resp_noregen"), RUN, str(TRACES))
        model, tokenizer = load_model(params.model.name_or_path)
        mask, meta = Mask.load(MASK)
        export_model(model, tokenizer, mask, structures_for(model, meta["attention_unit"], meta["protected_layers"]),
                     "masked", EXPORT, 8, mask_meta=meta, model_key=model_identity(params.model.name_or_path).key)
        (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
            "calibrate": {"cmd": f"resp traces --task arith --out {TRACES}", "outs": OUTS[:2]},
            "prune": {"cmd": f"resp prune --task arith --method resp_noregen --traces {TRACES} --out {RUN}",
                      "deps": [TRACES.as_posix()], "outs": [RUN.as_posix()]},
            "export": {"cmd": f"resp export --masks-dir {RUN}/masks --out {EXPORTS}", "deps": [RUN.as_posix()],
                       "outs": [EXPORTS.as_posix()]}}}))
        dvc(root, "commit", "--force", "--quiet")   # the stages' outputs into the cache, as `dvc repro` leaves them
        dvc(root, "remote", "add", "-d", "storage", str(remote))
        dvc(root, "push", "--quiet")
        [version] = registry.register_method(params, "arith", "resp_noregen", RUN / "masks", {0.1: {"masked": EXPORT}})
        yield {"root": root, "remote": remote, "params": params, "params_file": params_file, "version": version,
               "outputs": outputs(root)}


def audit(project, *extra: str):
    v = project["version"]
    return runner.invoke(app, ["audit", "--model", v["name"], "--version", v["version"],
                               "--params", str(project["params_file"]), *extra])


def test_dvc_push_and_pull_round_trip_traces_masks_and_checkpoints(project, tmp_path):
    """A stage writes a trace set, a run directory (masks) and exports; pushed, deleted with the
    cache, pulled: the same bytes come back, and the remote holds every file's content."""
    root = dvc_project(tmp_path / "resp")
    shutil.copytree(project["root"] / "data", root / "fixtures")
    copy = "import shutil; shutil.copytree('fixtures', 'data')"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": f'"{sys.executable}" -c "{copy}"', "deps": ["fixtures"], "outs": OUTS}}}))
    dvc(root, "repro", "--quiet")
    made = outputs(root)
    assert made == project["outputs"]
    assert {TRACES.as_posix(), manifest_path(TRACES).as_posix(), MASK.as_posix(), manifest_path(MASK).as_posix(),
            (RUN / "summary.json").as_posix(), (EXPORT / "model.safetensors").as_posix()} <= set(made)
    remote = tmp_path / "remote"
    dvc(root, "remote", "add", "-d", "storage", str(remote))
    dvc(root, "push", "--quiet")
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    dvc(root, "pull", "--quiet")
    assert outputs(root) == made
    stored = {p.parent.name + p.name for p in remote.rglob("*") if p.is_file()}
    assert {hashlib.md5((root / name).read_bytes()).hexdigest() for name in made} <= stored
    assert sum(name.endswith(".dir") for name in stored) == 2   # one listing per directory output (run, exports)


def test_audit_fetch_restores_missing_files_and_verifies_them(project):
    root = project["root"]
    missing = [TRACES, MASK, EXPORT / "model.safetensors"]
    for path in missing:
        (root / path).unlink()
    shutil.rmtree(root / ".dvc" / "cache")
    before = audit(project)
    # the logged copies of the trace set and mask still verify; the export was never logged
    assert before.exit_code == 1
    assert [line for line in before.output.splitlines() if line.startswith("MISMATCH")] == [
        f"MISMATCH export {EXPORT / 'model.safetensors'}: local file is missing and no copy was logged"]

    # a present file that does not verify is reported, never replaced
    trace_manifest = root / manifest_path(TRACES)
    edited = trace_manifest.read_bytes() + b" "
    trace_manifest.write_bytes(edited)
    result = audit(project, "--fetch")
    lines = result.output.splitlines()
    assert result.exit_code == 1, result.output
    assert lines[:3] == [f"restored {path} from DVC (sha256 verified against the registry)" for path in
                         sorted(map(str, missing))]
    assert {p: d for p, d in outputs(root).items() if p != manifest_path(TRACES).as_posix()} == {
        p: d for p, d in project["outputs"].items() if p != manifest_path(TRACES).as_posix()}
    assert trace_manifest.read_bytes() == edited
    trace_line = next(line for line in lines if line.split()[:1] == ["initial"])
    assert trace_line.endswith(f"  {TRACES}  sha256 {project['outputs'][TRACES.as_posix()][:16]} "
                               "[local ok (restored from DVC), logged ok, manifest does not verify]")
    assert any(line.strip().startswith(f"mask {MASK} (target 0.10,") and line.endswith(
        "[local ok (restored from DVC), logged ok]") for line in lines)
    assert [line for line in lines if line.startswith("MISMATCH")] == [
        f"MISMATCH trace manifest {manifest_path(TRACES)}: local file does not match the recorded sha256 "
        f"{project['outputs'][manifest_path(TRACES).as_posix()][:12]} (edited after registration)"]

    trace_manifest.write_bytes(edited[:-1])
    result = audit(project, "--fetch")   # nothing missing: nothing fetched
    assert result.exit_code == 0, result.output
    assert not any(line.startswith("restored") for line in result.output.splitlines())
    assert result.output.splitlines()[-1].startswith("audit passed: ")


def test_audit_fetch_refuses_what_it_cannot_verify_with_one_line(project, tmp_path):
    root, remote = project["root"], project["remote"]
    recorded = project["outputs"][MASK.as_posix()]
    stored = remote_object(remote, root / MASK)
    original = stored.read_bytes()
    shutil.rmtree(root / MASK.parent)   # the mask and its manifest
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
    fix_mismatch = ("nothing was written: check out the dvc.lock that recorded the registered file (`git log -- "
                    "dvc.lock`) and fetch again, or `dvc push` it from the machine that produced it")
    try:
        # a damaged copy in the remote: refused, nothing written
        stored.chmod(0o644)
        stored.write_bytes(original[:-1] + b"\x00")
        result = audit(project, "--fetch")
        assert result.exit_code == 2
        assert result.output == (f"error: mask {MASK} fetched from DVC does not match the registry (sha256 "
                                 f"{file_digest(stored)[:12]} != recorded {recorded[:12]}); {fix_mismatch}\n")
        assert not (root / MASK.parent).exists()   # nor the folder made to hold it

        # not in the remote
        stored.unlink()
        result = audit(project, "--fetch")
        assert result.exit_code == 2
        assert result.output.startswith(f"error: mask {MASK} cannot be fetched from DVC remote 'storage' (")
        assert result.output.endswith("): run `dvc push` on the machine that produced it (or fix the remote's URL "
                                      "and credentials), then `resp audit --fetch` again\n")
        assert not (root / MASK).exists()
    finally:
        stored.write_bytes(original)

    # no remote configured
    dvc(root, "remote", "remove", "storage")
    try:
        result = audit(project, "--fetch")
        assert result.exit_code == 2
        assert result.output.startswith(f"error: mask {MASK} is not in the DVC cache of {root} and no default DVC remote "
                                        "is configured (")
        assert result.output.endswith("): add the remote its producer pushes to (`dvc remote add -d storage URL`), then "
                                      "run `resp audit --fetch` again\n")
    finally:
        dvc(root, "remote", "add", "-d", "storage", str(remote))

    # a registry record changed after registration: its digests are not trusted to fetch by
    client = MlflowClient(tracking_uri=project["params"].registry.tracking_uri)
    run_id = project["version"]["run_id"]
    lineage = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "lineage.json"
    kept = lineage.read_bytes()
    try:
        record = json.loads(kept)
        for entry in record["files"]:
            if entry["role"] == "mask":
                entry["sha256"] = file_digest(stored)
        lineage.write_text(json.dumps(record))
        result = audit(project, "--fetch")
        assert result.exit_code == 2
        assert result.output == (f"error: lineage.json of run {run_id} ({project['version']['name']} version "
                                 f"{project['version']['version']}) does not match the version's lineage_digest tag: "
                                 "its digests cannot be trusted, so nothing was fetched; audit without --fetch and "
                                 "re-register the model\n")
        assert not (root / MASK).exists()
    finally:
        lineage.write_bytes(kept)

    # what the DVC cache holds is restored without a remote
    dvc(root, "fetch", "--quiet")
    dvc(root, "remote", "remove", "storage")
    try:
        result = audit(project, "--fetch")
    finally:
        dvc(root, "remote", "add", "-d", "storage", str(remote))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == [f"restored {path} from DVC (sha256 verified against the registry)"
                                              for path in (MASK, manifest_path(MASK))]
    assert outputs(root) == project["outputs"]

    untracked = RUN.parent / "notes.txt"
    with pytest.raises(RegistryError, match=rf"^trace set {untracked} is not tracked by DVC in {root} \(no output of its "
                                            r"dvc.yaml or .dvc files holds it in this checkout\): check out the commit "):
        registry.fetch_file(untracked, recorded, "trace set")

    outside = tmp_path / "elsewhere" / "dense.jsonl"
    with pytest.raises(RegistryError, match=rf"^trace set {outside} is missing and no DVC project holds it \(no .dvc "
                                            r"folder above it\): run `resp audit --fetch` in the clone of the project"):
        registry.fetch_file(outside, recorded, "trace set")
    with pytest.raises(RegistryError, match=rf"^mask {MASK} exists: only a missing file is fetched, an existing one is "
                                            "never replaced$"):
        registry.fetch_file(MASK, recorded, "mask")
    result = runner.invoke(app, ["audit", "--traces", str(TRACES), "--fetch", "--params", str(project["params_file"])])
    assert result.exit_code == 2
    assert result.output == ("error: --fetch restores the files of one version: give it with --model NAME --version V, "
                             "not --traces\n")
