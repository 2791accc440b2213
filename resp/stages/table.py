"""The stage table: every stage of the workflow declared once.

A declaration names the params sections the stage reads, which of its arguments are files it
reads (their content enters its cache key), which name what it writes, and the function it runs
(`module:function`). The stage's code is that module's import closure within `resp`, so editing
FLAP changes the digest of the baseline stage and of the prune composition, not of the dense
traces. Prefect cache keys (flows/pipeline.py), the registry's params hash and dvc.yaml's
`params:` / `deps:` (tests/test_pipeline_config.py) all follow these declarations.

Adding a stage: write its function in a module of its own under `resp/stages/`, add one entry here.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from resp import artifacts
from resp.config import Params

PACKAGE = Path(__file__).resolve().parents[1]   # resp/
ROOT = PACKAGE.parent


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]        # dotted params sections; `{task}` and `{method}` are filled per call
    code: str                        # "module:function": the function it runs; the module's import closure is its code
    files: tuple[str, ...] = ()      # arguments naming files (or dicts/lists of them) that it reads
    outputs: tuple[str, ...] = ("out",)   # arguments naming what it writes
    cached: bool = True              # False: the flow runs it every time (registration is idempotent itself)
    parts: tuple[str, ...] = ()      # a composition of other stages (prune): the flow runs the parts as tasks

    @property
    def module(self) -> str:
        return self.code.split(":")[0]

    @property
    def function(self):
        module, name = self.code.split(":")
        return getattr(importlib.import_module(module), name)


PRUNE_SECTIONS = ("model", "tasks", "prose_task", "calibration", "generation", "importance", "prune",
                  "methods.{method}", "baselines")
HEAL_TRACES_SECTIONS = ("model", "tasks.{task}", "calibration.seed", "generation", "methods.{method}.heal.num_prompts")

STAGES: dict[str, Stage] = {s.name: s for s in (
    # the dense model's own traces: calibration (dense_traces), held-out NLL, healing data
    Stage("dense_traces", ("model", "tasks.{task}", "calibration", "generation"), "resp.stages.traces:dense_traces"),
    Stage("heldout_traces", ("model", "tasks.{task}", "generation", "evaluation.nll_traces"),
          "resp.stages.traces:heldout_traces"),
    Stage("heal_traces", HEAL_TRACES_SECTIONS, "resp.stages.traces:heal_traces"),
    # pruning one method on one task: calibrate -> (score -> apply -> regenerate?)* | baseline -> write_run
    Stage("prune", PRUNE_SECTIONS, "resp.recipe:prune", files=("dense_traces",), outputs=("out_dir",),
          parts=("calibrate", "score", "apply", "regenerate", "baseline", "write_run")),
    Stage("calibrate", PRUNE_SECTIONS, "resp.stages.calibrate:calibrate", files=("dense_traces",)),
    # scale.score_nproc / scale.scoring say where the scores are computed, not what they are (the same up to fp32
    # summation order, the same masks: tests/test_stages.py): moving a run onto N GPUs keeps its cache
    Stage("score", ("model", "importance", "prune.attention_unit", "prune.protected_layers", "methods.{method}"),
          "resp.stages.score:score", files=("mask", "traces", "reference")),
    Stage("apply", ("model", "importance.normalize", "prune.attention_unit", "prune.protected_layers"),
          "resp.stages.apply:apply", files=("scores", "mask")),
    Stage("regenerate", ("model", "tasks.{task}", "generation", "methods.{method}", "export.channel_multiple",
                         "scale.vllm_gpu_memory_utilization"), "resp.stages.regenerate:regenerate",
          files=("mask", "prompts")),
    Stage("baseline", PRUNE_SECTIONS, "resp.stages.baseline:baseline", files=("calibration",), outputs=("out_dir",)),
    Stage("write_run", PRUNE_SECTIONS, "resp.stages.write_run:write_run", files=("record",), outputs=("out_dir",)),
    # what follows pruning
    Stage("heal", ("model", "tasks.{task}", "methods.{method}.heal"), "resp.stages.heal:heal",
          files=("mask", "traces")),
    Stage("export", ("model", "export", "prune.attention_unit", "prune.protected_layers"), "resp.stages.export:export",
          files=("mask",), outputs=("out_root",)),
    Stage("evaluate", ("model", "tasks.{task}", "evaluation", "prune.attention_unit", "prune.protected_layers"),
          "resp.stages.evaluate:evaluate", files=("masks", "heldout")),
    Stage("register", ("registry",), "resp.registry.register:register_method", outputs=(), cached=False),
    # what follows healing: the healed models exported, evaluated and registered (their parent: the pruned version)
    Stage("export_healed", ("model", "export", "prune.attention_unit", "prune.protected_layers"),
          "resp.stages.healed:export_healed", files=("healed",), outputs=("out_root",)),
    Stage("evaluate_healed", ("model", "tasks.{task}", "evaluation", "prune.attention_unit", "prune.protected_layers"),
          "resp.stages.healed:evaluate_healed", files=("healed",)),
    Stage("register_healed", ("registry",), "resp.registry.healed:register_healed", outputs=(), cached=False),
    Stage("report", ("run", "prune.targets", "report", "evaluation"), "resp.report:write_report",
          outputs=("out_dir",)),
)}


def stage_of(function) -> Stage:
    """The stage that runs `function` (what a `call` receives from `resp.recipe.prune`)."""
    code = f"{function.__module__}:{function.__name__}"
    for stage in STAGES.values():
        if stage.code == code:
            return stage
    raise KeyError(f"{code} is no stage's function")


# ---------------------------------------------------------------- code digests

def _imports(module: str) -> set[str]:
    """`resp` modules that `module`'s source imports anywhere (top level or inside functions)."""
    path = _module_path(module)
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    # the package itself only re-exports (lazily): `from resp import x` counts as `resp.x`
    return {m for m in found if m.startswith("resp.") and _module_exists(m)}


def _module_path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    package = PACKAGE / rel / "__init__.py"
    return package if package.is_file() else (PACKAGE / rel).with_suffix(".py")


def _module_exists(module: str) -> bool:
    return _module_path(module).is_file()


@lru_cache(maxsize=None)
def code_files(module: str) -> tuple[str, ...]:
    """The source files (relative to the repository root) of `module`'s import closure in `resp`."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or not _module_exists(m):
            continue
        seen.add(m)
        todo.extend(_imports(m) - seen)
    return tuple(sorted(_module_path(m).relative_to(ROOT).as_posix() for m in seen))


@lru_cache(maxsize=None)
def code_digest(stage: str) -> str:
    """sha256 over the code a stage runs (names and bytes of its closure's files)."""
    return artifacts.json_digest({f: artifacts.file_digest(ROOT / f) for f in code_files(STAGES[stage].module)})


def code_record(stage: str) -> dict:
    """What an artifact's manifest records of the code that wrote it: the stage and the digest of its code.
    Content, not the git commit: a commit that leaves the stage's code alone writes the same bytes, so
    DVC does not rerun what follows, and the digest still names the exact source that ran."""
    return {"step": stage, "digest": code_digest(stage)}


# ---------------------------------------------------------------- params a stage reads

def stage_sections(stage: str, **fill: str) -> tuple[str, ...]:
    return tuple(s.format(**fill) for s in STAGES[stage].sections)


def stage_params(params: Params, stage: str, **fill: str) -> dict:
    """The values of the params sections `stage` reads (JSON-able), by dotted name."""
    tree = params.model_dump(mode="json")
    used = {}
    for dotted in stage_sections(stage, **fill):
        node = tree
        for key in dotted.split("."):
            node = node[key]
        used[dotted] = node
    return used


def params_hash(params: Params, task: str, method: str) -> str:
    """Digest of every params section a pruning run of `method` on `task` reads."""
    return artifacts.json_digest(stage_params(params, "prune", task=task, method=method))
