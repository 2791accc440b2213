"""The results table and plots (method step 10, reporting): every method against the dense
model, per task and target sparsity, from the metrics files `resp.evaluate.evaluate_masks` wrote.

`write_report` reads `{metrics_dir}/{task}/{method}.json` and `{metrics_dir}/{task}/dense.json`
and writes, each file atomically and byte-for-byte reproducible from the same inputs:

- `results.md`: accuracy (greedy / sampled) by the strict extractor (the answer stated after
  `</think>`), then by the flexible one (the last number or option), completion length and
  truncation, measured sparsity, RESP's margin over the strongest baseline, and the first
  sparsity at which each method falls below 90% of dense accuracy;
- `metrics.json`: the same numbers, flat, for `dvc metrics show`;
- `plots/accuracy_{task}.csv|png` and `plots/length_{task}.csv|png`: one column (line) per
  method over target sparsity, dense as a constant column (horizontal line), for `dvc plots`.

Comparisons and the accuracy plots use greedy strict accuracy. The strongest baseline at a sparsity is the evaluated method
other than `resp` (its ablation `resp_noregen` included) with the highest greedy accuracy;
ties go to the method listed first. Metrics files written before both extractors existed
(a plain `accuracy`) are refused: re-run `resp evaluate`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DENSE = "dense"
RESP = "resp"
ACCURACY_KEYS = ("accuracy_strict", "accuracy_flexible")  # as resp.evaluate writes them
HEADLINE = "greedy_accuracy_strict"  # the number comparisons, the 90% rule and the plots use
RETAINED = 0.9          # "falls below 90% of dense accuracy"
FIGSIZE = (6.4, 4.0)    # inches
DPI = 100
CSV_DECIMALS = 4        # plot data: 57.99999999999999 -> 58.0


class ReportError(ValueError):
    pass


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _key(target: float) -> str:
    return f"{target:.2f}"


def _flat(result: dict, path: Path, label: str) -> dict:
    """One evaluated model's numbers as flat fields (fractions; NLL per token or None)."""
    greedy, sampled = result["greedy"], result["sampled"]   # sampled: None when no seeds were sampled
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
        **{f"sampled_{key}": (sampled or {}).get(key)
           for key in (*ACCURACY_KEYS, "mean_completion_tokens", "truncation_rate")},
        "nll": result["nll"]["nll"] if result["nll"] else None,
    }


def _read(path: Path, task: str, method: str) -> dict:
    if not path.is_file():
        raise ReportError(f"metrics file {path} not found: evaluate {method} on {task} first "
                          f"(`resp evaluate --task {task} ... --out {path}`, or `dvc repro`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"metrics file {path} is not valid JSON ({e.msg}): re-run `resp evaluate`") from None
    if data.get("task") != task or data.get("method") != method:
        raise ReportError(f"metrics file {path} holds {data.get('method')!r} on {data.get('task')!r}, not "
                          f"{method!r} on {task!r}: re-run `resp evaluate` with --out {path}")
    return data


def load_metrics(metrics_dir: str | Path, tasks: list[str], methods: list[str],
                 targets: list[float]) -> tuple[dict, dict]:
    """(flat numbers {task: {"dense": {...}, method: {"0.20": {...}}}}, dense files' headers by task)."""
    metrics_dir = Path(metrics_dir)
    table, headers = {}, {}
    for task in tasks:
        path = metrics_dir / task / f"{DENSE}.json"
        dense = _read(path, task, DENSE)
        if DENSE not in dense["results"]:
            raise ReportError(f"metrics file {path} has no dense result: re-run `resp evaluate --dense`")
        table[task] = {DENSE: _flat(dense["results"][DENSE], path, DENSE)}
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
            results = data["results"]
            missing = [_key(t) for t in targets if _key(t) not in results]
            if missing:
                raise ReportError(f"metrics file {path} has no result at sparsity {', '.join(missing)}: "
                                  f"re-run `resp evaluate` with the masks of every target in prune.targets")
            table[task][method] = {_key(t): _flat(results[_key(t)], path, _key(t)) for t in targets}
            # the name a row shows (e.g. "flap (no bias)"), as the masks' manifests state it
            headers[task].setdefault("labels", {})[method] = results[_key(targets[0])].get("label", method)
    return table, headers


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _grid(table: dict, tasks: list[str], methods: list[str], targets: list[float], cell, with_dense: bool,
          names: dict[str, str]) -> list[str]:
    header = ["method"] + [f"{task} {_key(t)}" for task in tasks for t in targets]
    rows = [[DENSE] + [cell(table[task][DENSE]) for task in tasks for _ in targets]] if with_dense else []
    rows += [[names[method]] + [cell(table[task][method][_key(t)]) for task in tasks for t in targets] for method in methods]
    return _markdown_table(header, rows)


def strongest_baseline(table: dict, task: str, methods: list[str], target: float) -> tuple[str, float] | None:
    """(method, greedy strict accuracy) of the best method other than resp at `target`; None if there is none."""
    best = None
    for method in methods:
        if method == RESP:
            continue
        accuracy = table[task][method][_key(target)][HEADLINE]
        if best is None or accuracy > best[1]:
            best = (method, accuracy)
    return best


def first_below_dense(table: dict, task: str, method: str, targets: list[float]) -> float | None:
    """The lowest target at which greedy strict accuracy < 90% of dense; None if it never does."""
    floor = RETAINED * table[task][DENSE][HEADLINE]
    for target in sorted(targets):
        if table[task][method][_key(target)][HEADLINE] < floor:
            return target
    return None


def _protocol_line(task: str, header: dict) -> str:
    ev = header["evaluation"]
    n = header["results"][DENSE]["greedy"]["n"]
    seeds = ", ".join(str(s) for s in ev["sample_seeds"])
    sampling = (f"sampled at T={ev['temperature']}, top-p {ev['top_p']}, top-k {ev['top_k']}, mean over seeds [{seeds}]"
                if seeds else "no sampled pass (evaluation.sample_seeds is empty)")
    return (f"- {task}: first {n} items of split {header['split']} ({header['format']} format, "
            f"{header['few_shot']}-shot), at most {ev['max_new_tokens']} new tokens, generated with "
            f"{ev['backend']}; {sampling}.")


def results_markdown(table: dict, headers: dict, tasks: list[str], methods: list[str], targets: list[float]) -> str:
    targets = sorted(targets)
    names = {m: headers[tasks[0]].get("labels", {}).get(m, m) for m in methods}
    lines = ["# Results", "",
             "Every method prunes the same model to each target parameter sparsity (columns); "
             "`dense` is the unpruned model. Protocol:", ""]
    lines += [_protocol_line(task, headers[task]) for task in tasks]
    lines += ["", "Accuracy is scored twice, as lm-eval does: **strict** reads the answer stated after "
              "`</think>` (a completion cut inside its thinking is wrong); **flexible** reads the last number or "
              "option (after `</think>` if there is one, else anywhere). Comparisons below use greedy strict accuracy."]
    for extractor in ("strict", "flexible"):
        lines += ["", f"## Accuracy (%), {extractor}: greedy / sampled", ""]
        lines += _grid(table, tasks, methods, targets,
                       lambda r, e=extractor: f"{_pct(r[f'greedy_accuracy_{e}'])} / {_pct(r[f'sampled_accuracy_{e}'])}",
                       with_dense=True, names=names)
    lines += ["", "## Mean completion length (tokens) / truncation rate (%), greedy", ""]
    lines += _grid(table, tasks, methods, targets,
                   lambda r: f"{r['greedy_mean_completion_tokens']:.1f} / {_pct(r['greedy_truncation_rate'])}",
                   with_dense=True, names=names)
    lines += ["", "## Measured parameter sparsity (%)", ""]
    lines += _grid(table, tasks, methods, targets, lambda r: _pct(r["sparsity"]), with_dense=False, names=names)

    lines += ["", "## RESP against the strongest baseline (greedy strict accuracy, %)", "",
              f"The strongest baseline is the best method other than {RESP} at that sparsity "
              "(ties: the one listed first).", ""]
    if RESP not in methods or len(methods) < 2:
        lines.append(f"Not computed: the report needs {RESP} and at least one other method.")
    else:
        for task in tasks:
            for target in targets:
                resp_accuracy = table[task][RESP][_key(target)][HEADLINE]
                name, accuracy = strongest_baseline(table, task, methods, target)
                lines.append(f"- {task} at {_key(target)}: {RESP} {_pct(resp_accuracy)} vs {names[name]} {_pct(accuracy)}: "
                             f"{100 * (resp_accuracy - accuracy):+.1f} points.")

    lines += ["", f"## First target sparsity below {RETAINED:.0%} of dense accuracy (greedy, strict)", ""]
    header = ["method"] + [f"{task} (< {_pct(RETAINED * table[task][DENSE][HEADLINE])})" for task in tasks]
    rows = []
    for method in methods:
        firsts = [first_below_dense(table, task, method, targets) for task in tasks]
        rows.append([names[method]] + ["never" if t is None else _key(t) for t in firsts])
    lines += _markdown_table(header, rows)
    return "\n".join(lines) + "\n"


def _plot_csv(table: dict, task: str, methods: list[str], targets: list[float], field: str, scale: float) -> bytes:
    """Wide plot data: `sparsity,dense,<method>...`, one row per target sparsity."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sparsity", DENSE, *methods])
    dense = round(table[task][DENSE][field] * scale, CSV_DECIMALS)
    for target in targets:
        writer.writerow([target, dense, *(round(table[task][m][_key(target)][field] * scale, CSV_DECIMALS) for m in methods)])
    return out.getvalue().encode()


def _plot_png(table: dict, task: str, methods: list[str], targets: list[float], field: str, scale: float,
              ylabel: str) -> bytes:
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    for method in methods:
        ax.plot(targets, [table[task][method][_key(t)][field] * scale for t in targets], marker="o", label=method)
    ax.axhline(table[task][DENSE][field] * scale, color="black", linestyle="--", label=DENSE)
    ax.set_xticks(targets)
    ax.set_xlabel("target parameter sparsity")
    ax.set_ylabel(ylabel)
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    # No Software/date metadata: the same numbers give the same bytes.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


PLOTS = {  # name: (flat field, scale, y label)
    "accuracy": (HEADLINE, 100.0, "greedy accuracy, strict (%)"),
    "length": ("greedy_mean_completion_tokens", 1.0, "mean completion length (tokens, greedy)"),
}


def report_files(out_dir: str | Path, tasks: list[str]) -> list[Path]:
    """Every file `write_report` writes (for declaring pipeline outputs)."""
    out_dir = Path(out_dir)
    plots = [out_dir / "plots" / f"{name}_{task}.{ext}" for task in tasks for name in PLOTS for ext in ("csv", "png")]
    return [out_dir / "results.md", out_dir / "metrics.json", *plots]


def write_report(metrics_dir: str | Path, out_dir: str | Path, tasks: list[str], methods: list[str],
                 targets: list[float]) -> list[Path]:
    """Read every task's metrics and write results.md, metrics.json and plots/ under `out_dir`."""
    if not tasks:
        raise ReportError("no tasks to report: set run.tasks")
    if not targets:
        raise ReportError("no target sparsities to report: set prune.targets")
    if DENSE in methods:
        raise ReportError(f"{DENSE!r} is always reported from dense.json: leave it out of the methods")
    targets = sorted(targets)
    table, headers = load_metrics(metrics_dir, tasks, methods, targets)
    out_dir = Path(out_dir)
    written = [_atomic_write(out_dir / "results.md", results_markdown(table, headers, tasks, methods, targets).encode()),
               _atomic_write(out_dir / "metrics.json", (json.dumps(table, indent=2, sort_keys=True) + "\n").encode())]
    for task in tasks:
        for name, (field, scale, ylabel) in PLOTS.items():
            base = out_dir / "plots" / f"{name}_{task}"
            written.append(_atomic_write(Path(f"{base}.csv"), _plot_csv(table, task, methods, targets, field, scale)))
            written.append(_atomic_write(Path(f"{base}.png"), _plot_png(table, task, methods, targets, field, scale, ylabel)))
    log.info("wrote the report for %d tasks x %d methods x %d sparsities to %s (%d files)",
             len(tasks), len(methods), len(targets), out_dir, len(written))
    return written
