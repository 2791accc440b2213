"""The bad-input campaign as a table: every row is one command a new user could type, run through
the real CLI (typer's CliRunner, in process) against a small temporary project.

`tests/test_bad_inputs.py` asserts each row ends in exactly one line naming the problem and the
fix (exit code 2, or 1 for an audit that fails); `benchmarks/bad_inputs.py` prints the table with
what the command printed. Add a row for every new bad input found.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
READ_ONLY = Path("/sys/resp-out") if os.geteuid() == 0 else None   # root writes anywhere else; set per project


@dataclass
class Project:
    root: Path
    params: Path
    model_dir: Path
    traces: dict[str, Path] = field(default_factory=dict)   # arith, choice, heldout, other_model
    run_dir: Path | None = None                             # a magnitude run of arith
    read_only: Path | None = None


def tiny_overrides(model_dir, world_dir) -> list[str]:
    from conftest import tiny_overrides as overrides

    return overrides(model_dir, world_dir)


def build_project(root: Path, model_dir: Path, world_dir: Path, store: list[str]) -> Project:
    """params.yaml for the tiny model and world, dense traces of two tasks, held-out traces, a
    trace set whose manifest names another model, and one magnitude run."""
    from resp import recipe
    from resp.config import load_params

    root.mkdir(parents=True, exist_ok=True)
    params = load_params(ROOT / "params.yaml", [*tiny_overrides(model_dir, world_dir), *store, "export.formats=[masked]"])
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
    run_dir = root / "runs" / "magnitude"
    recipe.prune(params, "arith", "magnitude", run_dir)
    read_only = READ_ONLY
    if read_only is None:
        read_only = root / "read-only" / "out"
        read_only.parent.mkdir()
        read_only.parent.chmod(0o555)
    return Project(root, path, model_dir, traces, run_dir, read_only)


@dataclass
class Case:
    kind: str                            # bad input | fault | tampering | concurrency
    name: str
    command: str                         # as shown in the table
    before: str                          # what the campaign saw before this change
    args: Callable[[Project], list[str]]
    expect: str                          # a substring of the one line printed
    setup: Callable[[Project], contextlib.AbstractContextManager] | None = None
    code: int = 2


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
                    "--set", "model.device=tpu"], "model.device 'tpu' is not a device torch knows here"),
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
         "is a file, not a directory: choose another --out"),
    Case("bad input", "prune-out-read-only", "resp prune --out <read-only dir>", "traceback after the work",
         lambda p: ["prune", "--task", "arith", "--method", "magnitude", "--out", str(p.read_only)], "is not writable"),
    Case("bad input", "traces-out-read-only", "resp traces --out <read-only dir>/t.jsonl",
         "traceback after 31 s of generation",
         lambda p: ["traces", "--task", "arith", "--out", str(p.read_only / "t.jsonl")], "is not writable"),
    Case("bad input", "traces-out-dir", "resp traces --out <a directory>", "traceback after the work",
         lambda p: ["traces", "--task", "arith", "--out", str(p.root)], "is a directory, not a file: give a file path"),
    Case("bad input", "traces-out-user-file", "resp traces --out <an existing file that is not a trace set>",
         "overwritten (by reading the code; not in the issue)", lambda p: ["traces", "--task", "arith", "--out", str(p.params)],
         "exists and is not a trace set (no params.yaml.json manifest beside it): choose another --out"),
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
]


def run_case(case: Case, project: Project):
    """(exit code, output lines) of one row, through the real CLI."""
    from typer.testing import CliRunner

    from resp.cli import app

    args = case.args(project)
    if "--params" not in args:
        args = [*args, "--params", str(project.params)]
    with (case.setup(project) if case.setup else contextlib.nullcontext()):
        result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result, lines


def expected(case: Case, project: Project) -> str:
    return case.expect.replace("{root}", str(project.root))
