"""The results table and plots (method step 10, reporting): every method against the dense
model, per task and target sparsity, from the metrics files `resp.evaluate.evaluate_masks` wrote.

`write_report` reads `{metrics_dir}/{task}/{method}.json` and `{metrics_dir}/{task}/dense.json`
and writes, each file atomically and byte-for-byte reproducible from the same inputs:

- `results.md`: accuracy (greedy / sampled), completion length and truncation, measured
  sparsity, RESP's margin over the strongest baseline, and the first sparsity at which each
  method falls below 90% of dense accuracy;
- `metrics.json`: the same numbers, flat, for `dvc metrics show`;
- `plots/accuracy_{task}.csv|png` and `plots/length_{task}.csv|png`: one column (line) per
  method over target sparsity, dense as a constant column (horizontal line), for `dvc plots`.

Comparisons use greedy accuracy. The strongest baseline at a sparsity is the evaluated method
other than `resp` (its ablation `resp_noregen` included) with the highest greedy accuracy;
ties go to the method listed first.
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


def _flat(result: dict) -> dict:
    """One evaluated model's numbers as flat fields (fractions; NLL per token or None)."""
    greedy, sampled = result["greedy"], result["sampled"]
    return {
        "sparsity": result["sparsity"],
        "greedy_accuracy": greedy["accuracy"],
        "greedy_mean_completion_tokens": greedy["mean_completion_tokens"],
        "greedy_truncation_rate": greedy["truncation_rate"],
        "sampled_accuracy": sampled["accuracy"],
        "sampled_mean_completion_tokens": sampled["mean_completion_tokens"],
        "sampled_truncation_rate": sampled["truncation_rate"],
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
        table[task] = {DENSE: _flat(dense["results"][DENSE])}
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
            table[task][method] = {_key(t): _flat(results[_key(t)]) for t in targets}
    return table, headers


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _grid(table: dict, tasks: list[str], methods: list[str], targets: list[float], cell, with_dense: bool) -> list[str]:
    header = ["method"] + [f"{task} {_key(t)}" for task in tasks for t in targets]
    rows = [[DENSE] + [cell(table[task][DENSE]) for task in tasks for _ in targets]] if with_dense else []
    rows += [[method] + [cell(table[task][method][_key(t)]) for task in tasks for t in targets] for method in methods]
    return _markdown_table(header, rows)


def strongest_baseline(table: dict, task: str, methods: list[str], target: float) -> tuple[str, float] | None:
    """(method, greedy accuracy) of the best method other than resp at `target`; None if there is none."""
    best = None
    for method in methods:
        if method == RESP:
            continue
        accuracy = table[task][method][_key(target)]["greedy_accuracy"]
        if best is None or accuracy > best[1]:
            best = (method, accuracy)
    return best


def first_below_dense(table: dict, task: str, method: str, targets: list[float]) -> float | None:
    """The lowest target at which greedy accuracy < 90% of dense; None if it never does."""
    floor = RETAINED * table[task][DENSE]["greedy_accuracy"]
    for target in sorted(targets):
        if table[task][method][_key(target)]["greedy_accuracy"] < floor:
            return target
    return None


def _protocol_line(task: str, header: dict) -> str:
    ev = header["evaluation"]
    n = header["results"][DENSE]["greedy"]["n"]
    seeds = ", ".join(str(s) for s in ev["sample_seeds"])
    return (f"- {task}: first {n} items of split {header['split']} ({header['format']} format, "
            f"{header['few_shot']}-shot), at most {ev['max_new_tokens']} new tokens, generated with "
            f"{ev['backend']}; sampled at "
            f"T={ev['temperature']}, top-p {ev['top_p']}, top-k {ev['top_k']}, mean over seeds [{seeds}].")


def results_markdown(table: dict, headers: dict, tasks: list[str], methods: list[str], targets: list[float]) -> str:
    targets = sorted(targets)
    lines = ["# Results", "",
             "Every method prunes the same model to each target parameter sparsity (columns); "
             "`dense` is the unpruned model. Protocol:", ""]
    lines += [_protocol_line(task, headers[task]) for task in tasks]
    lines += ["", "## Accuracy (%): greedy / sampled", ""]
    lines += _grid(table, tasks, methods, targets,
                   lambda r: f"{_pct(r['greedy_accuracy'])} / {_pct(r['sampled_accuracy'])}", with_dense=True)
    lines += ["", "## Mean completion length (tokens) / truncation rate (%), greedy", ""]
    lines += _grid(table, tasks, methods, targets,
                   lambda r: f"{r['greedy_mean_completion_tokens']:.1f} / {_pct(r['greedy_truncation_rate'])}",
                   with_dense=True)
    lines += ["", "## Measured parameter sparsity (%)", ""]
    lines += _grid(table, tasks, methods, targets, lambda r: _pct(r["sparsity"]), with_dense=False)

    lines += ["", "## RESP against the strongest baseline (greedy accuracy, %)", "",
              f"The strongest baseline is the best method other than {RESP} at that sparsity "
              "(ties: the one listed first).", ""]
    if RESP not in methods or len(methods) < 2:
        lines.append(f"Not computed: the report needs {RESP} and at least one other method.")
    else:
        for task in tasks:
            for target in targets:
                resp_accuracy = table[task][RESP][_key(target)]["greedy_accuracy"]
                name, accuracy = strongest_baseline(table, task, methods, target)
                lines.append(f"- {task} at {_key(target)}: {RESP} {_pct(resp_accuracy)} vs {name} {_pct(accuracy)}: "
                             f"{100 * (resp_accuracy - accuracy):+.1f} points.")

    lines += ["", f"## First target sparsity below {RETAINED:.0%} of dense accuracy (greedy)", ""]
    header = ["method"] + [f"{task} (< {_pct(RETAINED * table[task][DENSE]['greedy_accuracy'])})" for task in tasks]
    rows = []
    for method in methods:
        firsts = [first_below_dense(table, task, method, targets) for task in tasks]
        rows.append([method] + ["never" if t is None else _key(t) for t in firsts])
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
    "accuracy": ("greedy_accuracy", 100.0, "greedy accuracy (%)"),
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
