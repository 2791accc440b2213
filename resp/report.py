"""The results table and plots (method step 10, reporting): every method against the dense
model, per task and target sparsity, from the metrics files `resp.evaluation.evaluate_masks` wrote
and the run summaries `resp.recipe.prune` wrote.

`write_report` reads `{metrics_dir}/{task}/{method}.json`, `{metrics_dir}/{task}/dense.json` and,
for the reference method, its no-regeneration ablation and the drift-triggered ablation
(`resp_drift`) when they are evaluated, `{runs_dir}/{task}/{method}/summary.json`. It writes, each
file atomically and byte-for-byte reproducible from the same inputs and `report` params:

- `results.md`: accuracy (greedy, sampled; strict extractor, the answer stated after
  `</think>`, then flexible, the last number or option), each as `mean [low, high]`, a
  percentile bootstrap interval over items (`resp.stats`); completion length and truncation;
  the reflection rate (self-checks and self-corrections); measured sparsity; the reference
  (`report.reference`, RESP) against the strongest baseline, against its no-regeneration
  ablation (the regeneration effect) and against each of its ablations, every one a paired
  difference on the same items with its interval; trace drift per pruning step; the first
  sparsity at which each method falls below 90% of dense accuracy; held-out NLL when measured;
- `metrics.json`: the same numbers, flat leaves sorted, for `dvc metrics show`: per task,
  `dense`, every method by target (accuracies with `_low`/`_high`), `differences` by target
  (`reference_minus_strongest_baseline_*`, `reference_minus_no_regeneration_*`,
  `{ablation}_minus_reference_*`, each `_greedy_strict`/`_sampled_strict` with `_low`/`_high`,
  and `strongest_baseline`), and `regenerations` (trace sets after the initial one, by method);
- `plots/accuracy_{task}.csv|png` and `plots/length_{task}.csv|png`: one column (line) per
  method over target sparsity, dense as a constant column (horizontal line), for `dvc plots`;
- `plots/drift_{task}.csv|png`: the decode-only loss of the current trace set at each pruning
  step. CSV: `step`, then per drift method `<method>_sparsity` (scored sparsity, fraction),
  `<method>_loss` (nats/token) and `<method>_regenerated` (1: the traces were regenerated just
  before this scoring), an empty cell where a method has no such step. PNG: loss over scored
  sparsity, one line per method, circles at regenerations.

Comparisons, the 90% rule and the accuracy plots use greedy strict accuracy. Baselines are the
methods other than the reference, its no-regeneration ablation and `report.ablations`; the
strongest is the one with the highest greedy strict accuracy at that sparsity (ties: the one
listed first). Differences are paired: the same items, resampled jointly; a sampled item's value
is its mean over the sampled completions. Metrics files without per-item vectors (written before
they existed) and run summaries without per-step drift are refused with the command to re-run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from resp.artifacts import target_key, write_bytes, write_json
from resp.stats import bootstrap_interval, paired_difference

if TYPE_CHECKING:
    from resp.config import ReportParams

log = logging.getLogger(__name__)

DENSE = "dense"
ACCURACY_KEYS = ("accuracy_strict", "accuracy_flexible")  # as resp.evaluate writes them
EXTRACTORS = ("strict", "flexible")
MODES = ("greedy", "sampled")
HEADLINE = "greedy_accuracy_strict"  # the number comparisons, the 90% rule and the plots use
RETAINED = 0.9          # "falls below 90% of dense accuracy"
CONSISTENT = 1e-6       # per-item vectors must reproduce the file's accuracies to this
FIGSIZE = (6.4, 4.0)    # inches
DPI = 100
CSV_DECIMALS = 4        # plot data: 57.99999999999999 -> 58.0
STEP_KEYS = ("step", "scored_sparsity", "loss", "regenerated")   # what the drift section reads per step


class ReportError(ValueError):
    pass


# ---------------------------------------------------------------- reading


def _samples(sampled: dict) -> list[dict]:
    """The sampled pass's per-completion entries (`per_seed`; `per_sample` as resp.evaluate also writes it)."""
    return sampled.get("per_seed", sampled.get("per_sample")) or []


def _per_item(result: dict, path: Path, label: str, n_items: int) -> dict:
    """{"greedy_strict": items, "greedy_flexible": items, "sampled_*": items x samples or None} (0/1 floats)."""
    greedy, sampled = result["greedy"], result["sampled"]
    missing = [f"greedy.{key}" for key in ("reflection_rate", "per_item") if key not in greedy]
    if sampled is not None:
        missing += [] if "reflection_rate" in sampled else ["sampled.reflection_rate"]
        if not _samples(sampled) or any("per_item" not in s for s in _samples(sampled)):
            missing.append("sampled.per_seed[].per_item")
    if missing:
        raise ReportError(f"metrics file {path} has no {', '.join(missing)} for {label} (written before per-item "
                          "scoring): re-run `resp evaluate`")
    vectors = {}
    for mode in MODES:
        runs = [greedy] if mode == "greedy" else _samples(sampled) if sampled is not None else []
        for extractor in EXTRACTORS:
            name = f"{mode}_{extractor}"
            columns = [run["per_item"][f"correct_{extractor}"] for run in runs]
            if any(len(column) != n_items for column in columns):
                raise ReportError(f"metrics file {path} has {', '.join(str(len(c)) for c in columns)} per-item "
                                  f"{mode} {extractor} results for {label}, not one per item_ids ({n_items}): "
                                  "re-run `resp evaluate`")
            if not columns:
                vectors[name] = None
                continue
            vector = np.asarray(columns, dtype=np.float64).T   # items x runs
            vectors[name] = vector[:, 0] if mode == "greedy" else vector
            stated = (greedy if mode == "greedy" else sampled)[f"accuracy_{extractor}"]
            if abs(vector.mean() - stated) > CONSISTENT:
                raise ReportError(f"metrics file {path} states {mode}.accuracy_{extractor} {stated} for {label} but "
                                  f"its per-item results give {vector.mean():.6g}: re-run `resp evaluate`")
    return vectors


def _flat(result: dict, path: Path, label: str) -> dict:
    """One evaluated model's numbers as flat fields (fractions; NLL per token or None)."""
    greedy, sampled = result["greedy"], result["sampled"]   # sampled: None when no sampled pass ran
    missing = [f"{mode}.{key}" for mode, numbers in (("greedy", greedy), ("sampled", sampled or {}))
               for key in ACCURACY_KEYS if numbers is not None and sampled is not None or mode == "greedy"
               if key not in numbers]
    if missing:
        raise ReportError(f"metrics file {path} has no {', '.join(missing)} for {label} (written before strict and "
                          "flexible accuracy were both scored): re-run `resp evaluate`")
    return {
        "sparsity": result["sparsity"],
        "greedy_accuracy_strict": greedy["accuracy_strict"],
        "greedy_accuracy_flexible": greedy["accuracy_flexible"],
        "greedy_mean_completion_tokens": greedy["mean_completion_tokens"],
        "greedy_truncation_rate": greedy["truncation_rate"],
        "greedy_reflection_rate": greedy.get("reflection_rate"),
        **{f"sampled_{key}": (sampled or {}).get(key)
           for key in (*ACCURACY_KEYS, "mean_completion_tokens", "truncation_rate", "reflection_rate")},
        "nll": result["nll"]["nll"] if result["nll"] else None,
        "composition": result.get("composition"),   # absent in metrics written before it was recorded
    }


def _read_owned(path: Path, kind: str, task: str, method: str, missing: str, rerun: str,
                rerun_other: str) -> dict:
    """A JSON artifact `resp` wrote for `method` on `task`: present, valid, and naming that run
    (else one line: `missing` says how to make it, `rerun`/`rerun_other` how to rewrite it)."""
    if not path.is_file():
        raise ReportError(f"{kind} {path} not found: {missing}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{kind} {path} is not valid JSON ({e.msg}): re-run {rerun}") from None
    if data.get("task") != task or data.get("method") != method:
        raise ReportError(f"{kind} {path} holds {data.get('method')!r} on {data.get('task')!r}, not "
                          f"{method!r} on {task!r}: re-run {rerun_other}")
    return data


def _read(path: Path, task: str, method: str) -> dict:
    data = _read_owned(path, "metrics file", task, method,
                       f"evaluate {method} on {task} first (`resp evaluate --task {task} ... --out {path}`, or `dvc repro`)",
                       "`resp evaluate`", f"`resp evaluate` with --out {path}")
    if not isinstance(data.get("item_ids"), list):
        raise ReportError(f"metrics file {path} has no item_ids (written before per-item scoring): "
                          "re-run `resp evaluate`")
    return data


def _entry(result: dict, path: Path, label: str, n_items: int) -> tuple[dict, dict]:
    flat = _flat(result, path, label)
    return flat, _per_item(result, path, label, n_items)


def load_metrics(metrics_dir: str | Path, tasks: list[str], methods: list[str],
                 targets: list[float]) -> tuple[dict, dict, dict]:
    """(flat numbers {task: {"dense": {...}, method: {"0.20": {...}}}}, per-item vectors in the same
    layout (see `_per_item`), dense files' headers by task)."""
    metrics_dir = Path(metrics_dir)
    table, items, headers = {}, {}, {}
    for task in tasks:
        path = metrics_dir / task / f"{DENSE}.json"
        dense = _read(path, task, DENSE)
        if DENSE not in dense["results"]:
            raise ReportError(f"metrics file {path} has no dense result: re-run `resp evaluate --dense`")
        n_items = len(dense["item_ids"])
        table[task], items[task] = {}, {}
        table[task][DENSE], items[task][DENSE] = _entry(dense["results"][DENSE], path, DENSE, n_items)
        headers[task] = dense
        for method in methods:
            path = metrics_dir / task / f"{method}.json"
            data = _read(path, task, method)
            differs = sorted(k for k in set(data["evaluation"]) | set(dense["evaluation"])
                             if data["evaluation"].get(k) != dense["evaluation"].get(k))
            if differs:  # one table row per protocol: a different backend or sampling is not comparable
                raise ReportError(f"metrics file {path} was evaluated with other settings than {task}/{DENSE}.json "
                                  f"(evaluation.{', evaluation.'.join(differs)}): re-run `resp evaluate` for both "
                                  "with the same params")
            if data["item_ids"] != dense["item_ids"]:  # paired differences need the same items in the same order
                raise ReportError(f"metrics file {path} was evaluated on other items than {task}/{DENSE}.json "
                                  "(item_ids differ): re-run `resp evaluate` for both with the same params and data")
            results = data["results"]
            missing = [target_key(t) for t in targets if target_key(t) not in results]
            if missing:
                raise ReportError(f"metrics file {path} has no result at sparsity {', '.join(missing)}: "
                                  f"re-run `resp evaluate` with the masks of every target in prune.targets")
            table[task][method], items[task][method] = {}, {}
            for key in map(target_key, targets):
                table[task][method][key], items[task][method][key] = _entry(results[key], path, key, n_items)
            # the name a row shows (e.g. "flap (no bias)"), as the masks' manifests state it
            headers[task].setdefault("labels", {})[method] = results[target_key(targets[0])].get("label", method)
    return table, items, headers


def load_summary(runs_dir: str | Path, task: str, method: str) -> dict:
    """`{runs_dir}/{task}/{method}/summary.json`, checked: it names the run and states drift per step."""
    run_dir = Path(runs_dir) / task / method
    path = run_dir / "summary.json"
    rerun = f"`resp prune --task {task} --method {method} --out {run_dir}`, or `dvc repro`"
    data = _read_owned(path, "run summary", task, method, f"prune {method} on {task} first ({rerun})", rerun, rerun)
    if not isinstance(data.get("trace_sets"), list) or not data["trace_sets"] or not isinstance(data.get("steps"), list):
        raise ReportError(f"run summary {path} has no trace_sets or steps: re-run {rerun}")
    missing = sorted({key for step in data["steps"] for key in STEP_KEYS if key not in step})
    if missing:
        raise ReportError(f"run summary {path} has no {', '.join(missing)} per step (written before trace drift was "
                          f"recorded): re-run {rerun}")
    return data


# ---------------------------------------------------------------- numbers


def _roles(methods: list[str], params: ReportParams) -> dict[str, list[str]]:
    """Which evaluated methods are the reference, its no-regeneration ablation, ablations, baselines, drift rows."""
    variants = {params.reference, params.no_regeneration, *params.ablations}
    return {
        "reference": [m for m in methods if m == params.reference],
        "no_regeneration": [m for m in methods if m == params.no_regeneration],
        "ablations": [m for m in params.ablations if m in methods],
        "baselines": [m for m in methods if m not in variants],
        "drift": [m for m in (params.reference, params.no_regeneration, params.drift_triggered) if m in methods],
    }


def _interval(params: ReportParams, values) -> tuple[float, float, float]:
    return bootstrap_interval(values, params.bootstrap_samples, params.confidence, params.seed)


def _paired(params: ReportParams, a, b) -> tuple[float, float, float] | None:
    if a is None or b is None:
        return None
    return paired_difference(a, b, params.bootstrap_samples, params.confidence, params.seed)


def add_intervals(table: dict, items: dict, params: ReportParams) -> None:
    """Add `{mode}_accuracy_{extractor}_low|_high` beside every accuracy in `table` (None without a sampled pass)."""
    for task, by_method in items.items():
        for method, entries in by_method.items():
            for label, vectors in ([(None, entries)] if method == DENSE else entries.items()):
                flat = table[task][method] if label is None else table[task][method][label]
                for mode in MODES:
                    for extractor in EXTRACTORS:
                        vector = vectors[f"{mode}_{extractor}"]
                        _, low, high = (None, None, None) if vector is None else _interval(params, vector)
                        flat[f"{mode}_accuracy_{extractor}_low"], flat[f"{mode}_accuracy_{extractor}_high"] = low, high


def strongest_baseline(table: dict, task: str, baselines: list[str], target: float) -> tuple[str, float] | None:
    """(method, greedy strict accuracy) of the best of `baselines` at `target`; None if there is none."""
    best = None
    for method in baselines:
        accuracy = table[task][method][target_key(target)][HEADLINE]
        if best is None or accuracy > best[1]:
            best = (method, accuracy)
    return best


def first_below_dense(table: dict, task: str, method: str, targets: list[float]) -> float | None:
    """The lowest target at which greedy strict accuracy < 90% of dense; None if it never does."""
    floor = RETAINED * table[task][DENSE][HEADLINE]
    for target in sorted(targets):
        if table[task][method][target_key(target)][HEADLINE] < floor:
            return target
    return None


def _strict(items: dict, task: str, method: str, target: float) -> tuple:
    vectors = items[task][method][target_key(target)]
    return vectors["greedy_strict"], vectors["sampled_strict"]


def differences(table: dict, items: dict, tasks: list[str], methods: list[str], targets: list[float],
                params: ReportParams) -> dict:
    """Paired differences by task and target: {task: {"0.20": {"strongest": (name, greedy, sampled) | None,
    "no_regeneration": (greedy, sampled) | None, "ablations": {name: (greedy, sampled)}}}}; each of
    greedy/sampled is (diff, low, high) of greedy/sampled strict accuracy, or None without a sampled pass."""
    roles = _roles(methods, params)
    out = {}
    for task in tasks:
        out[task] = {}
        for target in targets:
            entry = {"strongest": None, "no_regeneration": None, "ablations": {}}
            if roles["reference"]:
                reference = _strict(items, task, params.reference, target)
                best = strongest_baseline(table, task, roles["baselines"], target)
                if best is not None:
                    other = _strict(items, task, best[0], target)
                    entry["strongest"] = (best[0], *(_paired(params, r, o) for r, o in zip(reference, other)))
                if roles["no_regeneration"]:
                    other = _strict(items, task, params.no_regeneration, target)
                    entry["no_regeneration"] = tuple(_paired(params, r, o) for r, o in zip(reference, other))
                for ablation in roles["ablations"]:
                    other = _strict(items, task, ablation, target)
                    entry["ablations"][ablation] = tuple(_paired(params, o, r) for r, o in zip(reference, other))
            out[task][target_key(target)] = entry
    return out


def _flat_differences(diffs: dict) -> dict:
    """metrics.json's `differences` of one task and target: flat numbers (fractions)."""
    flat = {}

    def put(name: str, pair: tuple) -> None:
        for mode, numbers in zip(MODES, pair):
            diff, low, high = numbers if numbers is not None else (None, None, None)
            flat[f"{name}_{mode}_strict"], flat[f"{name}_{mode}_strict_low"], flat[f"{name}_{mode}_strict_high"] = \
                diff, low, high

    if diffs["strongest"] is not None:
        flat["strongest_baseline"] = diffs["strongest"][0]
        put("reference_minus_strongest_baseline", diffs["strongest"][1:])
    if diffs["no_regeneration"] is not None:
        put("reference_minus_no_regeneration", diffs["no_regeneration"])
    for ablation, pair in diffs["ablations"].items():
        put(f"{ablation}_minus_reference", pair)
    return flat


# ---------------------------------------------------------------- markdown


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _with_interval(mean: float | None, low: float | None, high: float | None) -> str:
    return "-" if mean is None else f"{_pct(mean)} [{_pct(low)}, {_pct(high)}]"


def _points(numbers: tuple | None) -> str:
    """A paired difference in accuracy points: `+3.0 [+0.5, +5.5]`."""
    if numbers is None:
        return "-"
    diff, low, high = numbers
    return f"{100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _verdict(numbers: tuple | None, better: str, worse: str) -> str:
    if numbers is None:
        return "not measured (no sampled pass)"
    _, low, high = numbers
    if low > 0:
        return f"{better} is better than {worse} (the interval excludes 0)"
    if high < 0:
        return f"{better} is worse than {worse} (the interval excludes 0)"
    return "no effect detected (the interval includes 0)"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _grid(table: dict, tasks: list[str], methods: list[str], targets: list[float], cell, with_dense: bool,
          names: dict[str, str]) -> list[str]:
    header = ["method"] + [f"{task} {target_key(t)}" for task in tasks for t in targets]
    rows = [[DENSE] + [cell(table[task][DENSE]) for task in tasks for _ in targets]] if with_dense else []
    rows += [[names[method]] + [cell(table[task][method][target_key(t)]) for task in tasks for t in targets]
             for method in methods]
    return _markdown_table(header, rows)


def _without_per_layer(entries: dict) -> dict:
    """metrics.json keeps composition totals; per-layer lists are for results.md (dvc metrics show wants numbers)."""
    def strip(entry):
        if not isinstance(entry, dict):
            return entry
        return {k: ({kk: vv for kk, vv in v.items() if kk != "per_layer"} if k == "composition" and v else
                    strip(v) if isinstance(v, dict) else v) for k, v in entry.items()}
    return strip(entries)


def _composition_section(table: dict, tasks: list[str], methods: list[str], targets: list[float],
                         names: dict[str, str]) -> list[str]:
    """What each mask removed: heads / dead KV groups / MLP channels, in total and per layer at the last
    target, so that a difference in allocation is not read as a difference in calibration data."""
    def total(r):
        c = r.get("composition")
        return "-" if c is None else f"{c['heads_pruned']} / {c['kv_groups_dead']} / {c['channels_pruned']}"

    lines = ["", "## What each mask removed: query heads / dead KV groups / MLP channels", ""]
    lines += _grid(table, tasks, methods, targets, total, with_dense=False, names=names)
    last = target_key(targets[-1])
    for task in tasks:
        rows = [(names[m], table[task][m][last].get("composition")) for m in methods]
        rows = [(name, c) for name, c in rows if c is not None]
        if not rows:
            continue
        layers = len(rows[0][1]["per_layer"]["heads_pruned"])
        lines += ["", f"Per layer, {task} at {last} (heads / channels pruned):", ""]
        lines += _markdown_table(["method"] + [f"L{i}" for i in range(layers)],
                                 [[name] + [f"{h} / {ch}" for h, ch in zip(c["per_layer"]["heads_pruned"],
                                                                           c["per_layer"]["channels_pruned"])]
                                  for name, c in rows])
    return lines


def _sampling(ev: dict) -> str:
    """The sampled pass as the protocol states it (evaluation.samples/sample_seed, or sample_seeds)."""
    common = f"sampled at T={ev['temperature']}, top-p {ev['top_p']}, top-k {ev['top_k']}"
    if "sample_seeds" in ev:
        seeds = ", ".join(str(s) for s in ev["sample_seeds"])
        return (f"{common}, mean over seeds [{seeds}]" if seeds
                else "no sampled pass (evaluation.sample_seeds is empty)")
    if ev.get("samples"):
        return f"{common}, mean over {ev['samples']} completions per item (seed {ev['sample_seed']})"
    return "no sampled pass (evaluation.samples is 0)"


def _protocol_line(task: str, header: dict) -> str:
    ev = header["evaluation"]
    n = header["results"][DENSE]["greedy"]["n"]
    return (f"- {task}: first {n} items of split {header['split']} ({header['format']} format, "
            f"{header['few_shot']}-shot), at most {ev['max_new_tokens']} new tokens, generated with "
            f"{ev['backend']}; {_sampling(ev)}.")


def _confidence(params: ReportParams) -> str:
    return f"{100 * params.confidence:g}%"


def _comparison_sections(table: dict, diffs: dict, summaries: dict, tasks: list[str], methods: list[str],
                         targets: list[float], names: dict[str, str], params: ReportParams) -> list[str]:
    roles = _roles(methods, params)
    reference = params.reference
    lines = ["", "## RESP against the strongest baseline", "",
             f"The reference method is {reference}. The strongest baseline is the baseline with the highest greedy "
             "strict accuracy at that sparsity (ties: the one listed first); baselines are the evaluated methods other "
             f"than {reference}, {params.no_regeneration} and the ablations. Differences: {reference} minus the "
             f"baseline, in accuracy points, with a {_confidence(params)} paired interval.", ""]
    if not roles["reference"] or not roles["baselines"]:
        lines.append(f"Not computed: the report needs {reference} and at least one baseline in run.methods.")
    else:
        rows = []
        for task in tasks:
            for target in targets:
                name, greedy, sampled = diffs[task][target_key(target)]["strongest"]
                accuracies = (f"{_pct(table[task][reference][target_key(target)][HEADLINE])} / "
                              f"{_pct(table[task][name][target_key(target)][HEADLINE])}")
                rows.append([task, target_key(target), names[name], accuracies, _points(greedy), _points(sampled)])
        lines += _markdown_table(["task", "sparsity", "strongest baseline", f"greedy strict, {reference} / baseline",
                                  "difference, greedy strict", "difference, sampled strict"], rows)

    other = params.no_regeneration
    lines += ["", "## Regeneration effect", "",
              f"{reference} minus {other} (the same method without regenerating its traces), on the same items, in "
              f"accuracy points, with a {_confidence(params)} paired interval; an effect is stated only where the "
              "interval excludes 0.", ""]
    if not roles["reference"] or not roles["no_regeneration"]:
        lines.append(f"Not computed: the report needs {reference} and {other} in run.methods.")
    else:
        for task in tasks:
            for target in targets:
                greedy, sampled = diffs[task][target_key(target)]["no_regeneration"]
                lines.append(f"- {task} at {target_key(target)}: greedy strict {_points(greedy)}: "
                             f"{_verdict(greedy, reference, other)}; sampled strict {_points(sampled)}: "
                             f"{_verdict(sampled, reference, other)}.")

    lines += ["", "## Ablations of RESP", "",
              f"Each ablation minus {reference}, on the same items, in accuracy points, with a {_confidence(params)} "
              "paired interval (positive: the ablation is better).", ""]
    if not roles["reference"] or not roles["ablations"]:
        lines.append(f"Not computed: the report needs {reference} and at least one of report.ablations "
                     f"({', '.join(params.ablations) or 'none'}) in run.methods.")
    else:
        rows = []
        for ablation in roles["ablations"]:
            for task in tasks:
                for target in targets:
                    greedy, sampled = diffs[task][target_key(target)]["ablations"][ablation]
                    accuracies = (f"{_pct(table[task][ablation][target_key(target)][HEADLINE])} / "
                                  f"{_pct(table[task][reference][target_key(target)][HEADLINE])}")
                    rows.append([names[ablation], task, target_key(target), accuracies, _points(greedy), _points(sampled)])
        lines += _markdown_table(["ablation", "task", "sparsity", f"greedy strict, ablation / {reference}",
                                  "difference, greedy strict", "difference, sampled strict"], rows)
        drift = params.drift_triggered
        if drift in roles["ablations"]:
            lines += ["", f"Regenerations spent (trace sets after the initial one, from summary.json): {drift} "
                          f"regenerates when the traces' loss drifts, {reference} at its milestones.", ""]
            lines += _markdown_table(["task", reference, drift],
                                     [[task, *(str(len(summaries[task][m]["trace_sets"]) - 1) for m in (reference, drift))]
                                      for task in tasks])
    return lines


def _drift_section(summaries: dict, tasks: list[str], drift: list[str]) -> list[str]:
    lines = ["", "## Trace drift per pruning step", "",
             "The decode-only loss (nats/token) of the current trace set under the model as pruned so far, at the "
             "sparsity it was scored at (%); (regenerated): the traces were regenerated just before this scoring. "
             "Plots: plots/drift_{task}.png.", ""]
    if not drift:
        lines.append("Not computed: none of the reference, its no-regeneration ablation and the "
                     "drift-triggered ablation is in run.methods.")
        return lines
    for i, task in enumerate(tasks):
        steps = {m: {s["step"]: s for s in summaries[task][m]["steps"]} for m in drift}
        numbers = sorted({n for by_step in steps.values() for n in by_step})
        lines += ([""] if i else []) + [f"### {task}", ""]
        if not numbers:
            lines.append("No pruning steps recorded.")
            continue
        rows = []
        for n in numbers:
            row = [str(n)]
            for m in drift:
                s = steps[m].get(n)
                row += (["-", "-"] if s is None else
                        [_pct(s["scored_sparsity"]), f"{s['loss']:.4g}" + (" (regenerated)" if s["regenerated"] else "")])
            rows.append(row)
        lines += _markdown_table(["step", *(f"{m}: {col}" for m in drift for col in ("sparsity (%)", "loss"))], rows)
    return lines


def results_markdown(table: dict, headers: dict, diffs: dict, summaries: dict, tasks: list[str], methods: list[str],
                     targets: list[float], params: ReportParams) -> str:
    targets = sorted(targets)
    roles = _roles(methods, params)
    names = {m: headers[tasks[0]].get("labels", {}).get(m, m) for m in methods}
    lines = ["# Results", "",
             "Every method prunes the same model to each target parameter sparsity (columns); "
             "`dense` is the unpruned model. Protocol:", ""]
    lines += [_protocol_line(task, headers[task]) for task in tasks]
    lines += ["", "Accuracy is scored twice, as lm-eval does: **strict** reads the answer stated after "
              "`</think>` (a completion cut inside its thinking is wrong); **flexible** reads the last number or "
              "option (after `</think>` if there is one, else anywhere). Comparisons below use strict accuracy.",
              "",
              f"Each accuracy is `mean [low, high]`: a {_confidence(params)} percentile bootstrap interval over items "
              f"({params.bootstrap_samples} resamples, seed {params.seed}); a sampled item counts as its mean over the "
              "sampled completions. Each difference is paired: both methods on the same items, resampled jointly.",
              "",
              f"Reference: {params.reference}; without regeneration: "
              f"{', '.join(roles['no_regeneration']) or '-'}; ablations: {', '.join(roles['ablations']) or '-'}; "
              f"baselines: {', '.join(roles['baselines']) or '-'}."]
    for extractor in EXTRACTORS:
        for mode in MODES:
            lines += ["", f"## Accuracy (%), {extractor}, {mode}", ""]
            lines += _grid(table, tasks, methods, targets,
                           lambda r, f=f"{mode}_accuracy_{extractor}": _with_interval(r[f], r[f"{f}_low"], r[f"{f}_high"]),
                           with_dense=True, names=names)
    lines += ["", "## Mean completion length (tokens) / truncation rate (%), greedy", ""]
    lines += _grid(table, tasks, methods, targets,
                   lambda r: f"{r['greedy_mean_completion_tokens']:.1f} / {_pct(r['greedy_truncation_rate'])}",
                   with_dense=True, names=names)
    markers = ", ".join(f"`{m}`" for m in headers[tasks[0]]["evaluation"].get("reflection_markers", []))
    lines += ["", "## Self-checks and self-corrections", "",
              f"Reflection rate (%), greedy / sampled: the share of completions containing one of {markers or 'no markers'} "
              "(evaluation.reflection_markers).", ""]
    lines += _grid(table, tasks, methods, targets,
                   lambda r: f"{_pct(r['greedy_reflection_rate'])} / {_pct(r['sampled_reflection_rate'])}",
                   with_dense=True, names=names)
    lines += ["", "## Measured parameter sparsity (%)", ""]
    lines += _grid(table, tasks, methods, targets, lambda r: _pct(r["sparsity"]), with_dense=False, names=names)
    lines += _composition_section(table, tasks, methods, targets, names)

    lines += _comparison_sections(table, diffs, summaries, tasks, methods, targets, names, params)
    lines += _drift_section(summaries, tasks, roles["drift"])

    lines += ["", f"## First target sparsity below {RETAINED:.0%} of dense accuracy (greedy, strict)", ""]
    header = ["method"] + [f"{task} (< {_pct(RETAINED * table[task][DENSE][HEADLINE])})" for task in tasks]
    rows = []
    for method in methods:
        firsts = [first_below_dense(table, task, method, targets) for task in tasks]
        rows.append([names[method]] + ["never" if t is None else target_key(t) for t in firsts])
    lines += _markdown_table(header, rows)

    measured = [table[task][DENSE]["nll"] for task in tasks] + [
        table[task][m][target_key(t)]["nll"] for task in tasks for m in methods for t in targets]
    if any(x is not None for x in measured):
        lines += ["", "## Held-out decode-only NLL (nats/token)", ""]
        lines += _grid(table, tasks, methods, targets, lambda r: "-" if r["nll"] is None else f"{r['nll']:.4f}",
                       with_dense=True, names=names)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _plot_csv(table: dict, task: str, methods: list[str], targets: list[float], field: str, scale: float) -> bytes:
    """Wide plot data: `sparsity,dense,<method>...`, one row per target sparsity."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sparsity", DENSE, *methods])
    dense = round(table[task][DENSE][field] * scale, CSV_DECIMALS)
    for target in targets:
        key = target_key(target)
        writer.writerow([target, dense, *(round(table[task][m][key][field] * scale, CSV_DECIMALS) for m in methods)])
    return out.getvalue().encode()


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    # No Software/date metadata: the same numbers give the same bytes.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _plot_png(table: dict, task: str, methods: list[str], targets: list[float], field: str, scale: float,
              ylabel: str) -> bytes:
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    for method in methods:
        ax.plot(targets, [table[task][method][target_key(t)][field] * scale for t in targets], marker="o", label=method)
    ax.axhline(table[task][DENSE][field] * scale, color="black", linestyle="--", label=DENSE)
    ax.set_xticks(targets)
    ax.set_xlabel("target parameter sparsity")
    ax.set_ylabel(ylabel)
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def _loss(x: float) -> float:
    """Four significant digits (losses of a small model are tiny: digits, not decimals): the 7th digit of a
    drift loss depends on the CPU's float reduction order, and the plots are committed."""
    return float(f"{x:.4g}")


def _drift_csv(summaries: dict, task: str, drift: list[str]) -> bytes:
    """`step,<method>_sparsity,<method>_loss,<method>_regenerated...`: one row per pruning step."""
    steps = {m: {s["step"]: s for s in summaries[task][m]["steps"]} for m in drift}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", *(f"{m}_{col}" for m in drift for col in ("sparsity", "loss", "regenerated"))])
    for n in sorted({n for by_step in steps.values() for n in by_step}):
        row = [n]
        for m in drift:
            s = steps[m].get(n)
            row += (["", "", ""] if s is None else
                    [round(s["scored_sparsity"], CSV_DECIMALS), _loss(s["loss"]), int(bool(s["regenerated"]))])
        writer.writerow(row)
    return out.getvalue().encode()


def _drift_png(summaries: dict, task: str, drift: list[str]) -> bytes:
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    circles = dict(linestyle="none", marker="o", markersize=9, markerfacecolor="none")
    for method in drift:
        steps = sorted(summaries[task][method]["steps"], key=lambda s: s["step"])
        (line,) = ax.plot([100 * s["scored_sparsity"] for s in steps], [_loss(s["loss"]) for s in steps], marker=".",
                          label=method)
        again = [s for s in steps if s["regenerated"]]
        ax.plot([100 * s["scored_sparsity"] for s in again], [_loss(s["loss"]) for s in again], color=line.get_color(),
                label="_nolegend_", **circles)
    if any(s["regenerated"] for m in drift for s in summaries[task][m]["steps"]):
        ax.plot([], [], color="black", label="traces regenerated", **circles)   # one legend entry for all circles
    if not drift:
        ax.text(0.5, 0.5, "no trace drift recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("sparsity when the traces were scored (%)")
    ax.set_ylabel("decode-only loss of the current traces (nats/token)")
    ax.set_title(f"{task}: trace drift")
    ax.grid(alpha=0.3)
    if drift:
        ax.legend(fontsize="small")
    return _png(fig)


PLOTS = {  # name: (flat field, scale, y label)
    "accuracy": (HEADLINE, 100.0, "greedy accuracy, strict (%)"),
    "length": ("greedy_mean_completion_tokens", 1.0, "mean completion length (tokens, greedy)"),
}
DRIFT_PLOT = "drift"


def report_files(out_dir: str | Path, tasks: list[str]) -> list[Path]:
    """Every file `write_report` writes (for declaring pipeline outputs)."""
    out_dir = Path(out_dir)
    plots = [out_dir / "plots" / f"{name}_{task}.{ext}" for task in tasks for name in (*PLOTS, DRIFT_PLOT)
             for ext in ("csv", "png")]
    return [out_dir / "results.md", out_dir / "metrics.json", *plots]


def check_report_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """A report goes into a directory whose results.md and metrics.json, where present, are a report's
    (results.md opens with its title): anything else is the user's and is refused unless `overwrite`."""
    out_dir = Path(out_dir)
    if overwrite:
        return
    results = out_dir / "results.md"
    foreign = results.is_file() and not results.read_text(errors="replace").startswith("# Results\n")
    metrics = out_dir / "metrics.json"
    if metrics.is_file() and not foreign:
        try:
            foreign = not isinstance(json.loads(metrics.read_text()), dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            foreign = True
    if foreign:
        raise ReportError(f"--out {out_dir} holds a results.md or metrics.json that is not a resp report: choose another "
                          "--out, or pass --overwrite to replace them")


def write_report(metrics_dir: str | Path, out_dir: str | Path, tasks: list[str], methods: list[str],
                 targets: list[float], *, runs_dir: str | Path, params: ReportParams) -> list[Path]:
    """Read every task's metrics (and the drift methods' run summaries under `runs_dir`) and write
    results.md, metrics.json and plots/ under `out_dir`; `params` is params.yaml `report`."""
    if not tasks:
        raise ReportError("no tasks to report: set run.tasks")
    if not targets:
        raise ReportError("no target sparsities to report: set prune.targets")
    if DENSE in methods:
        raise ReportError(f"{DENSE!r} is always reported from dense.json: leave it out of the methods")
    targets = sorted(targets)
    table, items, headers = load_metrics(metrics_dir, tasks, methods, targets)
    roles = _roles(methods, params)
    summaries = {task: {m: load_summary(runs_dir, task, m) for m in roles["drift"]} for task in tasks}
    add_intervals(table, items, params)
    diffs = differences(table, items, tasks, methods, targets, params)
    flat = {task: {**_without_per_layer(table[task]),
                   "differences": {key: _flat_differences(entry) for key, entry in diffs[task].items()},
                   "regenerations": {m: len(s["trace_sets"]) - 1 for m, s in summaries[task].items()}}
            for task in tasks}
    out_dir = Path(out_dir)
    markdown = results_markdown(table, headers, diffs, summaries, tasks, methods, targets, params)
    written = [write_bytes(out_dir / "results.md", markdown.encode()),
               write_json(out_dir / "metrics.json", flat, sort_keys=True, newline=True)]
    for task in tasks:
        for name, (field, scale, ylabel) in PLOTS.items():
            base = out_dir / "plots" / f"{name}_{task}"
            written.append(write_bytes(Path(f"{base}.csv"), _plot_csv(table, task, methods, targets, field, scale)))
            written.append(write_bytes(Path(f"{base}.png"), _plot_png(table, task, methods, targets, field, scale, ylabel)))
        base = out_dir / "plots" / f"{DRIFT_PLOT}_{task}"
        written.append(write_bytes(Path(f"{base}.csv"), _drift_csv(summaries, task, roles["drift"])))
        written.append(write_bytes(Path(f"{base}.png"), _drift_png(summaries, task, roles["drift"])))
    log.info("wrote the report for %d tasks x %d methods x %d sparsities to %s (%d files)",
             len(tasks), len(methods), len(targets), out_dir, len(written))
    return written
