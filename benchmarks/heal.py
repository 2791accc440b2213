"""Healing on the embedded world: RESP masks at 30 % and 50 %, with and without `resp.healing`.

    python benchmarks/heal.py --work /tmp/h23 [--only NAME ...]   # runs what is missing, then writes the tables
    python benchmarks/heal.py --work /tmp/h23s1 --results heal-calibration-seed1 --only ...   # another calibration seed
    python benchmarks/heal.py --work /tmp/h23 --tables --pool /tmp/h23s1   # + heal-pooled: over both seeds

Expects, per task, the dense calibration traces, the RESP run and a larger healing trace set:
    resp traces --task T --out WORK/T/dense.jsonl
    resp prune --task T --method resp --traces WORK/T/dense.jsonl --out WORK/T/resp
    resp traces --task T --limit 512 --out WORK/T/heal512.jsonl
Every evaluation is the project's (`resp.evaluation`, evaluation.* of params.yaml: greedy and
sampled, strict and flexible); the unhealed models go through `resp.api.evaluate`, the healed ones
through the same per-model protocol on the healed weights. Each result is cached as a JSON file
under WORK/bench, so an interrupted run continues. Intervals: paired bootstrap over items
(`resp.stats`, report.* settings). Heal cost: wall and CPU seconds of the heal call (the machine is
shared, so CPU seconds are the fairer number) and completion tokens trained on.

Writes benchmarks/results/heal.md and heal.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# name: (task, target, heal overrides of methods.resp_heal.heal); the first rows are the main table
DEFAULT = "kl-full-lr3e-4"   # params.yaml methods.resp_heal.heal: the settings the rows below chose

HEALS = {
    # learning rate (full fine-tuning, KL, 100 steps of 8 traces): 1e-3 first, then 3e-4
    "arith-0.30-kl-full-lr1e-3": ("arith", 0.3, ["lr=0.001"]),
    "arith-0.50-kl-full-lr1e-3": ("arith", 0.5, ["lr=0.001"]),
    "arith-0.30-kl-full-lr3e-4": ("arith", 0.3, ["lr=0.0003"]),
    "arith-0.50-kl-full-lr3e-4": ("arith", 0.5, ["lr=0.0003"]),
    "arith-0.30-kl-full-lr1e-4": ("arith", 0.3, ["lr=0.0001"]),
    "arith-0.50-kl-full-lr1e-4": ("arith", 0.5, ["lr=0.0001"]),
    # the other task at the chosen settings
    "choice-0.30-kl-full-lr3e-4": ("choice", 0.3, ["lr=0.0003"]),
    "choice-0.50-kl-full-lr3e-4": ("choice", 0.5, ["lr=0.0003"]),
    # loss and adapter at the same budget
    "arith-0.50-ce-full-lr3e-4": ("arith", 0.5, ["lr=0.0003", "loss=ce"]),
    "arith-0.50-kl-lora8-lr3e-3": ("arith", 0.5, ["lr=0.003", "mode=lora", "lora_rank=8"]),
    # another healing seed (batch order)
    "arith-0.50-kl-full-lr3e-4-seed1": ("arith", 0.5, ["lr=0.0003", "seed=1"]),
}


def params_for(overrides: list[str]):
    from resp.config import load_params

    return load_params(ROOT / "params.yaml", [f"methods.resp_heal.heal.{o}" for o in overrides])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def evaluate_unhealed(work: Path, task: str) -> dict:
    """Dense and RESP at every target, by `resp.api.evaluate` (cached)."""
    from resp.api import evaluate

    out = work / "bench" / f"{task}-unhealed.json"
    if not out.is_file():
        evaluate(params_for([]), task, work / task / "resp", out, method="resp", dense=True,
                 heldout=work / task / "heldout.jsonl")
    return json.loads(out.read_text())


def heldout_nll(work: Path, name: str) -> None:
    """Decode-only NLL of a healed model on the dense model's held-out traces (test split), added to its record."""
    from resp.evaluation import decode_only_nll
    from resp.models import load_model
    from resp.traces import TraceSet

    path = work / "bench" / f"{name}.json"
    record = json.loads(path.read_text())
    if record.get("nll"):
        return
    p = params_for([])
    model, tokenizer = load_model(record["healed_dir"])
    traces = TraceSet.load(work / record["task"] / "heldout.jsonl").traces[: p.evaluation.nll_traces]
    record["nll"] = decode_only_nll(model, traces, p.evaluation.nll_batch_size, tokenizer.pad_token_id, desc=f"nll {name}")
    path.write_text(json.dumps(record, indent=1))


def heal_and_evaluate(work: Path, name: str) -> dict:
    from resp.evaluation import _evaluate_current
    from resp.healing import heal, load_healed
    from resp.stages.table import code_record
    from resp.tasks import load_items
    from resp.traces import TraceSet

    out = work / "bench" / f"{name}.json"
    if out.is_file():
        return json.loads(out.read_text())
    task, target, overrides = HEALS[name]
    p = params_for(overrides)
    h = p.methods["resp_heal"].heal
    healed_dir = work / task / "healed" / name
    mask = work / task / "resp" / "masks" / f"sparsity-{target:.2f}.safetensors"
    traces = work / task / f"heal{h.num_prompts}.jsonl"
    wall, cpu = time.perf_counter(), cpu_seconds()
    heal(h, p.model, task, p.tasks[task].calibration_split, mask, [traces], healed_dir, p.prune.attention_unit,
         p.prune.protected_layers, code_record("heal"), "resp_heal")
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    model, tokenizer, _, manifest = load_healed(healed_dir)
    t = p.tasks[task]
    items = load_items(t, t.eval_split)[: p.evaluation.num_items]
    heldout = TraceSet.load(work / task / "heldout.jsonl").traces[: p.evaluation.nll_traces]
    metrics = _evaluate_current(model, tokenizer, items, t.format, p.evaluation, heldout, name, None)
    record = {"name": name, "task": task, "target": target, "heal": manifest["heal"], "healed_dir": str(healed_dir),
              "cost": {"wall_s": wall, "cpu_s": cpu, "trained_tokens": manifest["trained_tokens"],
                       "healing_traces": sum(x["n"] for x in manifest["traces"])},
              "loss": manifest["loss"], "item_ids": [i.id for i in items], **metrics}
    out.write_text(json.dumps(record, indent=1))
    return record


def correct(result: dict, mode: str) -> np.ndarray:
    """Strict correctness per item: greedy [items]; sampled [items x samples] (resp.stats averages the samples)."""
    if mode == "greedy":
        return np.asarray(result[mode]["per_item"]["correct_strict"], dtype=float)
    return np.asarray([s["per_item"]["correct_strict"] for s in result[mode]["per_sample"]], dtype=float).T


def ratio_interval(a: np.ndarray, b: np.ndarray, samples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """mean(a) / mean(b) with a paired percentile bootstrap over items."""
    from resp.stats import item_values, resample_indices

    a, b = item_values(a), item_values(b)
    idx = resample_indices(a.size, samples, seed)
    ratios = a[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-12)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(a.mean() / b.mean()), float(low), float(high)


def summarize(work: Path) -> dict:
    from resp.stats import bootstrap_interval, paired_difference

    p = params_for([])
    r = p.report
    rows = []
    for name in HEALS:
        path = work / "bench" / f"{name}.json"
        if not path.is_file():
            continue
        healed = json.loads(path.read_text())
        unhealed = json.loads((work / "bench" / f"{healed['task']}-unhealed.json").read_text())
        key = f"{healed['target']:.2f}"
        pruned, dense = unhealed["results"][key], unhealed["results"]["dense"]
        assert unhealed["item_ids"] == healed["item_ids"], "paired comparisons need the same items"
        row = {"name": name, "task": healed["task"], "target": healed["target"], "heal": healed["heal"],
               "cost": healed["cost"], "loss": healed["loss"], "sparsity": pruned["sparsity"],
               "nll": {"dense": (dense.get("nll") or {}).get("nll"), "pruned": (pruned.get("nll") or {}).get("nll"),
                       "healed": (healed.get("nll") or {}).get("nll")}}
        for mode in ("greedy", "sampled"):
            h, u, d = correct(healed, mode), correct(pruned, mode), correct(dense, mode)
            row[mode] = {
                "dense": bootstrap_interval(d, r.bootstrap_samples, r.confidence, r.seed),
                "pruned": bootstrap_interval(u, r.bootstrap_samples, r.confidence, r.seed),
                "healed": bootstrap_interval(h, r.bootstrap_samples, r.confidence, r.seed),
                "healed_minus_pruned": paired_difference(h, u, r.bootstrap_samples, r.confidence, r.seed),
                "healed_over_dense": ratio_interval(h, d, r.bootstrap_samples, r.confidence, r.seed),
                "flexible": {"dense": dense[mode]["accuracy_flexible"], "pruned": pruned[mode]["accuracy_flexible"],
                             "healed": healed[mode]["accuracy_flexible"]},
                "length": {"dense": dense[mode]["mean_completion_tokens"], "pruned": pruned[mode]["mean_completion_tokens"],
                           "healed": healed[mode]["mean_completion_tokens"]},
                "truncation": {"dense": dense[mode]["truncation_rate"], "pruned": pruned[mode]["truncation_rate"],
                               "healed": healed[mode]["truncation_rate"]},
                "self_check": {"dense": dense[mode]["reflection_rate"], "pruned": pruned[mode]["reflection_rate"],
                               "healed": healed[mode]["reflection_rate"]},
            }
        rows.append(row)
    comparisons = []   # every variant against the default settings on the same task and mask, paired by item
    for row in rows:
        default = f"{row['task']}-{row['target']:.2f}-{DEFAULT}"
        if row["name"] == default or not (work / "bench" / f"{default}.json").is_file():
            continue
        a = json.loads((work / "bench" / f"{row['name']}.json").read_text())
        b = json.loads((work / "bench" / f"{default}.json").read_text())
        comparisons.append({"variant": row["name"], "default": default, **{
            mode: paired_difference(correct(a, mode), correct(b, mode), r.bootstrap_samples, r.confidence, r.seed)
            for mode in ("greedy", "sampled")}})
    return {"evaluation": p.evaluation.model_dump(mode="json"), "report": r.model_dump(mode="json"), "rows": rows,
            "default": DEFAULT, "comparisons": comparisons}


def _triple(values: dict) -> str:
    return "/".join(f"{values[k]:.2f}" for k in ("dense", "pruned", "healed"))


def _nll(n: dict) -> str:
    return " / ".join("-" if n[k] is None else f"{n[k]:.4f}" for k in ("dense", "pruned", "healed"))


def _ci(x) -> str:
    return f"{x[0]:.2f} [{x[1]:.2f}, {x[2]:.2f}]"


def write_tables(summary: dict, name: str) -> None:
    ev = summary["evaluation"]
    lines = ["# Healing on the embedded world (benchmarks/heal.py)", "",
             f"RESP masks (main-job params: calibration.num_prompts, prune.steps, milestones), healed by `resp.healing` on "
             f"the dense model's own traces of the train split. {ev['num_items']} test items, max {ev['max_new_tokens']} "
             "new tokens, greedy and sampled "
             f"(T={ev['temperature']}, {ev['samples']} sample/item). Accuracy is strict; intervals are 95 % paired "
             "bootstrap over items (2000 resamples). Heal cost: seconds of the heal call on the shared 2-core machine "
             "(wall; CPU of this process) and completion tokens trained on.", "",
             "| run | mode | dense | RESP | RESP + heal | heal - RESP | heal / dense | len d/p/h | trunc d/p/h | "
             "self-check d/p/h | flexible d/p/h |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        for mode in ("greedy", "sampled"):
            m = row[mode]
            lines.append(f"| {row['name']} | {mode} | {_ci(m['dense'])} | {_ci(m['pruned'])} | {_ci(m['healed'])} | "
                         f"{_ci(m['healed_minus_pruned'])} | {_ci(m['healed_over_dense'])} | "
                         f"{m['length']['dense']:.0f}/{m['length']['pruned']:.0f}/{m['length']['healed']:.0f} | "
                         f"{m['truncation']['dense']:.2f}/{m['truncation']['pruned']:.2f}/{m['truncation']['healed']:.2f} | "
                         f"{_triple(m['self_check'])} | {_triple(m['flexible'])} |")
    lines += ["", "Held-out NLL: decode-only NLL per completion token of the dense model's own traces on the first "
              f"{ev['nll_traces']} test prompts (what the dense model would say; lower = closer to the teacher).", "",
              "| run | sparsity | steps | loss | mode | lr | traces | trained tokens | wall s | CPU s | "
              "NLL dense / RESP / healed |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        h, c = row["heal"], row["cost"]
        mode = h["mode"] + (f" r{h['lora_rank']}" if h["mode"] == "lora" else "")
        lines.append(f"| {row['name']} | {row['sparsity']:.3f} | {h['steps']} | {h['loss']} | {mode} | {h['lr']} | "
                     f"{c['healing_traces']} | {c['trained_tokens']} | {c['wall_s']:.0f} | {c['cpu_s']:.0f} | "
                     f"{_nll(row['nll'])} |")
    lines += ["", f"Variants against the default settings ({summary['default']}, same mask), healed minus default, "
              "paired over items:", "", "| variant | default | greedy | sampled |", "|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(f"| {c['variant']} | {c['default']} | {_ci(c['greedy'])} | {_ci(c['sampled'])} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")


def pooled(works: list[Path]) -> list[dict]:
    """Rows healed in every one of `works` (calibration seeds: each work dir has its own dense traces, masks and
    healing traces): items x seeds arrays, items resampled with each item's mean over seeds (resp.stats)."""
    from resp.stats import paired_difference

    r = params_for([]).report
    rows = []
    for name, (task, target, _) in HEALS.items():
        paths = [w / "bench" / f"{name}.json" for w in works]
        if not all(p.is_file() for p in paths):
            continue
        row = {"name": name, "seeds": [str(w) for w in works]}
        for mode in ("greedy", "sampled"):
            h, u, d = [], [], []
            for w, path in zip(works, paths):
                unhealed = json.loads((w / "bench" / f"{task}-unhealed.json").read_text())["results"]
                h.append(correct(json.loads(path.read_text()), mode).reshape(len(unhealed["dense"]["greedy"]["per_item"]
                                                                                ["correct_strict"]), -1))
                u.append(correct(unhealed[f"{target:.2f}"], mode).reshape(h[-1].shape[0], -1))
                d.append(correct(unhealed["dense"], mode).reshape(h[-1].shape[0], -1))
            h, u, d = (np.concatenate(x, axis=1) for x in (h, u, d))
            row[mode] = {"healed_over_dense": ratio_interval(h, d, r.bootstrap_samples, r.confidence, r.seed),
                         "healed_minus_pruned": paired_difference(h, u, r.bootstrap_samples, r.confidence, r.seed),
                         "dense": float(d.mean()), "pruned": float(u.mean()), "healed": float(h.mean())}
        rows.append(row)
    return rows


def write_pooled(rows: list[dict], name: str) -> None:
    lines = ["# Healing pooled over calibration seeds (benchmarks/heal.py --pool)", "",
             f"Work directories (one calibration/generation seed each): {', '.join(rows[0]['seeds']) if rows else '-'}. "
             "Per item, the mean over seeds; items resampled (paired, 95 %).", "",
             "| run | mode | dense | RESP | RESP + heal | heal - RESP | heal / dense |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for mode in ("greedy", "sampled"):
            m = row[mode]
            lines.append(f"| {row['name']} | {mode} | {m['dense']:.3f} | {m['pruned']:.3f} | {m['healed']:.3f} | "
                         f"{_ci(m['healed_minus_pruned'])} | {_ci(m['healed_over_dense'])} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--only", nargs="*", help="heal runs to do (default: all of HEALS)")
    parser.add_argument("--tables", action="store_true", help="only write the tables from cached results")
    parser.add_argument("--results", default="heal", help="name of the results files (benchmarks/results/NAME.md/.json)")
    parser.add_argument("--pool", type=Path, nargs="*", help="further work dirs (other calibration seeds): write "
                                                                "RESULTS-pooled tables over --work and these")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args.work / "bench").mkdir(parents=True, exist_ok=True)
    if not args.tables:
        for name in args.only or HEALS:
            evaluate_unhealed(args.work, HEALS[name][0])
            heal_and_evaluate(args.work, name)
            heldout_nll(args.work, name)
            write_tables(summarize(args.work), args.results)
    write_tables(summarize(args.work), args.results)
    if args.pool:
        write_pooled(pooled([args.work, *args.pool]), f"{args.results}-pooled")


if __name__ == "__main__":
    main()
