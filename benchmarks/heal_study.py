"""Healing over the study (issue 23 item 4): every calibrated method's study masks at 30 % and 50 %, seeds 0-2,
both tasks, healed with the project's default heal settings (params.yaml methods.resp_heal.heal) and evaluated
like the study evaluated them, so healed and unhealed pair by seed and item.

    python benchmarks/heal_study.py --study /work/study-run            # heals what is missing, then the tables
    python benchmarks/heal_study.py --study /work/study-run --tables   # only the tables, from cached results

The study (`resp study`, resp/study.py) is read, never written: its cells (`<study.dir>/cells/<task>/<method>/
seed-<s>.json`) hold the unhealed per-item results, `<study.dir>/dense/<task>.json` the dense ones, and its run
directories (`<study.work_dir>/runs/<task>/<method>/seed-<s>/masks/`) the masks. A unit is one (task, method,
seed, target); units run in PRIORITY order (the first methods on arith at 50 %, then 30 %, then choice, then
the other methods), so whatever finished is a coherent table. Each unit's record is written atomically under
WORK/records when it is complete; a rerun skips finished units (a killed heal resumes from its checkpoint).

Per seed s, the healing data is the dense model's traces on the first heal.num_prompts calibration prompts with
the seed's calibration.seed and generation.seed (`resp.study.cell_params`): what the pipeline's heal_traces step
makes under that seed. The healed model is evaluated by `resp.evaluation.evaluate_masks`, the function the study
evaluates with, under the study's evaluation settings (checked equal to those its cells recorded).

Masks made before the model identity covered tokenizer and templates (resp.models.LEGACY_IDENTITY_FILES) name
the model by its legacy content hash; a mask is re-keyed to today's identity only after the legacy hash of the
model here is checked to equal the one it names (a copy under WORK/masks; the study's file is not touched).

Intervals: `resp.stats.cluster_bootstrap` over (seed, item) values, as resp/study_report.py: seeds resampled,
then items within each drawn seed; heal - unhealed pairs by seed and item; heal / dense is the ratio of means
under the same resamples; the dense model (evaluated once) counts the same for every seed.

Writes benchmarks/results/heal_study.md and heal_study.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HEAL_METHOD = "resp_heal"            # whose `heal: {...}` settings every mask is healed with
PRIORITY = ("resp", "gisp", "wanda_sp", "flap")                     # first, on every task and target
LATER = ("resp_noregen", "generic", "wanda_sp_self", "owl_sp")      # then, where their study cells exist
TASKS = ("arith", "choice")
TARGETS = (0.5, 0.3)
SEEDS = (0, 1, 2)
GOAL = 0.8                            # issue 23: RESP + heal at 50 % reaches >= 80 % of dense accuracy
MODES = ("greedy", "sampled")

log = logging.getLogger("heal_study")


# ---------------------------------------------------------------- what to run, in which order

def plan(tasks=TASKS, targets=TARGETS, seeds=SEEDS, first=PRIORITY, later=LATER) -> list[tuple[str, str, int, float]]:
    """(task, method, seed, target) units in run order: the `first` methods per task and target (tasks outer,
    targets in the given order), every seed of a method before the next method; then `later` the same way."""
    return [(task, method, seed, target) for methods in (first, later) for task in tasks for target in targets
            for method in methods for seed in seeds]


def unit_name(task: str, method: str, seed: int, target: float) -> str:
    return f"{task}-{method}-seed{seed}-{target:.2f}"


# ---------------------------------------------------------------- intervals

def cluster_ratio(num, den, samples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean(num) / mean(den), low, high) over (seeds x items) arrays, with the two-stage resamples of
    `resp.stats.cluster_bootstrap` (same generator, same draws) applied to both arrays jointly."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 2 or 0 in num.shape:
        raise ValueError(f"a ratio needs two seeds x items arrays of one shape, not {num.shape} and {den.shape}")
    n_seeds, n_items = num.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(samples, n_seeds))
    items = rng.integers(0, n_items, size=(samples, n_seeds, n_items))
    ratios = (num[seeds[..., None], items].mean(axis=(1, 2))
              / np.maximum(den[seeds[..., None], items].mean(axis=(1, 2)), 1e-12))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(num.mean() / den.mean()), float(low), float(high)


def per_item(result: dict, mode: str, n_items: int) -> np.ndarray | None:
    """Strict correctness of the first `n_items` items (sampled: the mean over samples), as resp/study_report.py."""
    block = result.get(mode)
    if not block:
        return None
    if mode == "greedy":
        values = np.asarray(block["per_item"]["correct_strict"], dtype=np.float64)
    else:
        values = np.mean([s["per_item"]["correct_strict"] for s in block["per_sample"]], axis=0)
    return values[:n_items]


def mode_stats(result: dict, mode: str) -> dict | None:
    block = result.get(mode)
    if not block:
        return None
    return {k: block[k] for k in ("accuracy_strict", "accuracy_flexible", "mean_completion_tokens", "truncation_rate",
                                  "reflection_rate")}


def _mean(values: list) -> float | None:
    """Mean of the measured values (None: not measured)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def summarize_row(healed: list[dict], unhealed: list[dict], dense: dict, report) -> dict:
    """One (task, method, target) row over the seeds in `healed` (records of this script, in seed order)
    and `unhealed` (the study cells' results of the same seeds and target); `dense` the study's dense result."""
    n = min(len(r["item_ids"]) for r in healed)
    row = {"seeds": [r["seed"] for r in healed], "items": n,
           "sparsity": float(np.mean([r["sparsity"] for r in healed])),
           "cost": {k: _mean([r["cost"][k] for r in healed]) for k in healed[0]["cost"]},
           "loss": {k: float(np.mean([r["loss"][k] for r in healed])) for k in ("mean_first_10", "mean_last_10")}}
    args = (report.bootstrap_samples, report.confidence, report.seed)
    from resp.stats import cluster_bootstrap

    for mode in MODES:
        h = [per_item(r, mode, n) for r in healed]
        if any(v is None for v in h):
            row[mode] = None
            continue
        h = np.stack(h)
        u = np.stack([per_item(r, mode, n) for r in unhealed])
        d = np.stack([per_item(dense, mode, n)] * len(healed))
        stats = {"healed": [mode_stats(r, mode) for r in healed], "unhealed": [mode_stats(r, mode) for r in unhealed],
                 "dense": mode_stats(dense, mode)}
        mean = {who: {k: float(np.mean([s[k] for s in stats[who]])) for k in stats["dense"]}
                for who in ("healed", "unhealed")}
        row[mode] = {
            "dense": cluster_bootstrap(d, *args), "unhealed": cluster_bootstrap(u, *args),
            "healed": cluster_bootstrap(h, *args), "healed_minus_unhealed": cluster_bootstrap(h - u, *args),
            "healed_over_dense": cluster_ratio(h, d, *args),
            "per_seed": {"healed": h.mean(axis=1).tolist(), "unhealed": u.mean(axis=1).tolist()},
            # the paper-independent view of what recovery does to the outputs (issue 23 item 4)
            "failure": {"dense": stats["dense"], **mean},
        }
    return row


# ---------------------------------------------------------------- the study as input

class StudyInput:
    """What this benchmark reads of a study run at its own commit (cells, dense results, masks)."""

    def __init__(self, checkout: Path, params):
        self.root = checkout / params.study.dir
        self.work = checkout / params.study.work_dir
        if not (self.root / "study.json").is_file():
            raise SystemExit(f"{self.root} holds no study.json: pass --study the checkout the study ran in")

    def cell(self, task: str, method: str, seed: int) -> dict | None:
        path = self.root / "cells" / task / method / f"seed-{seed}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def has_dense(self, task: str) -> bool:
        return (self.root / "dense" / f"{task}.json").is_file()

    def dense(self, task: str) -> dict:
        return json.loads((self.root / "dense" / f"{task}.json").read_text())

    def mask(self, task: str, method: str, seed: int, target: float) -> Path:
        from resp import artifacts

        return artifacts.mask_file(self.work / "runs" / task / method / f"seed-{seed}" / "masks", target)


def rekeyed_mask(study_mask: Path, out: Path, model_path: str) -> Path:
    """`study_mask` as a mask for today's identity of `model_path` (a copy at `out`), after checking that the
    model here is the one it was made for (its key may be the legacy content hash)."""
    from resp.masks import Mask
    from resp.models import LEGACY_IDENTITY_FILES, content_hash, model_identity

    if out.is_file():
        return out
    mask, meta = Mask.load(study_mask)
    identity = model_identity(model_path)
    made_for = meta["model"]["key"]
    if made_for not in (identity.key, content_hash(model_path, LEGACY_IDENTITY_FILES)):
        raise SystemExit(f"{study_mask} was made for model {made_for[:16]}, which is not {model_path} here "
                         f"(today's key {identity.key[:16]}, legacy key differs too): use the model the study ran on")
    mask.save(out, {**{k: v for k, v in meta.items() if k != "digest"},
                    "model": {**identity.to_dict(), "key": identity.key},
                    "rekeyed_from": {"path": str(study_mask), "model_key": made_for}})
    return out


# ---------------------------------------------------------------- one unit

def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def heal_traces(params, task: str, seed: int, work: Path) -> Path:
    """The seed's healing traces (made once per task and seed)."""
    from resp.recipe import make_traces
    from resp.study import cell_params

    p = cell_params(params, seed)
    h = p.methods[HEAL_METHOD].heal
    path = work / "traces" / task / f"seed-{seed}" / f"heal-{h.num_prompts}.jsonl"
    if not path.is_file():
        make_traces(p, task, p.tasks[task].calibration_split, h.num_prompts, path)
    return path


def run_unit(params, study: StudyInput, work: Path, task: str, method: str, seed: int, target: float,
             num_items: int | None, greedy_only: bool) -> dict:
    from resp import artifacts
    from resp.config import Params
    from resp.evaluation import evaluate_masks
    from resp.healing import heal, healed_mask
    from resp.stages.table import code_record
    from resp.study import cell_params
    from resp.traces import TraceSet

    name = unit_name(task, method, seed, target)
    out = work / "records" / f"{name}.json"
    if out.is_file():
        return json.loads(out.read_text())
    p = cell_params(params, seed)
    cell = study.cell(task, method, seed)
    if cell["inputs"]["evaluation"] != p.evaluation.model_dump(mode="json"):
        raise SystemExit(f"study cell {task}/{method}/seed-{seed} was evaluated with other evaluation settings than "
                         "this checkout's study settings: run this benchmark from a checkout with the study's params")
    h = p.methods[HEAL_METHOD].heal
    traces = heal_traces(params, task, seed, work)
    mask = rekeyed_mask(study.mask(task, method, seed, target), work / "masks" / f"{name}.safetensors",
                        p.model.name_or_path)
    healed_dir = work / "healed" / name
    wall, cpu = time.perf_counter(), cpu_seconds()
    if not (healed_dir / "resp_heal.json").is_file():
        heal(h, p.model, task, p.tasks[task].calibration_split, mask, [traces], healed_dir, p.prune.attention_unit,
             p.prune.protected_layers, code_record("heal"), HEAL_METHOD)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    manifest = json.loads((healed_dir / "resp_heal.json").read_text())

    tree = p.model_dump(mode="json")
    tree["model"]["name_or_path"] = str(healed_dir)
    if num_items:
        tree["evaluation"]["num_items"] = num_items
    if greedy_only:
        tree["evaluation"]["samples"] = 0
    ev_params = Params.model_validate(tree)
    ev_out = work / "evals" / f"{name}.json"
    ev_wall, ev_cpu = time.perf_counter(), cpu_seconds()
    evaluate_masks(ev_params, task, method, {target: healed_mask(healed_dir)}, None, ev_out, include_dense=False)
    ev_wall, ev_cpu = time.perf_counter() - ev_wall, cpu_seconds() - ev_cpu
    ev = json.loads(ev_out.read_text())
    result = ev["results"][artifacts.target_key(target)]
    for mode in MODES:
        if result.get(mode):
            result[mode] = {k: v for k, v in result[mode].items() if k != "records"}
    record = {"task": task, "method": method, "seed": seed, "target": target, "study_mask": str(study.mask(task, method, seed, target)),
              "mask_digest": manifest["mask"]["digest"], "heal": manifest["heal"],
              "healing_traces": {"path": str(traces), "digest": TraceSet.load(traces).manifest["digest"]},
              "cost": {"wall_s": wall, "cpu_s": cpu, "trained_tokens": manifest["trained_tokens"],
                       "eval_wall_s": ev_wall, "eval_cpu_s": ev_cpu},
              "loss": manifest["loss"], "item_ids": ev["item_ids"], "sparsity": result["sparsity"],
              "greedy": result["greedy"], "sampled": result.get("sampled"), "code": manifest["code"]}
    if wall < 1:   # healed by an earlier, interrupted run: its cost was not measured here
        record["cost"].update(wall_s=None, cpu_s=None)
    artifacts.write_json(out, record, newline=True)
    return record


# ---------------------------------------------------------------- tables

def summarize(params, study: StudyInput, work: Path) -> dict:
    from resp.study import cell_params

    report = params.report
    rows, records = [], {}
    for task in TASKS:
        if not study.has_dense(task):
            continue
        dense = study.dense(task)
        for target in TARGETS:
            for method in (*PRIORITY, *LATER):
                healed = [json.loads(f.read_text()) for seed in SEEDS
                          if (f := work / "records" / f"{unit_name(task, method, seed, target)}.json").is_file()]
                if not healed:
                    continue
                unhealed = [study.cell(task, method, r["seed"])["results"][f"{target:.2f}"] for r in healed]
                for r in healed:
                    n = len(r["item_ids"])
                    assert r["item_ids"] == dense["item_ids"][:n], "healed and study items differ"
                row = summarize_row(healed, unhealed, dense["result"], report)
                rows.append({"task": task, "method": method, "target": target, **row})
                records[task, target, method] = list(zip(healed, unhealed))
    goal = {}
    for task in TASKS:
        for row in rows:
            if row["task"] == task and row["method"] == "resp" and row["target"] == 0.5:
                goal[task] = {mode: None if row[mode] is None else {
                    "healed_over_dense": row[mode]["healed_over_dense"], "seeds": row["seeds"],
                    "reached": row[mode]["healed_over_dense"][1] >= GOAL,
                    "point_reached": row[mode]["healed_over_dense"][0] >= GOAL} for mode in MODES}
    failures = [json.loads(f.read_text()) for f in sorted((work / "failures").glob("*.json"))]
    versus = versus_reference(records, report)
    p = cell_params(params, 0)
    return {"failures": failures, "heal": params.methods[HEAL_METHOD].heal.model_dump(mode="json"),
            "evaluation": p.evaluation.model_dump(mode="json"), "report": report.model_dump(mode="json"),
            "goal": {"fraction_of_dense": GOAL, "by_task": goal}, "rows": rows, "versus_resp": versus}


def versus_reference(records: dict, report) -> list[dict]:
    """Each method minus RESP on the same task, target, seeds and items, before healing (the study's cells)
    and after (both healed alike): does the calibration gap survive healing? Paired cluster bootstrap."""
    from resp.stats import cluster_bootstrap

    args = (report.bootstrap_samples, report.confidence, report.seed)
    out = []
    for (task, target, method), pairs in records.items():
        reference = {h["seed"]: (h, u) for h, u in records.get((task, target, "resp"), [])}
        pairs = [(h, u) for h, u in pairs if h["seed"] in reference]
        if method == "resp" or not pairs:
            continue
        n = min(len(r["item_ids"]) for h, _ in pairs for r in (h, reference[h["seed"]][0]))
        entry = {"task": task, "target": target, "method": method, "seeds": [h["seed"] for h, _ in pairs]}
        for mode in MODES:
            diffs = {}
            for who, index in (("unhealed", 1), ("healed", 0)):
                mine = [per_item(pair[index], mode, n) for pair in pairs]
                ref = [per_item(reference[pair[0]["seed"]][index], mode, n) for pair in pairs]
                if any(v is None for v in mine + ref):
                    break
                diffs[who] = cluster_bootstrap(np.stack(mine) - np.stack(ref), *args)
            entry[mode] = diffs if len(diffs) == 2 else None
        out.append(entry)
    return out


def _pct(iv) -> str:
    return f"{100 * iv[0]:.1f} [{100 * iv[1]:.1f}, {100 * iv[2]:.1f}]"


def _diff(iv) -> str:
    verdict = "" if iv[1] <= 0 <= iv[2] else (" **+**" if iv[1] > 0 else " **-**")
    return f"{100 * iv[0]:+.1f} [{100 * iv[1]:+.1f}, {100 * iv[2]:+.1f}]{verdict}"


def _ratio(iv) -> str:
    return f"{iv[0]:.2f} [{iv[1]:.2f}, {iv[2]:.2f}]"


def write_tables(summary: dict, wall_total: float | None) -> None:
    ev, h = summary["evaluation"], summary["heal"]
    lines = ["# Healing over the study's seeds (benchmarks/heal_study.py)", "",
             f"Every calibrated method's study masks (resp/study.py, the run at commit 8141608) healed with the default "
             f"heal settings (methods.{HEAL_METHOD}.heal: {h['steps']} steps x {h['batch_size']} traces, {h['loss']}, "
             f"{h['mode']}, lr {h['lr']} {h['schedule']}, on the dense model's traces of the first {h['num_prompts']} "
             "calibration prompts under each study seed), evaluated as the study evaluated the unhealed masks "
             f"(`resp.evaluation.evaluate_masks`; first {ev['num_items']} test items, greedy and {ev['samples']} sampled "
             f"completion per item at T={ev['temperature']}, max {ev['max_new_tokens']} new tokens). Strict accuracy (%); "
             "95 % intervals: two-stage bootstrap over seeds, then items (`resp.stats.cluster_bootstrap`); heal - "
             "unhealed pairs by seed and item (**+**/**-**: the interval excludes 0); heal / dense is a ratio of means "
             "under the same resamples. Per-seed values in parentheses.", ""]
    for mode in MODES:
        lines += [f"## {mode}", "", "| task | target | method | seeds | dense | unhealed | healed | heal - unhealed | "
                  "heal / dense |", "|---|---|---|---:|---|---|---|---|---|"]
        for r in summary["rows"]:
            m = r[mode]
            if m is None:
                continue
            per = " / ".join(f"{100 * v:.1f}" for v in m["per_seed"]["healed"])
            lines.append(f"| {r['task']} | {r['target']:.0%} | {r['method']} | {len(r['seeds'])} | {_pct(m['dense'])} | "
                         f"{_pct(m['unhealed'])} | {_pct(m['healed'])} ({per}) | {_diff(m['healed_minus_unhealed'])} | "
                         f"{_ratio(m['healed_over_dense'])} |")
        lines.append("")
    lines += ["## Goal: RESP + heal at 50 % >= 80 % of dense (issue 23)", ""]
    for task, g in summary["goal"]["by_task"].items():
        for mode, v in g.items():
            if v is None:
                continue
            verdict = ("reached (the whole interval >= 0.80)" if v["reached"] else
                       "point estimate >= 0.80, interval reaches below" if v["point_reached"] else "not reached")
            lines.append(f"- {task}, {mode}, seeds {v['seeds']}: heal / dense {_ratio(v['healed_over_dense'])}: {verdict}")
    lines += ["", "## Does the calibration gap survive healing?", "",
              "Each method minus RESP, same task, target, seeds and items, paired by seed and item (cluster bootstrap): "
              "before healing (the study's masks as evaluated there) and after healing both the same way.", "",
              "| task | target | method | seeds | greedy: before | greedy: after heal | sampled: before | sampled: after heal |",
              "|---|---|---|---:|---|---|---|---|"]
    for v in summary["versus_resp"]:
        cells = [f"{_diff(v[mode][who])}" if v[mode] else "-" for mode in MODES for who in ("unhealed", "healed")]
        lines.append(f"| {v['task']} | {v['target']:.0%} | {v['method']} | {len(v['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Failure modes and cost", "",
              "Greedy / sampled, mean over seeds: mean completion tokens, truncation rate (hit max_new_tokens), flexible "
              "accuracy (any number/option extracted) next to strict (the `Answer:` format), for dense (d), unhealed (u) "
              "and healed (h). Heal cost per mask, mean over seeds: wall and CPU seconds of the heal call (one thread, "
              "nice 10, on a 2-core machine shared with the study), completion tokens trained on; eval CPU s is the "
              "healed model's evaluation.", "",
              "| task | target | method | tokens d/u/h | trunc d/u/h | strict d/u/h | flexible d/u/h | heal wall s | "
              "heal CPU s | trained tokens | eval CPU s | KL first10 -> last10 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        cells = []
        for key, fmt in (("mean_completion_tokens", "{:.0f}"), ("truncation_rate", "{:.3f}"),
                         ("accuracy_strict", "{:.3f}"), ("accuracy_flexible", "{:.3f}")):
            parts = []
            for mode in MODES:
                if r[mode] is None:
                    continue
                f = r[mode]["failure"]
                parts.append("/".join(fmt.format(f[who][key]) for who in ("dense", "unhealed", "healed")))
            cells.append(" ; ".join(parts))
        c = r["cost"]
        lines.append(f"| {r['task']} | {r['target']:.0%} | {r['method']} | " + " | ".join(cells) +
                     f" | {c['wall_s']:.0f} | {c['cpu_s']:.0f} | {c['trained_tokens']:.0f} | {c['eval_cpu_s']:.0f} | "
                     f"{r['loss']['mean_first_10']:.3f} -> {r['loss']['mean_last_10']:.3f} |")
    if summary["failures"]:
        lines += ["", "## Not healed", "", "Units the library could not heal or reload (WORK/failures; the method was then "
                  "skipped with --skip):", ""]
        lines += [f"- {f['unit']}: {f['error']}" for f in summary["failures"]]
    if wall_total is not None:
        lines += ["", f"Wall time of the run that wrote this table: {wall_total / 60:.0f} min."]
    from resp import artifacts

    artifacts.write_text(RESULTS / "heal_study.md", "\n".join(lines) + "\n")
    artifacts.write_json(RESULTS / "heal_study.json", summary, newline=True)


def main() -> None:
    from tqdm import tqdm

    from resp import artifacts
    from resp.config import load_params
    from resp.healing import HealError
    from resp.masks import MaskError
    from resp.models import ModelLoadError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="the checkout the study ran in (read only)")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "study" / "heal",
                        help="healing traces, healed models, evaluations and unit records (default data/study/heal)")
    parser.add_argument("--items", type=int, help="evaluate the first N items only (default: the study's number)")
    parser.add_argument("--greedy-only", action="store_true", help="skip the sampled evaluation")
    parser.add_argument("--tables", action="store_true", help="only write the tables from finished units")
    parser.add_argument("--skip", nargs="*", default=[], help="methods not to heal in this run")
    parser.add_argument("--keep-models", action="store_true", help="keep healed model directories (9 MB each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(ROOT / "params.yaml")
    study = StudyInput(args.study, params)
    started = time.perf_counter()
    if not args.tables:
        units = [u for u in plan() if study.cell(u[0], u[1], u[2]) is not None]
        log.info("%d units with a finished study cell; records under %s", len(units), args.work / "records")
        units = [u for u in units if u[1] not in args.skip]
        for task, method, seed, target in tqdm(units, desc="heal study", unit="mask"):
            name = unit_name(task, method, seed, target)
            try:
                record = run_unit(params, study, args.work, task, method, seed, target, args.items, args.greedy_only)
            except (HealError, ModelLoadError, MaskError) as e:   # a unit the library cannot heal: say so, go on
                log.error("%s failed: %s", name, e)
                artifacts.write_json(args.work / "failures" / f"{name}.json", {"unit": name, "error": str(e)}, newline=True)
                continue
            log.info("%s: greedy strict %.3f (heal %.0f s wall / %.0f s CPU)", name,
                     record["greedy"]["accuracy_strict"], record["cost"]["wall_s"], record["cost"]["cpu_s"])
            (args.work / "failures" / f"{name}.json").unlink(missing_ok=True)   # an earlier attempt's failure
            if not args.keep_models:
                shutil.rmtree(args.work / "healed" / name, ignore_errors=True)
            write_tables(summarize(params, study, args.work), None)
    write_tables(summarize(params, study, args.work), None if args.tables else time.perf_counter() - started)
    log.info("wrote %s and %s", RESULTS / "heal_study.md", RESULTS / "heal_study.json")


if __name__ == "__main__":
    main()
