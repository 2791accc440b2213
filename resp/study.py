"""The study (method.md, "The study"): every method x task x calibration seed, resumable cell by cell.

A cell is one (task, method, seed). Seed s sets `calibration.seed` (which train prompts), `generation.seed`
(the sampled traces) and `prune.seed` (the random baseline's draw and tie-breaking): everything a
calibration depends on. A data-free deterministic method (magnitude) runs once; its masks stand for
every seed. A cell prunes with `resp.recipe.prune` (masks at every `study.targets`) on its seed's dense
traces and evaluates each mask with `resp.evaluation.evaluate_masks`; evaluations are cached by mask
digest, so identical masks (the same method under two seeds, or two methods that agree) are evaluated
once. The dense model is evaluated once per task.

Layout: `study.dir` holds what is committed (`study.json`, `cells/<task>/<method>/seed-<s>.json`,
`dense/<task>.json`, and the analysis: `results.md`, `metrics.json`, `plots/`); `study.work_dir` holds
what is not (trace sets, run directories with masks and steps, the evaluation cache).

Resuming: a finished cell records the digest of its inputs (the params sections its pruning and
evaluation read, the base model, the dense traces, the code of the steps it ran). A rerun skips a
finished cell whose inputs are unchanged and refuses one whose inputs changed, naming the cell and the
changed input: delete that cell's file to recompute it. A killed cell left no cell file (it is written
last, atomically) and starts again.

The analysis resamples seeds, then items within each drawn seed (`resp.stats.cluster_bootstrap`), so an
interval covers which calibration traces were drawn as well as which test items; differences pair by
seed and item.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from resp import artifacts
from resp.stages import table
from resp.stages.common import base_model, loaded_model
from resp.config import Params, declared_method

log = logging.getLogger(__name__)

STUDY_FORMAT = 1
DENSE = "dense"


class StudyError(ValueError):
    pass


def seed_overrides(seed: int) -> list[str]:
    """What one calibration seed sets."""
    return [f"calibration.seed={seed}", f"generation.seed={seed}", f"prune.seed={seed}"]


def cell_params(params: Params, seed: int | None) -> Params:
    """`params` with the study's targets and evaluation settings, and seed `seed` (None: as given)."""
    tree = params.model_dump(mode="json")
    st = params.study
    tree["prune"]["targets"] = list(st.targets)
    tree["prune"]["milestones"] = [m for m in tree["prune"]["milestones"] if m < st.targets[-1]]
    tree["evaluation"].update(num_items=st.num_items, samples=st.samples, nll_traces=0)
    if seed is not None:
        tree["calibration"]["seed"] = tree["generation"]["seed"] = tree["prune"]["seed"] = seed
    return Params.model_validate(tree)


def seeds_for(params: Params, method: str) -> list[int]:
    """Every study seed, or only the first for a method whose masks no seed can change."""
    return params.study.seeds[:1] if params.methods[method].scorer == "magnitude" else list(params.study.seeds)


def cells(params: Params) -> list[tuple[str, str, int]]:
    """(task, method, seed) in run order: methods in `study.methods` order (the list is the priority),
    each over every seed and task, so the first methods finish with all their seeds first."""
    return [(task, method, seed) for method in params.study.methods for seed in seeds_for(params, method)
            for task in params.study.tasks]


def _dotted_changes(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new)) for c in _dotted_changes(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


class Study:
    def __init__(self, params: Params):
        self.params = params
        self.root = Path(params.study.dir)
        self.work = Path(params.study.work_dir)
        self.base = base_model(params)

    # ------------------------------------------------------------ layout and its version
    def open(self) -> None:
        """Create or check `study.json`: a directory written by another study format is refused."""
        marker = self.root / "study.json"
        if marker.exists():
            try:
                found = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                raise StudyError(f"{marker} is not a resp study marker: point study.dir at an empty or a study "
                                 "directory") from None
            if found.get("format") != STUDY_FORMAT:
                raise StudyError(f"{self.root} was written by study format {found.get('format')}, this resp writes "
                                 f"format {STUDY_FORMAT}: use a new study.dir (or delete the old one)")
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise StudyError(f"{self.root} is not empty and holds no study.json: resp writes a study only into an empty "
                             "or its own directory; choose another study.dir")
        artifacts.write_json(marker, {"format": STUDY_FORMAT}, newline=True)

    def cell_file(self, task: str, method: str, seed: int) -> Path:
        return self.root / "cells" / task / method / f"seed-{seed}.json"

    # ------------------------------------------------------------ inputs
    def inputs(self, params: Params, task: str, method: str, traces: dict | None) -> dict:
        return {"prune": table.stage_params(params, "prune", task=task, method=method),
                "evaluation": params.evaluation.model_dump(mode="json"), "model": self.base["key"],
                "dense_traces": traces,
                "code": {"prune": table.code_digest("prune"), "evaluate": table.code_digest("evaluate")}}

    def _check_unchanged(self, what: str, recorded: dict, inputs: dict) -> None:
        changed = _dotted_changes(recorded, inputs)
        if changed:
            raise StudyError(f"study cell {what} was made from other inputs ({', '.join(changed[:4])}"
                             f"{' ...' if len(changed) > 4 else ''} changed): delete its file to recompute it, or "
                             "restore the params/code it ran with")

    # ------------------------------------------------------------ shared work
    def dense_traces(self, params: Params, task: str, seed: int) -> Path:
        from resp.recipe import make_traces

        path = self.work / "traces" / task / f"seed-{seed}" / "dense.jsonl"
        if not path.exists():
            make_traces(params, task, params.tasks[task].calibration_split, None, path, base=self.base)
        return path

    def evaluate(self, params: Params, task: str, method: str, masks: dict[float, Path]) -> dict[str, dict]:
        """Results per target key, each evaluated once per (task, mask digest, evaluation params)."""
        from resp.evaluation import evaluate_masks
        from resp.masks import Mask

        ev_key = artifacts.json_digest(params.evaluation.model_dump(mode="json"))[:12]
        cache = self.work / "evals" / task / ev_key
        digests = {t: Mask.load(p)[0].digest() for t, p in masks.items()}
        todo = {t: p for t, p in masks.items() if not (cache / f"{digests[t]}.json").exists()}
        if todo:
            out = cache / f"batch-{method}.json"
            evaluate_masks(params, task, method, todo, None, out, include_dense=False)
            batch = json.loads(out.read_text())
            for t in todo:
                artifacts.write_json(cache / f"{digests[t]}.json", {"item_ids": batch["item_ids"],
                                                                     **batch["results"][artifacts.target_key(t)]})
            out.unlink()
        return {artifacts.target_key(t): json.loads((cache / f"{digests[t]}.json").read_text()) for t in masks}

    def dense(self, task: str) -> dict:
        from resp.evaluation import evaluate_masks

        path = self.root / "dense" / f"{task}.json"
        params = cell_params(self.params, None)
        inputs = {"evaluation": params.evaluation.model_dump(mode="json"), "model": self.base["key"],
                  "task": params.tasks[task].model_dump(mode="json"), "code": table.code_digest("evaluate")}
        if path.exists():
            found = json.loads(path.read_text())
            self._check_unchanged(f"dense/{task}", found["inputs"], inputs)
            return found
        tmp = self.work / "dense" / f"{task}.json"
        evaluate_masks(params, task, DENSE, {}, None, tmp, include_dense=True)
        result = json.loads(tmp.read_text())
        record = {"task": task, "inputs": inputs, "item_ids": result["item_ids"],
                  "result": _slim(result["results"][DENSE])}
        artifacts.write_json(path, record, newline=True)
        return record

    # ------------------------------------------------------------ one cell
    def run_cell(self, task: str, method: str, seed: int) -> dict:
        from resp.masks import Mask
        from resp.recipe import prune

        path = self.cell_file(task, method, seed)
        params = cell_params(self.params, seed)
        chosen = declared_method(params, method)
        traces = None
        if chosen.declaration.reads_dense_traces:
            tpath = self.dense_traces(params, task, seed)
            traces = {"path": str(tpath), "digest": json.loads(artifacts.manifest_path(tpath).read_text())["digest"]}
        inputs = self.inputs(params, task, method, traces)
        name = f"{task}/{method}/seed-{seed}"
        if path.exists():
            found = json.loads(path.read_text())
            self._check_unchanged(name, found["inputs"], inputs)
            return found
        started = time.perf_counter()
        run_dir = self.work / "runs" / task / method / f"seed-{seed}"
        if run_dir.exists():   # a killed cell: its run directory is the study's own, made under work_dir
            shutil.rmtree(run_dir)
        masks = prune(params, task, chosen, run_dir, dense_traces=traces["path"] if traces else None)
        results = self.evaluate(params, task, method, masks)
        s = loaded_model(params, self.base).masked.s
        for t, p in masks.items():
            results[artifacts.target_key(t)]["composition"] = Mask.load(p)[0].composition(s)
        summary = json.loads((run_dir / "summary.json").read_text())
        record = {"task": task, "method": method, "seed": seed, "inputs": inputs,
                  "regenerations": [{"tag": ts.get("tag"), "at_step": ts.get("at_step"), "sparsity": ts.get("sparsity")}
                                    for ts in summary["trace_sets"][1:]],
                  "drift_fired_at": [st["scored_sparsity"] for st in summary["steps"]
                                     if "drift_before_regeneration" in st],
                  "results": {k: _slim(v) for k, v in results.items()},
                  "wall_seconds": round(time.perf_counter() - started, 1)}
        artifacts.write_json(path, record, newline=True)
        log.info("study cell %s done in %.0f s -> %s", name, record["wall_seconds"], path)
        return record


def _slim(result: dict) -> dict:
    """What the analysis reads of an evaluation result: no per-completion records."""
    keep = ("target", "mask_digest", "sparsity", "structure_ratio", "composition", "greedy", "sampled")
    out = {k: result[k] for k in keep if k in result}
    for mode in ("greedy", "sampled"):
        if out.get(mode):
            out[mode] = {k: v for k, v in out[mode].items() if k != "records"}
    return out


def run_study(params: Params, limit: int | None = None) -> list[dict]:
    """Run every cell not yet finished (at most `limit` new ones), in `cells` order."""
    from tqdm import tqdm

    study = Study(params)
    study.open()
    for task in params.study.tasks:
        study.dense(task)
    done, new = [], 0
    todo = cells(params)
    for task, method, seed in tqdm(todo, desc="study cells", unit="cell"):
        if limit is not None and new >= limit and not study.cell_file(task, method, seed).exists():
            break
        new += not study.cell_file(task, method, seed).exists()
        done.append(study.run_cell(task, method, seed))
    log.info("study: %d of %d cells finished in %s", sum(study.cell_file(*c).exists() for c in todo), len(todo),
             study.root)
    return done
