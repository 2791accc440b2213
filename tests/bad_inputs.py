"""The bad-input campaign as a table: every row is one command a new user could type, run through
the real CLI (typer's CliRunner, in process) against a small temporary project.

`tests/test_bad_inputs.py` asserts each row ends in exactly one line naming the problem and the
fix (exit code 2); an audit row fails (exit 1) with a MISMATCH line naming what was tampered with;
a row whose command used to do the wrong thing silently and now does the right thing (exit 0)
checks what it wrote with `verify`. `benchmarks/bad_inputs.py` prints the table with what the
command printed. Add a row for every new bad input found.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import prefect.main  # noqa: F401 - sets up Prefect's logging (a root console on sys.stderr) here, not inside
import yaml           # a `resp run` row, whose sys.stderr is CliRunner's stream (closed afterwards)

ROOT = Path(__file__).resolve().parents[1]
READ_ONLY = Path("/sys/resp-out") if os.geteuid() == 0 else None   # root writes anywhere else; set per project


@dataclass
class Project:
    root: Path
    params: Path
    model_dir: Path
    traces: dict[str, Path] = field(default_factory=dict)   # arith, choice, heldout, other_model, two_prompts
    run_dir: Path | None = None                             # a magnitude run of arith
    read_only: Path | None = None
    base_copy: Path | None = None                           # a private copy of the model, registered with ...
    registered: dict = field(default_factory=dict)          # ... a magnitude version: name, version
    copy_params: Path | None = None                         # params.yaml naming that copy as the model


def tiny_overrides(model_dir, world_dir) -> list[str]:
    from conftest import tiny_overrides as overrides

    return overrides(model_dir, world_dir)


def build_project(root: Path, model_dir: Path, world_dir: Path, store: list[str]) -> Project:
    """params.yaml for the tiny model and world, dense traces of two tasks, held-out traces, a
    trace set whose manifest names another model, and one magnitude run."""
    from resp import recipe
    from resp.config import declared_method, load_params

    root.mkdir(parents=True, exist_ok=True)
    # data and cache inside the project: a `resp run` row that runs (on code that lets it) writes nothing elsewhere
    params = load_params(ROOT / "params.yaml", [*tiny_overrides(model_dir, world_dir), *store, "export.formats=[masked]",
                                                f"flow.data_dir={root / 'data'}", f"flow.results_dir={root / 'results'}"])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    traces = {"arith": recipe.make_traces(params, "arith", "train", None, root / "traces" / "arith.jsonl"),
              "choice": recipe.make_traces(params, "choice", "train", None, root / "traces" / "choice.jsonl"),
              "heldout": recipe.make_traces(params, "arith", "test", 4, root / "traces" / "heldout.jsonl")}
    other = root / "traces" / "other-model.jsonl"   # the same traces, but its manifest names another model
    shutil.copy(traces["arith"], other)
    manifest = json.loads(Path(f"{traces['arith']}.json").read_text())
    manifest["model"] = {**manifest["model"], "key": "0" * 64, "content_hash": "0" * 64}
    Path(f"{other}.json").write_text(json.dumps(manifest))
    traces["other_model"] = other
    traces["two_prompts"] = recipe.make_traces(params, "arith", "train", 2, root / "traces" / "two-prompts.jsonl")
    run_dir = root / "runs" / "magnitude"
    recipe.prune(params, "arith", declared_method(params, "magnitude"), run_dir)
    read_only = READ_ONLY
    if read_only is None:
        read_only = root / "read-only" / "out"
        read_only.parent.mkdir()
        read_only.parent.chmod(0o555)
    # a registered version whose base model (a private copy) the tampering rows edit and restore
    base_copy = root / "base-copy"
    shutil.copytree(model_dir, base_copy)
    # its own experiment too: other tests of a shared store look runs up by name (task-method-target)
    copy_params = params.model_copy(update={
        "model": params.model.model_copy(update={"name_or_path": str(base_copy)}),
        "registry": params.registry.model_copy(update={"experiment": "resp-bad-inputs"})})
    copy_path = root / "params-base-copy.yaml"
    copy_path.write_text(yaml.safe_dump(copy_params.model_dump(mode="json")))
    recipe.prune(copy_params, "arith", declared_method(copy_params, "magnitude"), root / "runs" / "base-copy-magnitude")
    from resp.registry import register_method

    version = register_method(copy_params, "arith", "magnitude", root / "runs" / "base-copy-magnitude" / "masks")[0]
    return Project(root, path, model_dir, traces, run_dir, read_only, base_copy,
                   {"name": version["name"], "version": version["version"]}, copy_path)


@dataclass
class Case:
    kind: str                            # bad input | fault | tampering | concurrency
    name: str
    command: str                         # as shown in the table
    before: str                          # what the campaign saw before this change
    args: Callable[[Project], list[str]]
    expect: str                          # a substring of the one line printed
    setup: Callable[[Project], contextlib.AbstractContextManager] | None = None
    code: int = 2                        # 2: one error line; 1: an audit that fails; 0: now does the right thing
    verify: Callable[[Project], None] | None = None   # for code 0: asserts what the command wrote


def _mask(p: Project) -> Path:
    return p.run_dir / "masks" / "sparsity-0.10.safetensors"


@contextlib.contextmanager
def _scratch(p: Project, name: str, make: Callable[[Path], None]):
    """A fresh copy of something under the project, made by `make`, removed afterwards."""
    path = p.root / "scratch" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    make(path)
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env(**values):
    @contextlib.contextmanager
    def setup(p: Project):
        old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return setup


@contextlib.contextmanager
def _offline(p: Project):
    """No network: huggingface_hub reads HF_HUB_OFFLINE once, at import, so set its constant too."""
    import huggingface_hub.constants as constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        with _env(HF_HUB_OFFLINE="1")(p):
            yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _params_bytes(body: bytes):
    return lambda p: _scratch(p, "params", lambda d: (d / "params.yaml").write_bytes(body))


def _params_edited(edit: Callable[[str], str]):
    """The project's own params.yaml, edited by `edit` (a complete file: only the edit is wrong)."""
    return lambda p: _scratch(p, "params", lambda d: (d / "params.yaml").write_text(edit(p.params.read_text())))


def _truncated_model(d: Path, p: Project) -> None:
    shutil.copytree(p.model_dir, d / "model")
    weights = d / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _remote_code_model(d: Path, p: Project) -> None:
    shutil.copytree(p.model_dir, d / "model")
    config = json.loads((d / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "model" / "config.json").write_text(json.dumps(config))
    (d / "model" / "modeling_evil.py").write_text("open('/tmp/resp-evil-ran', 'w').write('ran')\n")


def _truncated_mask(d: Path, p: Project) -> None:
    shutil.copy(_mask(p), d / "sparsity-0.10.safetensors")
    shutil.copy(f"{_mask(p)}.json", d / "sparsity-0.10.safetensors.json")
    body = (d / "sparsity-0.10.safetensors").read_bytes()
    (d / "sparsity-0.10.safetensors").write_bytes(body[: len(body) // 2])


def _user_files(d: Path) -> None:
    (d / "out").mkdir()
    (d / "out" / "thesis.tex").write_text("years of work")


@contextlib.contextmanager
def _held_run_lock(p: Project):
    from resp.locking import run_dir_lock

    with run_dir_lock(p.root / "scratch" / "locked-run"):
        yield


def _rewritten_traces(edit: Callable[[list[dict], dict], None]):
    """A copy of the arith traces whose records `edit` changes, with the manifest's digest (and what
    `edit` sets in it) rewritten to match: what the trace digest alone cannot catch."""
    def make(d: Path, p: Project) -> None:
        from resp.artifacts import bytes_digest

        records = [json.loads(line) for line in p.traces["arith"].read_text().splitlines()]
        manifest = json.loads(Path(f"{p.traces['arith']}.json").read_text())
        edit(records, manifest)
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        (d / "t.jsonl").write_bytes(body)
        (d / "t.jsonl.json").write_text(json.dumps({**manifest, "digest": bytes_digest(body)}))
    return lambda p: _scratch(p, "tr", lambda d: make(d, p))


def _swap_prompt(records: list[dict], manifest: dict) -> None:
    records[0]["prompt_id"] = records[1]["prompt_id"]


def _duplicate_record(records: list[dict], manifest: dict) -> None:
    from resp.artifacts import text_digest

    records.append(dict(records[0]))
    manifest.update(n=len(records), prompt_ids_digest=text_digest("\n".join(r["prompt_id"] for r in records)))


def _letters_as_ids(records: list[dict], manifest: dict) -> None:
    records[0]["completion_ids"] = "abc"


def _renamed_mask(d: Path, p: Project) -> None:
    shutil.copy(_mask(p), d / "sparsity-0.50.safetensors")
    shutil.copy(f"{_mask(p)}.json", d / "sparsity-0.50.safetensors.json")


def _fewer_layers(d: Path, p: Project) -> None:
    shutil.copytree(p.model_dir, d / "model")
    config = json.loads((d / "model" / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][: config["num_hidden_layers"]]
    (d / "model" / "config.json").write_text(json.dumps(config))


def _base_file_edited(name: str):
    """One byte of a file of the registered version's base model changed (restored afterwards)."""
    @contextlib.contextmanager
    def setup(p: Project):
        path = p.base_copy / name
        original = path.read_bytes()
        middle = len(original) // 2
        path.write_bytes(original[:middle] + bytes([original[middle] ^ 1]) + original[middle + 1:])
        try:
            yield
        finally:
            path.write_bytes(original)
    return setup


@contextlib.contextmanager
def _registry_tag_edited(p: Project):
    from mlflow import MlflowClient

    uri = _params(p).registry.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, version = p.registered["name"], p.registered["version"]
    real = client.get_model_version(name, version).tags["mask_digest"]
    client.set_model_version_tag(name, version, "mask_digest", "0" * 64)
    try:
        yield
    finally:
        client.set_model_version_tag(name, version, "mask_digest", real)


def _params(p: Project):
    from resp.config import load_params

    return load_params(p.params)


@contextlib.contextmanager
def _killed_registration(p: Project):
    """A `resp register` killed (SIGKILL) right after it created a model version, before its run was
    finished; the next registration (afterwards, here) repairs it. On the private base copy: its model
    names are this project's alone in a shared store."""
    import signal
    import subprocess
    import sys

    from resp import recipe
    from resp.config import declared_method, load_params
    from resp.registry import register_method

    run = p.root / S / "killed-run"
    shutil.rmtree(run, ignore_errors=True)
    params = load_params(p.copy_params)
    recipe.prune(params, "arith", declared_method(params, "random"), run)
    args = ["register", "--task", "arith", "--method", "random", "--run-dir", str(run), "--params", str(p.copy_params)]
    killer = ("import os, signal\nfrom mlflow import MlflowClient\nfrom resp.cli import app\n"
              "finish = MlflowClient.set_terminated\n"
              "def kill(self, run_id, status=None, *a, **k):\n"
              "    if status == 'FINISHED' and self.get_run(run_id).data.tags.get('kind') == 'pruned':\n"
              "        v = self.search_model_versions(f\"run_id = '{run_id}'\")[0]\n"
              "        print(v.name, v.version, flush=True)\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return finish(self, run_id, status, *a, **k)\n"
              f"MlflowClient.set_terminated = kill\napp({args!r})\n")
    done = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    p.registered["broken"] = done.stdout.split()[-2:]
    try:
        yield
    finally:
        register_method(params, "arith", "random", run / "masks")   # withdraws the broken version


@contextlib.contextmanager
def _held_export_lock(p: Project):
    from resp.locking import export_dir_lock

    with export_dir_lock(p.root / "scratch" / "locked-export"):
        yield


def _user_note(p: Project):
    """A user's own JSON file (a command that overwrote it would leave other bytes; checked afterwards)."""
    @contextlib.contextmanager
    def kept(p: Project):
        with _scratch(p, "n", lambda d: (d / "notes.json").write_bytes(b'{"mine": true}\n')):
            yield
            assert (p.root / S / "n" / "notes.json").read_bytes() == b'{"mine": true}\n', "the user's file was replaced"
    return kept(p)


def _user_results(p: Project):
    """A user's own results.md in the report directory (checked unchanged afterwards)."""
    @contextlib.contextmanager
    def kept(p: Project):
        with _scratch(p, "r", lambda d: (d / "results.md").write_bytes(b"my notes\n")):
            yield
            assert (p.root / S / "r" / "results.md").read_bytes() == b"my notes\n", "the user's file was replaced"
    return kept(p)


def _two_format_dirs(p: Project) -> None:
    out = p.root / S / "two-formats"
    try:
        assert sorted(x.name for x in out.iterdir() if not x.name.startswith(".")) == ["compact", "masked"]
        for fmt in ("compact", "masked"):
            assert json.loads((out / fmt / "resp_manifest.json").read_text())["format"] == fmt
    finally:
        shutil.rmtree(out, ignore_errors=True)


S = "scratch"
CASES: list[Case] = [
    # ---- params and overrides
    Case("bad input", "override-empty-key", "resp validate --set =1", "vague line",
         lambda p: ["validate", "--set", "=1"], "has an empty key part before '=': write section.key=value"),
    Case("bad input", "target-zero", "resp prune --set prune.targets=[0.0,0.2]", "KeyError: 0.0 traceback after pruning",
         lambda p: ["prune", "--task", "arith", "--method", "magnitude", "--out", str(p.root / S / "r"),
                    "--set", "prune.targets=[0.0,0.2]"], "sparsity 0.0 is outside (0, 1)"),
    Case("bad input", "target-one", "resp validate --set prune.targets=[0.2,1.0]", "one line",
         lambda p: ["validate", "--set", "prune.targets=[0.2,1.0]"], "sparsity 1.0 is outside (0, 1)"),
    Case("bad input", "targets-duplicated", "resp validate --set prune.targets=[0.2,0.2]", "silently accepted",
         lambda p: ["validate", "--set", "prune.targets=[0.2,0.2]"], "repeats a value: list each sparsity once"),
    Case("bad input", "milestones-duplicated", "resp validate --set prune.milestones=[0.05,0.05]",
         "silently accepted (regeneration disabled)",
         lambda p: ["validate", "--set", "prune.milestones=[0.05,0.05]"], "repeats a value: list each sparsity once"),
    Case("bad input", "milestone-beyond-target", "resp validate --set prune.milestones=[0.05,0.3] (targets up to 0.2)",
         "silently accepted (regeneration disabled)",
         lambda p: ["validate", "--set", "prune.milestones=[0.05,0.3]"], "milestones [0.3] are not below the last target 0.2"),
    Case("bad input", "targets-unsorted", "resp validate --set prune.targets=[0.2,0.1]", "one line",
         lambda p: ["validate", "--set", "prune.targets=[0.2,0.1]"], "must be sorted ascending"),
    Case("bad input", "unknown-section", "resp validate --set nosuch.key=1", "one line",
         lambda p: ["validate", "--set", "nosuch.key=1"], "'nosuch' is not a section of params.yaml"),
    Case("bad input", "bad-type", "resp validate --set prune.steps=many", "one line",
         lambda p: ["validate", "--set", "prune.steps=many"], "prune.steps: Input should be a valid integer"),
    Case("bad input", "params-not-utf8", "resp validate --params latin1.yaml", "vague line (codec error)",
         lambda p: ["validate", "--params", str(p.root / S / "params" / "params.yaml")], "is not UTF-8 text (byte 0xe9",
         setup=_params_bytes(b"# caf\xe9\nworld: {}\n")),
    Case("bad input", "params-not-mapping", "resp validate --params list.yaml", "traceback",
         lambda p: ["validate", "--params", str(p.root / S / "params" / "params.yaml")], "does not hold a mapping of sections",
         setup=_params_bytes(b"- a\n- b\n")),
    Case("bad input", "params-missing", "resp validate --params nope.yaml", "one line",
         lambda p: ["validate", "--params", str(p.root / "nope.yaml")], "not found: run from the project root or pass --params"),
    Case("bad input", "timeout-knob-too-big", "resp validate --set registry.connect_timeout_s=60", "(new knob)",
         lambda p: ["validate", "--set", "registry.connect_timeout_s=60"],
         "registry.connect_timeout_s: Input should be less than or equal to 10"),
    # ---- devices and models
    Case("bad input", "cuda-on-cpu", "resp traces --set model.device=cuda (no GPU)", "traceback after the work",
         lambda p: ["traces", "--task", "arith", "--out", str(p.root / S / "t.jsonl"), "--set", "model.device=cuda"],
         "model.device is cuda but no CUDA device is available here: set model.device=cpu"),
    Case("bad input", "device-unknown", "resp prune --set model.device=tpu", "traceback",
         lambda p: ["prune", "--task", "arith", "--method", "magnitude", "--out", str(p.root / S / "r"),
                    "--set", "model.device=tpu"], "model.device: Value error, 'tpu' is not a device: use cpu, cuda, cuda:N or mps"),
    Case("bad input", "hub-id-offline", "resp benchmark --model nosuch-org/nosuch-model (offline)", "traceback",
         lambda p: ["benchmark", "--task", "arith", "--model", "nosuch-org/nosuch-model"],
         "hub model 'nosuch-org/nosuch-model' cannot be loaded", setup=_offline),
    Case("fault", "truncated-weights", "resp benchmark --model <dir with truncated model.safetensors>", "traceback",
         lambda p: ["benchmark", "--task", "arith", "--model", str(p.root / S / "m" / "model")],
         "its files are truncated or corrupt; re-save or re-download the model",
         setup=lambda p: _scratch(p, "m", lambda d: _truncated_model(d, p))),
    Case("tampering", "remote-code-unasked", "resp benchmark --model <dir whose config.json has auto_map>",
         "code from the directory ran (trust_remote_code from the manifest)",
         lambda p: ["benchmark", "--task", "arith", "--model", str(p.root / S / "m" / "model")],
         "ships its own modeling code (auto_map in config.json): pass --trust-remote-code",
         setup=lambda p: _scratch(p, "m", lambda d: _remote_code_model(d, p))),
    Case("bad input", "model-missing", "resp benchmark --model /nonexistent", "one line",
         lambda p: ["benchmark", "--task", "arith", "--model", "/nonexistent"], "model directory /nonexistent does not exist"),
    # ---- output paths
    Case("bad input", "export-out-nonempty", "resp export --out <non-empty dir of user files>",
         "moved to DIR.old and deleted, exit 0 (data loss)",
         lambda p: ["export", "--mask", str(_mask(p)), "--out", str(p.root / S / "u" / "out"), "--format", "masked"],
         "is not empty and holds no resp_manifest.json (it is not a resp export): choose a new or empty directory, "
         "or pass --overwrite", setup=lambda p: _scratch(p, "u", _user_files)),
    Case("bad input", "export-out-file", "resp export --out <a file>", "traceback, DIR.old left behind",
         lambda p: ["export", "--mask", str(_mask(p)), "--out", str(p.params), "--format", "masked"],
         "is a file, not a directory: give a directory path"),
    Case("bad input", "prune-out-under-file", "resp prune --out params.yaml/run", "traceback after the work",
         lambda p: ["prune", "--task", "arith", "--method", "magnitude", "--out", str(p.params / "run")],
         "is a file, not a directory: choose another out"),
    Case("bad input", "prune-out-read-only", "resp prune --out <read-only dir>", "traceback after the work",
         lambda p: ["prune", "--task", "arith", "--method", "magnitude", "--out", str(p.read_only)], "is not writable"),
    Case("bad input", "traces-out-read-only", "resp traces --out <read-only dir>/t.jsonl",
         "traceback after 31 s of generation",
         lambda p: ["traces", "--task", "arith", "--out", str(p.read_only / "t.jsonl")], "is not writable"),
    Case("bad input", "traces-out-dir", "resp traces --out <a directory>", "traceback after the work",
         lambda p: ["traces", "--task", "arith", "--out", str(p.root)], "is a directory, not a file: give a file path"),
    Case("bad input", "traces-out-user-file", "resp traces --out <an existing file that is not a trace set>",
         "overwritten (by reading the code; not in the issue)", lambda p: ["traces", "--task", "arith", "--out", str(p.params)],
         "exists and is not a trace set (no params.yaml.json manifest beside it): choose another out"),
    Case("bad input", "evaluate-out-read-only", "resp evaluate --out <read-only dir>/m.json", "traceback after the work",
         lambda p: ["evaluate", "--task", "arith", "--dense", "--out", str(p.read_only / "m.json")], "is not writable"),
    Case("bad input", "report-out-under-file", "resp report --out params.yaml/report", "traceback",
         lambda p: ["report", "--metrics-dir", str(p.root), "--out", str(p.params / "report")],
         "is a file, not a directory"),
    Case("bad input", "register-out-under-file", "resp register --out params.yaml/x.json", "traceback after registering",
         lambda p: ["register", "--task", "arith", "--method", "magnitude", "--run-dir", str(p.run_dir),
                    "--out", str(p.params / "x.json")], "is a file, not a directory"),
    # ---- lineage joins
    Case("bad input", "traces-of-another-task", "resp prune --task arith --method resp --traces <choice traces>",
         "silently accepted (wrong lineage)",
         lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces", str(p.traces["choice"]),
                    "--out", str(p.root / S / "r")], "were generated for task 'choice' by model"),
    Case("bad input", "traces-of-another-model", "resp prune --method resp --traces <traces of another model>",
         "silently accepted (wrong lineage)",
         lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces", str(p.traces["other_model"]),
                    "--out", str(p.root / S / "r")], "by model 0000000000000000, not task 'arith' / model"),
    Case("bad input", "heldout-as-calibration", "resp prune --method resp --traces <held-out test-split traces>",
         "silently accepted", lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces",
                                         str(p.traces["heldout"]), "--out", str(p.root / S / "r")],
         "were generated from split 'test', not the dense model on the calibration split 'train'"),
    # ---- faults and tampering in files
    Case("fault", "truncated-mask", "resp export --mask <truncated mask>", "traceback",
         lambda p: ["export", "--mask", str(p.root / S / "k" / "sparsity-0.10.safetensors"), "--out",
                    str(p.root / S / "e"), "--format", "masked"], "cannot be read (SafetensorError",
         setup=lambda p: _scratch(p, "k", lambda d: _truncated_mask(d, p))),
    Case("fault", "truncated-mask-evaluate", "resp evaluate --masks-dir <dir with a truncated mask>", "traceback",
         lambda p: ["evaluate", "--task", "arith", "--method", "magnitude", "--masks-dir", str(p.root / S / "k"),
                    "--out", str(p.root / S / "m.json")], "it is truncated or corrupt; re-run `resp prune`",
         setup=lambda p: _scratch(p, "k", lambda d: _truncated_mask(d, p))),
    Case("bad input", "traces-missing", "resp prune --method resp --traces nope.jsonl", "one line",
         lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces", str(p.root / "nope.jsonl"),
                    "--out", str(p.root / S / "r")], "not found: generate it with `resp traces`"),
    # ---- registry stores
    Case("bad input", "sqlite-folder-missing", "resp audit --set registry.tracking_uri=sqlite:////nonexistent/mlflow.db",
         "silently created a new store", lambda p: ["audit", "--model", "m", "--version", "1", "--set",
                                                    "registry.tracking_uri=sqlite:////nonexistent/mlflow.db"],
         "folder /nonexistent does not exist (a mistyped path would create a new, empty store)"),
    Case("bad input", "server-unreachable", "resp audit (tracking server down)", "about 255 s, then one line",
         lambda p: ["audit", "--model", "m", "--version", "1", "--set", "registry.tracking_uri=http://127.0.0.1:9"],
         "tracking store http://127.0.0.1:9 is unreachable (Connection refused within 5 s)"),
    Case("bad input", "metrics-corrupt", "resp register --metrics <not JSON>", "vague line (JSON error)",
         lambda p: ["register", "--task", "arith", "--method", "magnitude", "--run-dir", str(p.run_dir),
                    "--metrics", str(p.root / S / "j" / "m.json")], "metrics file",
         setup=lambda p: _scratch(p, "j", lambda d: (d / "m.json").write_text("{not json"))),
    # ---- concurrency
    Case("concurrency", "run-dir-in-use", "resp prune --out <run another process is writing>",
         "both reported success; the last one won", lambda p: ["prune", "--task", "arith", "--method", "magnitude",
                                                               "--out", str(p.root / S / "locked-run")],
         f"run directory {{root}}/{S}/locked-run is in use by pid {os.getpid()}", setup=_held_run_lock),
    # ---- second campaign (issue 21): registry stores and versions
    Case("bad input", "register-sqlite-folder-missing", "resp register --set registry.tracking_uri=sqlite:///<typo>/mlflow.db",
         "made the folder and a new store, reported version 1",
         lambda p: ["register", "--task", "arith", "--method", "magnitude", "--run-dir", str(p.run_dir), "--set",
                    f"registry.tracking_uri=sqlite:///{p.root / 'typo' / 'mlflow.db'}"],
         "/typo does not exist (a mistyped path would create a new, empty store)"),
    Case("bad input", "audit-sqlite-file-missing", "resp audit --set registry.tracking_uri=sqlite:///<dir>/absent.db",
         "created an empty store",
         lambda p: ["audit", "--model", "m", "--version", "1", "--set",
                    f"registry.tracking_uri=sqlite:///{p.root / 'absent.db'}"],
         "absent.db does not exist, so nothing is registered there (nothing was created)"),
    Case("fault", "killed-at-version-creation", "resp audit <version whose register was killed after creating it>",
         "audit failed for good; register said 'already registered' and never repaired it",
         lambda p: ["audit", "--model", p.registered["broken"][0], "--version", p.registered["broken"][1]],
         "was never finished (status RUNNING: the registration was killed); `resp register --task arith --method "
         "random` withdraws it and registers its mask again", setup=_killed_registration),
    Case("tampering", "registry-tag-edited", "resp audit <version whose mask_digest tag was edited>", "audit passed",
         lambda p: ["audit", "--model", p.registered["name"], "--version", p.registered["version"]],
         "registry tag mask_digest=0000000000000000 does not match lineage.json", setup=_registry_tag_edited, code=1),
    # ---- the base model's identity
    Case("tampering", "base-tokenizer-edited", "resp audit <version whose base tokenizer.json changed by one byte>",
         "audit passed", lambda p: ["audit", "--model", p.registered["name"], "--version", p.registered["version"]],
         "base model {root}/base-copy: its content", setup=_base_file_edited("tokenizer.json"), code=1),
    Case("tampering", "base-chat-template-edited", "resp audit <version whose base chat_template.jinja changed by one byte>",
         "audit passed", lambda p: ["audit", "--model", p.registered["name"], "--version", p.registered["version"]],
         "base model {root}/base-copy: its content", setup=_base_file_edited("chat_template.jinja"), code=1),
    Case("tampering", "base-generation-config-edited",
         "resp audit <version whose base generation_config.json changed by one byte>", "audit passed",
         lambda p: ["audit", "--model", p.registered["name"], "--version", p.registered["version"]],
         "base model {root}/base-copy: its content", setup=_base_file_edited("generation_config.json"), code=1),
    Case("tampering", "config-disagrees-with-weights", "resp benchmark --model <config.json declares fewer layers than stored>",
         "ran as the smaller model", lambda p: ["benchmark", "--task", "arith", "--model", str(p.root / S / "m" / "model")],
         "config.json disagrees with the weights (",
         setup=lambda p: _scratch(p, "m", lambda d: _fewer_layers(d, p))),
    # ---- --out never destroys
    Case("bad input", "benchmark-out-user-file", "resp benchmark --out <an existing file that is not a report>",
         "overwritten", lambda p: ["benchmark", "--task", "arith", "--out", str(p.root / S / "n" / "notes.json")],
         "exists and is not a `resp benchmark` report: choose another --out, or pass --overwrite", setup=_user_note),
    Case("bad input", "evaluate-out-user-file", "resp evaluate --out <an existing file that is not a metrics file>",
         "overwritten", lambda p: ["evaluate", "--task", "arith", "--dense", "--heldout", str(p.traces["heldout"]), "--out",
                                  str(p.root / S / "n" / "notes.json")],
         "exists and is not a `resp evaluate` metrics file: choose another --out, or pass --overwrite", setup=_user_note),
    Case("bad input", "register-out-user-file", "resp register --out <an existing file that is not a versions file>",
         "overwritten", lambda p: ["register", "--task", "arith", "--method", "magnitude", "--run-dir", str(p.run_dir),
                                   "--out", str(p.root / S / "n" / "notes.json")],
         "exists and is not a `resp register` versions file: choose another --out, or pass --overwrite",
         setup=_user_note),
    Case("bad input", "world-check-out-user-file", "resp world check --out <an existing file that is not a world check>",
         "overwritten", lambda p: ["world", "check", "--out", str(p.root / S / "n" / "notes.json")],
         "exists and is not a `resp world check` file: choose another --out, or pass --overwrite", setup=_user_note),
    Case("bad input", "report-out-user-results", "resp report --out <a directory holding the user's results.md>",
         "overwritten", lambda p: ["report", "--metrics-dir", str(p.root / "data" / "metrics"), "--out",
                                   str(p.root / S / "r")],
         "holds a results.md or metrics.json that is not a resp report: choose another --out, or pass --overwrite",
         setup=_user_results),
    Case("bad input", "score-out-user-file", "resp score --out <an existing file that is not a scores file>",
         "overwritten", lambda p: ["score", "--traces", str(p.traces["arith"]), "--out", str(p.root / S / "n" / "notes.json")],
         "exists and is not a scores file (no notes.json.json manifest beside it): choose another --out",
         setup=_user_note),
    Case("bad input", "export-two-formats-one-dir", "resp export --mask X --out D (export.formats: masked, compact)",
         "masked then compact written into the same D, both reported",
         lambda p: ["export", "--mask", str(_mask(p)), "--out", str(p.root / S / "two-formats"), "--set",
                    "export.formats=[masked,compact]"], "wrote compact export to {root}/scratch/two-formats/compact",
         code=0, verify=_two_format_dirs),
    Case("bad input", "prune-out-foreign-dir", "resp prune --out <non-empty dir of user files>",
         "wrote into it (README says refused)",
         lambda p: ["prune", "--task", "arith", "--method", "magnitude", "--out", str(p.root / S / "u" / "out")],
         "is not empty and is not a resp run directory (it holds thesis.tex): choose a new or empty directory",
         setup=lambda p: _scratch(p, "u", _user_files)),
    Case("bad input", "prune-score-nproc-too-many", "resp prune --set scale.score_nproc=4096",
         "new knob (issue 25 item 5)",
         lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces", str(p.traces["arith"]),
                    "--out", str(p.root / S / "n4096" / "run"), "--set", "scale.score_nproc=4096"],
         "scale.score_nproc is 4096 but this machine has"),
    Case("bad input", "prune-sharded-per-sample-abs", "resp prune --set scale.score_nproc=2 scale.scoring=sharded "
         "importance.per_sample_abs=true", "new knob (issue 25 item 5)",
         lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces", str(p.traces["arith"]),
                    "--out", str(p.root / S / "sharded" / "run"), "--set", "scale.score_nproc=2", "--set",
                    "scale.scoring=sharded", "--set", "importance.per_sample_abs=true"],
         "scale.scoring: sharded scores in mean mode only: set importance.per_sample_abs: false"),
    Case("bad input", "prune-out-other-method", "resp prune --method random --out <a magnitude run>",
         "mixed the two runs' steps/ and traces/",
         lambda p: ["prune", "--task", "arith", "--method", "random", "--out", str(p.root / S / "o" / "run")],
         "holds the magnitude run of arith, not random on arith: its steps/ and traces/ would mix",
         setup=lambda p: _scratch(p, "o", lambda d: shutil.copytree(p.run_dir, d / "run"))),
    Case("concurrency", "export-dir-in-use", "resp export --out <dir another export is writing>", "not locked",
         lambda p: ["export", "--mask", str(_mask(p)), "--out", str(p.root / S / "locked-export"), "--format", "masked"],
         f"export directory {{root}}/{S}/locked-export is in use by pid {os.getpid()}", setup=_held_export_lock),
    # ---- lineage joins
    Case("bad input", "evaluate-method-not-the-masks", "resp evaluate --method resp --masks-dir <magnitude masks>",
         "recorded as method resp",
         lambda p: ["evaluate", "--task", "arith", "--method", "resp", "--masks-dir", str(p.run_dir / "masks"),
                    "--heldout", str(p.traces["heldout"]), "--out", str(p.root / S / "m.json")],
         "the masks were made by magnitude, not resp: pass the method that made them"),
    Case("bad input", "mask-renamed", "resp export --mask <sparsity-0.10 mask renamed sparsity-0.50>",
         "reported as 0.50", lambda p: ["export", "--mask", str(p.root / S / "k" / "sparsity-0.50.safetensors"), "--out",
                                        str(p.root / S / "e"), "--format", "masked"],
         "was made for target 0.1, not the 0.50 its file name says: it was renamed",
         setup=lambda p: _scratch(p, "k", lambda d: _renamed_mask(d, p))),
    Case("bad input", "mask-renamed-evaluate", "resp evaluate --masks-dir <dir with the 0.10 mask renamed sparsity-0.50>",
         "reported as 0.50", lambda p: ["evaluate", "--task", "arith", "--method", "magnitude", "--masks-dir",
                                        str(p.root / S / "k"), "--heldout", str(p.traces["heldout"]), "--out",
                                        str(p.root / S / "m.json")],
         "was made for target 0.1, not the 0.50 its file name says",
         setup=lambda p: _scratch(p, "k", lambda d: _renamed_mask(d, p))),
    Case("bad input", "heldout-from-train-split", "resp evaluate --heldout <calibration (train split) traces>",
         "held-out NLL computed on calibration traces",
         lambda p: ["evaluate", "--task", "arith", "--dense", "--heldout", str(p.traces["arith"]), "--out",
                    str(p.root / S / "m.json")],
         "were generated from split 'train', not the dense model on the evaluation split 'test'"),
    Case("bad input", "traces-fewer-prompts", "resp prune --method resp --traces <traces of 2 prompts> (num_prompts 6)",
         "silently accepted", lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces",
                                         str(p.traces["two_prompts"]), "--out", str(p.root / S / "r")],
         "hold 2 prompts, but calibration.num_prompts is 6"),
    Case("tampering", "trace-prompt-ids-disagree", "resp prune --traces <records' prompt ids not the manifest's>",
         "accepted", lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces", str(p.root / S / "tr" / "t.jsonl"),
                                "--out", str(p.root / S / "r")],
         "the prompt ids of its records are not the ones its manifest records", setup=_rewritten_traces(_swap_prompt)),
    Case("tampering", "trace-record-duplicated", "resp prune --traces <a record duplicated, manifest rewritten>",
         "accepted", lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces", str(p.root / S / "tr" / "t.jsonl"),
                                "--out", str(p.root / S / "r")],
         "record 7 repeats an earlier record", setup=_rewritten_traces(_duplicate_record)),
    Case("bad input", "trace-completion-ids-text", "resp prune --traces <a record with completion_ids: \"abc\">",
         "TypeError traceback", lambda p: ["prune", "--task", "arith", "--method", "resp", "--traces",
                                           str(p.root / S / "tr" / "t.jsonl"), "--out", str(p.root / S / "r")],
         "record 1: completion_ids is not a list of token ids (str)", setup=_rewritten_traces(_letters_as_ids)),
    Case("bad input", "milestones-empty", "resp validate --set prune.milestones=[] (resp regenerates at milestones)",
         "silently accepted (resp never regenerates)", lambda p: ["validate", "--set", "prune.milestones=[]"],
         "method 'resp' regenerates at prune.milestones but prune.milestones is empty"),
    Case("bad input", "traces-for-gisp", "resp prune --method gisp --traces <dense traces>", "silently ignored",
         lambda p: ["prune", "--task", "arith", "--method", "gisp", "--traces", str(p.traces["arith"]), "--out",
                    str(p.root / S / "r")], "gisp (calibration: gold) would ignore them: drop them"),
    Case("bad input", "traces-for-gisp-in-a-pipeline", "resp prune --method gisp --traces <dense traces> --unused-traces-ok",
         "silently ignored", lambda p: ["prune", "--task", "arith", "--method", "gisp", "--traces", str(p.traces["arith"]),
                                        "--unused-traces-ok", "--out", str(p.root / S / "r2")],
         "gisp (calibration: gold) does not read --traces", code=0),
    # ---- the flow
    Case("bad input", "results-dir-unwritable", "resp run --set flow.results_dir=<under a file>", "traceback, exit 0",
         lambda p: ["run", "--set", f"flow.results_dir={p.params}/results"],
         "error: flow.results_dir {root}/params.yaml/results: {root}/params.yaml is a file, not a directory"),
    Case("bad input", "run-methods-empty", "resp run --set run.methods=[]", "nothing at all, exit 0",
         lambda p: ["run", "--set", "run.methods=[]"], "run.methods: Value error, is empty, so a run would do nothing"),
    Case("bad input", "run-tasks-empty", "resp run --set run.tasks=[]", "nothing at all, exit 0",
         lambda p: ["run", "--set", "run.tasks=[]"], "run.tasks: Value error, is empty, so a run would do nothing"),
    # ---- smaller
    Case("bad input", "params-duplicate-key", "resp validate --params <prune.steps given twice>", "the last one won",
         lambda p: ["validate", "--params", str(p.root / S / "params" / "params.yaml")],
         "key 'steps' appears twice in one mapping (lines", setup=_params_edited(
             lambda text: text.replace("\nprune:\n", "\nprune:\n  steps: 99\n", 1))),
    Case("bad input", "params-duplicate-section", "resp validate --params <two prune: sections>", "one section won",
         lambda p: ["validate", "--params", str(p.root / S / "params" / "params.yaml")],
         "key 'prune' appears twice in one mapping (lines", setup=_params_edited(
             lambda text: text + "prune:\n  seed: 1\n")),
    Case("bad input", "cron-invalid", "resp validate --set schedule.cron='not a cron'", "valid",
         lambda p: ["validate", "--set", "schedule.cron=not a cron"], "'not a cron' is not a 5-field cron expression"),
    Case("bad input", "timezone-invalid", "resp validate --set schedule.timezone=Mars/Phobos", "valid",
         lambda p: ["validate", "--set", "schedule.timezone=Mars/Phobos"], "'Mars/Phobos' is not an IANA time zone"),
    Case("bad input", "device-banana", "resp validate --set model.device=banana", "valid",
         lambda p: ["validate", "--set", "model.device=banana"], "'banana' is not a device: use cpu, cuda, cuda:N or mps"),
    Case("bad input", "hub-task-offline", "resp traces --task gsm8k (offline)", "loaded the model, then a traceback",
         lambda p: ["traces", "--task", "gsm8k", "--out", str(p.root / S / "g.jsonl")],
         "task data 'openai/gsm8k' (split 'train') cannot be loaded", setup=_offline),
]


def run_case(case: Case, project: Project):
    """(exit code, output lines) of one row, through the real CLI."""
    from typer.testing import CliRunner

    from flows.cli import app

    with (case.setup(project) if case.setup else contextlib.nullcontext()):
        args = case.args(project)   # after the setup: it may make what the command names
        if "--params" not in args:
            args = [*args, "--params", str(project.params)]
        result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result, lines


def judge(case: Case, project: Project, result, lines: list[str]) -> str | None:
    """None when the row ended as it must (see the module doc), else what went wrong."""
    want = expected(case, project)
    if "Traceback" in result.output or (result.exception and not isinstance(result.exception, SystemExit)):
        return "traceback"
    if result.exit_code != case.code:
        return f"exit {result.exit_code}, not {case.code}"
    if case.code == 2:
        ok = len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0] and ": " in lines[0][7:]
        return None if ok else "not one clear line"
    if case.code == 1:
        ok = any(line.startswith("MISMATCH ") and want in line for line in lines) and lines[-1].startswith("audit failed")
        return None if ok else "audit did not name the tampering"
    if want not in result.output:
        return "not as expected"
    try:
        case.verify(project) if case.verify else None
    except AssertionError as e:
        return f"wrong output ({e})"
    return None


def expected(case: Case, project: Project) -> str:
    return case.expect.replace("{root}", str(project.root))
