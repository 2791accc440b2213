"""Cheaper RESP schedules against the paper's on the embedded world, and the cost model checked.

For each seed (calibration.seed = generation.seed = seed) the dense calibration traces are
sampled once; then RESP prunes task arith to targets 0.3 0.4 0.5 under each schedule below
(prune.* overrides of params.yaml; `paper` is the params.yaml schedule: every step scores every
token of every trace, regenerating at the 4 milestones), and each mask is evaluated greedily on
the first --items test items. Per schedule: scoring compute from the run summaries' counted
`cost` (tokens through forward+backward, and FLOPs), its ratio to the paper's, greedy strict
accuracy per target (mean over seeds) and the paired difference to the paper's schedule
(items x seeds, resp.stats.paired_difference, report.* bootstrap settings).

Cost model check (resp.cost): rates (scoring tokens/s, generated tokens/s) are measured from
the wall seconds of one run (paper schedule, first seed: its `<run>.wall.json` score and
regenerate seconds over the summary's counted tokens); every other run is then predicted from
those rates and the dense traces' mean lengths (`predict_run`) and compared with its measured
score + regenerate seconds.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/schedules.py            # ~40 min on 2 busy cores
    python benchmarks/schedules.py --seeds 0 --schedules paper --items 10  # a smoke run

Runs go to --work (default /tmp/resp-schedules; a finished run or evaluation there is reused),
results to benchmarks/results/schedules.{md,json}. Nothing is asserted here.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resp.config import load_params  # noqa: E402

TASK, METHOD, TARGETS = "arith", "resp", [0.3, 0.4, 0.5]
SCHEDULES = {
    "paper": {},
    "subsets6": {"prune.score_subsets": 6},
    "every2-subsets3": {"prune.score_every": 2, "prune.score_subsets": 3},
    "milestones2-every4-subsets2": {"prune.milestones": [0.2, 0.4], "prune.score_every": 4, "prune.score_subsets": 2},
    "tokens32-every2": {"prune.score_tokens": 32, "prune.score_every": 2},
}


def overrides(seed: int, items: int, schedule: dict) -> list[str]:
    base = {"calibration.seed": seed, "generation.seed": seed, "prune.targets": TARGETS,
            "evaluation.num_items": items, "evaluation.samples": 0, "evaluation.nll_traces": 0, **schedule}
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def run_one(work: Path, seed: int, name: str, items: int) -> dict:
    from resp import api
    from resp.evaluation import evaluate_masks

    params = load_params(ROOT / "params.yaml", overrides(seed, items, SCHEDULES[name]))
    dense = work / f"seed{seed}" / "dense.jsonl"
    if not dense.is_file():
        api.make_traces(params, TASK, dense)
    run_dir = work / f"seed{seed}" / name
    if not (run_dir / "summary.json").is_file():
        api.prune(params, TASK, METHOD, run_dir, dense_traces=dense)
    metrics = work / f"seed{seed}" / f"{name}-eval.json"
    if not metrics.is_file():
        masks = {t: run_dir / "masks" / f"sparsity-{t:.2f}.safetensors" for t in TARGETS}
        evaluate_masks(params, TASK, METHOD, masks, None, metrics, include_dense=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    wall = json.loads(Path(f"{run_dir}.wall.json").read_text())
    ev = json.loads(metrics.read_text())
    return {"seed": seed, "schedule": name, "params": params, "dense": str(dense), "cost": summary["cost"],
            "wall": wall, "correct": {t: ev["results"][f"{t:.2f}"]["greedy"]["per_item"]["correct_strict"]
                                      for t in TARGETS}}


def measured_rates(run: dict, model_config, parameters: int):
    from resp.cost import Rates, model_shape

    c, w = run["cost"], run["wall"]["by_step"]
    return Rates(device=f"cpu ({platform.machine()}, torch threads 1, shared)", model={**model_shape(model_config),
                 "parameters": parameters}, dtype=run["params"].model.dtype,
                 score_tokens_per_s=c["score"]["tokens"] / w["score"],
                 generate_tokens_per_s=c["regenerate"]["tokens_generated"] / w["regenerate"],
                 score_batch_size=run["params"].importance.batch_size,
                 generate_batch_size=run["params"].generation.batch_size,
                 source=f"benchmarks/schedules.py: seed {run['seed']} {run['schedule']} run's score/regenerate seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/resp-schedules"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "schedules")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "paper" not in args.schedules:
        parser.error("the comparison needs the paper schedule: add paper to --schedules")

    from resp.cost import predict_run
    from resp.memory import config_parameters
    from resp.stats import bootstrap_interval, paired_difference
    from resp.traces import TraceSet

    started = time.time()
    runs = {(seed, name): run_one(args.work, seed, name, args.items) for seed in args.seeds for name in args.schedules}
    first = runs[(args.seeds[0], "paper")]
    p = first["params"]
    from resp.memory import load_config

    config = load_config(p.model.name_or_path)
    total, matmul, scored = config_parameters(config, p.prune.attention_unit)
    rates = measured_rates(first, config, total)

    rep = p.report
    rows, checks = [], []
    paper_tokens = sum(runs[(s, "paper")]["cost"]["score"]["tokens"] for s in args.seeds)
    paper_flops = sum(runs[(s, "paper")]["cost"]["score"]["flops"] for s in args.seeds)
    for name in args.schedules:
        tokens = sum(runs[(s, name)]["cost"]["score"]["tokens"] for s in args.seeds)
        flops = sum(runs[(s, name)]["cost"]["score"]["flops"] for s in args.seeds)
        passes = sum(runs[(s, name)]["cost"]["score"]["passes"] for s in args.seeds) / len(args.seeds)
        regens = sum(runs[(s, name)]["cost"]["regenerate"]["passes"] for s in args.seeds) / len(args.seeds)
        row = {"schedule": name, "overrides": SCHEDULES[name], "scoring_passes": passes, "regenerations": regens,
               "score_tokens": tokens, "score_flops": flops, "scoring_reduction": paper_tokens / tokens,
               "flops_reduction": paper_flops / flops, "targets": {}}
        for t in TARGETS:
            acc = np.array([runs[(s, name)]["correct"][t] for s in args.seeds]).T      # items x seeds
            ref = np.array([runs[(s, "paper")]["correct"][t] for s in args.seeds]).T
            row["targets"][f"{t:.2f}"] = {
                "accuracy": bootstrap_interval(acc, rep.bootstrap_samples, rep.confidence, rep.seed),
                "vs_paper": paired_difference(acc, ref, rep.bootstrap_samples, rep.confidence, rep.seed)}
        rows.append(row)
        for s in args.seeds:
            run = runs[(s, name)]
            dense = TraceSet.load(run["dense"]).traces
            prompt = sum(len(tr.prompt_ids) for tr in dense) / len(dense)
            completion = sum(len(tr.completion_ids) for tr in dense) / len(dense)
            pred = predict_run(run["params"], METHOD, len(dense), prompt, completion, rates, (matmul, scored))
            w = run["wall"]["by_step"]
            checks.append({"seed": s, "schedule": name, "rates_source": (s, name) == (args.seeds[0], "paper"),
                           "predicted_score_s": pred.score_seconds, "measured_score_s": w["score"],
                           "predicted_regenerate_s": pred.regenerations * len(dense) * completion / rates.generate_tokens_per_s,
                           "measured_regenerate_s": w.get("regenerate", 0.0),
                           "predicted_passes": pred.scoring_passes, "counted_passes": run["cost"]["score"]["passes"],
                           "predicted_score_tokens": pred.score_tokens, "counted_score_tokens": run["cost"]["score"]["tokens"],
                           "measured_total_s": run["wall"]["total"]})
    result = {"task": TASK, "method": METHOD, "targets": TARGETS, "seeds": args.seeds, "items": args.items,
              "rates": rates.__dict__, "schedules": rows, "cost_model_check": checks,
              "seconds": time.time() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [f"# Cheaper RESP schedules on the embedded world ({r['task']}, seeds {r['seeds']}, "
             f"{r['items']} greedy items, targets {r['targets']})", "",
             "Written by `benchmarks/schedules.py`. Scoring compute: tokens through forward+backward, summed over "
             "seeds (the run summaries' counted `cost`). Accuracy: greedy strict, mean over items x seeds with its "
             "bootstrap interval; vs paper: paired difference (items x seeds resampled jointly), percentage points.", "",
             "| schedule | overrides | scoring passes | regenerations | scoring tokens | less scoring | "
             + " | ".join(f"acc @{t:.2f} [CI]" for t in r["targets"]) + " | "
             + " | ".join(f"vs paper @{t:.2f} [CI]" for t in r["targets"]) + " |",
             "|" + "---|" * (6 + 2 * len(r["targets"]))]
    for row in r["schedules"]:
        accs = [row["targets"][f"{t:.2f}"]["accuracy"] for t in r["targets"]]
        diffs = [row["targets"][f"{t:.2f}"]["vs_paper"] for t in r["targets"]]
        over = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["overrides"].items()) or "(params.yaml)"
        lines.append(f"| {row['schedule']} | {over} | {row['scoring_passes']:.1f} | {row['regenerations']:.1f} | "
                     f"{row['score_tokens']} | {row['scoring_reduction']:.2f}x | "
                     + " | ".join(f"{pct(a[0])} [{pct(a[1])}, {pct(a[2])}]" for a in accs) + " | "
                     + " | ".join(f"{round(100 * d[0], 1) + 0.0:+.1f} [{pct(d[1])}, {pct(d[2])}]" for d in diffs) + " |")
    rt = r["rates"]
    lines += ["", f"Cost model check: rates measured from one run ({rt['source']}): scoring "
              f"{rt['score_tokens_per_s']:.0f} tokens/s, generation {rt['generate_tokens_per_s']:.0f} tokens/s. "
              "Every run predicted from them (`resp.cost.predict_run`, dense traces' mean lengths) vs measured:", "",
              "| seed | schedule | passes predicted/counted | score tokens predicted/counted | score s predicted/measured "
              "| regenerate s predicted/measured | total predicted / measured wall |", "|---|---|---|---|---|---|---|"]
    for c in r["cost_model_check"]:
        pred_total = c["predicted_score_s"] + c["predicted_regenerate_s"]
        lines.append(f"| {c['seed']} | {c['schedule']}{' (rates source)' if c['rates_source'] else ''} | "
                     f"{c['predicted_passes']}/{c['counted_passes']} | {c['predicted_score_tokens']}/{c['counted_score_tokens']} | "
                     f"{c['predicted_score_s']:.1f}/{c['measured_score_s']:.1f} | "
                     f"{c['predicted_regenerate_s']:.1f}/{c['measured_regenerate_s']:.1f} | "
                     f"{pred_total:.1f} / {c['measured_total_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
