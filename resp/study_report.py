"""The study's analysis: accuracy with intervals over calibration seeds and test items, paired differences,
regeneration and FLAP rows, where the drift trigger fired, what each mask removed.

Reads the finished cells of `study.dir` (`resp.study`) and writes, each atomically, `results.md`,
`metrics.json` and `plots/` (accuracy vs sparsity with interval bands per task; per-layer mask
composition heat maps). Every interval is `resp.stats.cluster_bootstrap` over (seed, item) values:
seeds resampled, then items within each drawn seed. A difference A - B pairs A and B by seed and item;
a data-free method (one seed: its masks do not depend on the seed) and the dense model count the same
for every seed. An interval that contains 0 is reported as no effect, whatever the sign of the mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from resp import artifacts
from resp.config import Params
from resp.stats import cluster_bootstrap
from resp.study import DENSE, StudyError, cells, seeds_for

MODES = ("greedy", "sampled")
REGENERATION_ROWS = (("resp", "resp_noregen"), ("resp_common", "resp_noregen"), ("resp", "resp_common"))
FLAP_ROWS = (("flap", "flap_nobias"),)


def _correct(result: dict, mode: str) -> np.ndarray | None:
    """Strict correctness per item (the mean over samples for the sampled mode)."""
    block = result.get(mode)
    if not block:
        return None
    if mode == "greedy":
        return np.asarray(block["per_item"]["correct_strict"], dtype=np.float64)
    return np.mean([s["per_item"]["correct_strict"] for s in block["per_sample"]], axis=0)


class Finished:
    """The finished cells, as per-(seed, item) arrays."""

    def __init__(self, params: Params):
        st = params.study
        root = Path(st.dir)
        self.params, self.seeds = params, list(st.seeds)
        self.targets = [artifacts.target_key(t) for t in st.targets]
        self.cells: dict[tuple[str, str], dict[int, dict]] = {}
        self.dense: dict[str, dict] = {}
        self.item_ids: dict[str, list] = {}
        for task in st.tasks:
            path = root / "dense" / f"{task}.json"
            if path.exists():
                record = json.loads(path.read_text())
                self.dense[task], self.item_ids[task] = record["result"], record["item_ids"]
        self.total = len(cells(params))
        self.done = 0
        self.wall = 0.0
        for task, method, seed in cells(params):
            path = root / "cells" / task / method / f"seed-{seed}.json"
            if path.exists():
                record = json.loads(path.read_text())
                self.cells.setdefault((task, method), {})[seed] = record
                self.done += 1
                self.wall += record["wall_seconds"]

    def methods(self, task: str) -> list[str]:
        return [m for m in self.params.study.methods if (task, m) in self.cells]

    def seeds_of(self, task: str, method: str) -> list[int]:
        return sorted(self.cells.get((task, method), {}))

    def values(self, task: str, method: str, target: str, mode: str, seeds: list[int] | None = None) -> np.ndarray | None:
        """seeds x items of strict correctness; a one-seed method (or dense) repeats its row for `seeds`."""
        if method == DENSE:
            row = _correct(self.dense[task], mode)
            return None if row is None else np.stack([row] * len(seeds or [0]))
        by_seed = self.cells[(task, method)]
        seedless = len(seeds_for(self.params, method)) == 1
        wanted = seeds if seeds is not None else sorted(by_seed)
        rows = []
        for seed in wanted:
            record = by_seed[min(by_seed)] if seedless else by_seed.get(seed)
            if record is None or target not in record["results"]:
                return None
            row = _correct(record["results"][target], mode)
            if row is None:
                return None
            rows.append(row)
        return np.stack(rows) if rows else None

    def common_seeds(self, task: str, a: str, b: str) -> list[int]:
        def own(m):
            if m == DENSE or len(seeds_for(self.params, m)) == 1:
                return set(self.seeds)
            return set(self.seeds_of(task, m))
        return sorted(own(a) & own(b))


def _interval(values: np.ndarray, report) -> dict:
    mean, low, high = cluster_bootstrap(values, report.bootstrap_samples, report.confidence, report.seed)
    return {"mean": mean, "low": low, "high": high, "seeds": values.shape[0],
            "per_seed": [float(v) for v in values.mean(axis=1)]}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _fmt(iv: dict | None, per_seed: bool = False) -> str:
    if iv is None:
        return "-"
    text = f"{_pct(iv['mean'])} [{_pct(iv['low'])}, {_pct(iv['high'])}]"
    if per_seed and iv["seeds"] > 1:
        text += " (" + " / ".join(_pct(v) for v in iv["per_seed"]) + ")"
    return text


def _fmt_diff(iv: dict | None) -> str:
    if iv is None:
        return "-"
    verdict = "" if iv["low"] <= 0 <= iv["high"] else (" **+**" if iv["low"] > 0 else " **-**")
    return f"{100 * iv['mean']:+.1f} [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]{verdict}"


def analyse(params: Params) -> dict:
    """Every number results.md states, as data (what metrics.json holds)."""
    f = Finished(params)
    report = params.report
    out = {"cells_done": f.done, "cells_total": f.total, "wall_seconds": round(f.wall, 1), "tasks": {}}
    ref = params.study.reference
    for task in params.study.tasks:
        if task not in f.dense:
            continue
        t_out = out["tasks"][task] = {"dense": {}, "methods": {}, "differences": {}, "drift": {}, "composition": {}}
        for mode in MODES:
            v = f.values(task, DENSE, "", mode)
            t_out["dense"][mode] = None if v is None else _interval(v, report)
        pairs = [(m, ref) for m in f.methods(task) if m != ref] + [(ref, DENSE)]
        pairs += [p for p in (*REGENERATION_ROWS, *FLAP_ROWS) if p not in pairs]
        for method in f.methods(task):
            m_out = t_out["methods"][method] = {"seeds": f.seeds_of(task, method)}
            for target in f.targets:
                entry = m_out[target] = {}
                for mode in MODES:
                    v = f.values(task, method, target, mode)
                    entry[mode] = None if v is None else _interval(v, report)
                results = [r["results"][target] for r in f.cells[(task, method)].values() if target in r["results"]]
                if results:
                    entry["sparsity"] = float(np.mean([r["sparsity"] for r in results]))
                    entry["mean_completion_tokens"] = float(np.mean([r["greedy"]["mean_completion_tokens"] for r in results]))
                    entry["truncation_rate"] = float(np.mean([r["greedy"]["truncation_rate"] for r in results]))
                    comp = [r["composition"] for r in results]
                    entry["composition"] = {k: float(np.mean([c[k] for c in comp])) for k in
                                            ("heads_pruned", "heads_total", "kv_groups_dead", "kv_groups_total",
                                             "channels_pruned", "channels_total")}
                    entry["composition"]["per_layer"] = {k: np.mean([c["per_layer"][k] for c in comp], axis=0).tolist()
                                                         for k in comp[0]["per_layer"]}
        for a, b in pairs:
            if not ((task, a) in f.cells or a == DENSE) or not ((task, b) in f.cells or b == DENSE):
                continue
            seeds = f.common_seeds(task, a, b)
            d_out = t_out["differences"][f"{a} - {b}"] = {"seeds": seeds}
            for target in f.targets:
                d_out[target] = {}
                for mode in MODES:
                    va, vb = (f.values(task, a, target, mode, seeds), f.values(task, b, target, mode, seeds))
                    d_out[target][mode] = None if va is None or vb is None or not seeds else _interval(va - vb, report)
        for method in f.methods(task):
            if params.methods[method].regenerate == "drift":
                t_out["drift"][method] = {seed: {"fired_at": r["drift_fired_at"],
                                                 "regenerations": [g["tag"] for g in r["regenerations"]]}
                                          for seed, r in sorted(f.cells[(task, method)].items())}
    return out


def _headline(out: dict, target: str, methods: list[str], ref: str) -> list[str]:
    lines = [f"## Headline: every method at {float(target):.0%} parameter sparsity", "",
             "Strict accuracy (%) with its 95 % interval over calibration seeds and test items, per-seed values in "
             f"parentheses; the difference to {ref} pairs by seed and item (**+**/**-**: the interval excludes 0; "
             "otherwise no effect is shown).", ""]
    for task, t in out["tasks"].items():
        lines += [f"### {task}", "", "| method | seeds | greedy | sampled | greedy - " + ref + " | sampled - " + ref + " |",
                  "|---|---:|---|---|---|---|"]
        dense = t["dense"]
        lines.append(f"| dense | - | {_fmt(dense['greedy'])} | {_fmt(dense['sampled'])} | | |")
        for m in methods:
            if m not in t["methods"] or target not in t["methods"][m]:
                continue
            e = t["methods"][m][target]
            d = t["differences"].get(f"{m} - {ref}", {}).get(target, {})
            lines.append(f"| {m} | {len(t['methods'][m]['seeds'])} | {_fmt(e.get('greedy'), True)} | "
                         f"{_fmt(e.get('sampled'), True)} | {_fmt_diff(d.get('greedy'))} | {_fmt_diff(d.get('sampled'))} |")
        lines.append("")
    return lines


def _pairs_section(out: dict, title: str, pairs, targets: list[str], intro: str) -> list[str]:
    lines = [f"## {title}", "", intro, ""]
    header = "| task | difference | " + " | ".join(f"{float(t):.0%} greedy | {float(t):.0%} sampled" for t in targets) + " |"
    lines += [header, "|---|---|" + "---|---|" * len(targets)]
    for task, t in out["tasks"].items():
        for a, b in pairs:
            d = t["differences"].get(f"{a} - {b}")
            if d is None:
                continue
            cells_ = [f"{_fmt_diff(d[target]['greedy'])} | {_fmt_diff(d[target]['sampled'])}" for target in targets]
            lines.append(f"| {task} | {a} - {b} ({len(d['seeds'])} seeds) | " + " | ".join(cells_) + " |")
    return lines + [""]


def _accuracy_section(out: dict, targets: list[str], methods: list[str]) -> list[str]:
    lines = ["## Greedy strict accuracy at every target", "",
             "| task | method | " + " | ".join(f"{float(t):.0%}" for t in targets) + " | mean tokens / truncation at "
             f"{float(targets[-1]):.0%} |", "|---|---|" + "---|" * (len(targets) + 1)]
    for task, t in out["tasks"].items():
        for m in methods:
            if m not in t["methods"]:
                continue
            e = t["methods"][m]
            last = e.get(targets[-1], {})
            tail = (f"{last['mean_completion_tokens']:.1f} / {last['truncation_rate']:.3f}"
                    if "mean_completion_tokens" in last else "-")
            lines.append(f"| {task} | {m} | " + " | ".join(_fmt(e.get(tg, {}).get("greedy")) for tg in targets)
                         + f" | {tail} |")
    return lines + [""]


def _composition_section(out: dict, targets: list[str], methods: list[str]) -> list[str]:
    lines = ["## What each mask removed", "",
             "Mean over seeds: query heads pruned, KV groups dead (all their query heads gone), MLP channels pruned, "
             "of the model's totals. Per layer: plots/composition_<task>_<target>.png.", ""]
    for target in targets:
        lines += [f"### {float(target):.0%}", "", "| task | method | heads | KV groups dead | channels |",
                  "|---|---|---:|---:|---:|"]
        for task, t in out["tasks"].items():
            for m in methods:
                c = t["methods"].get(m, {}).get(target, {}).get("composition")
                if c is None:
                    continue
                lines.append(f"| {task} | {m} | {c['heads_pruned']:.1f} / {c['heads_total']:.0f} | "
                             f"{c['kv_groups_dead']:.1f} / {c['kv_groups_total']:.0f} | "
                             f"{c['channels_pruned']:.0f} / {c['channels_total']:.0f} |")
        lines.append("")
    return lines


def _drift_section(out: dict, threshold: float) -> list[str]:
    lines = ["## Where the drift trigger fired", "",
             f"`regenerate: drift` regenerates once the calibration traces' loss under the pruned model has risen by "
             f"more than {threshold:g} x the dense traces' own loss (set from the drift measured on the v2 model before "
             "any accuracy was looked at). Scored sparsity of the step at which it fired, per seed:", "",
             "| task | method | seed | fired at | regenerations |", "|---|---|---:|---|---|"]
    for task, t in out["tasks"].items():
        for method, by_seed in t["drift"].items():
            for seed, d in by_seed.items():
                fired = ", ".join(f"{s:.3f}" for s in d["fired_at"]) or "never"
                lines.append(f"| {task} | {method} | {seed} | {fired} | {len(d['regenerations'])} |")
    return lines + [""]


def _plots(out: dict, params: Params, plots: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    targets = [artifacts.target_key(t) for t in params.study.targets]
    xs = [float(t) for t in targets]
    for task, t in out["tasks"].items():
        fig, ax = plt.subplots(figsize=(8, 5))
        for m, e in t["methods"].items():
            ivs = [e.get(tg, {}).get("greedy") for tg in targets]
            if any(iv is None for iv in ivs):
                continue
            line, = ax.plot(xs, [iv["mean"] for iv in ivs], marker="o", label=f"{m} ({len(e['seeds'])} seeds)")
            ax.fill_between(xs, [iv["low"] for iv in ivs], [iv["high"] for iv in ivs], color=line.get_color(), alpha=0.12)
        if t["dense"]["greedy"]:
            ax.axhline(t["dense"]["greedy"]["mean"], color="black", linestyle="--", label="dense")
        ax.set(xlabel="parameter sparsity", ylabel="greedy strict accuracy", title=f"{task}: 95 % intervals over seeds and items")
        ax.legend(fontsize=7, ncol=2)
        path = plots / f"accuracy_{task}.png"
        artifacts.write_bytes(path, _png(fig, plt))
        written.append(path)
        for target in [t for t in targets if t in ("0.30", "0.40")] or targets[-1:]:
            rows = [(m, e[target]["composition"]["per_layer"]) for m, e in t["methods"].items()
                    if e.get(target, {}).get("composition")]
            if not rows:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(rows) + 1.5))
            for ax, key, total in ((axes[0], "heads_pruned", "heads"), (axes[1], "channels_pruned", "channels")):
                grid = np.array([r[1][key] for r in rows])
                im = ax.imshow(grid, aspect="auto", cmap="viridis")
                ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
                ax.set_xlabel("layer")
                ax.set_title(f"{total} pruned per layer")
                fig.colorbar(im, ax=ax)
            fig.suptitle(f"{task} at {float(target):.0%}: mean over seeds")
            path = plots / f"composition_{task}_{target}.png"
            artifacts.write_bytes(path, _png(fig, plt))
            written.append(path)
    return written


def _png(fig, plt) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_study_report(params: Params) -> Path:
    """results.md, metrics.json and plots/ of the finished cells in study.dir."""
    root = Path(params.study.dir)
    if not (root / "study.json").exists():
        raise StudyError(f"{root} holds no study (no study.json): run `resp study` first")
    out = analyse(params)
    if not out["tasks"]:
        raise StudyError(f"{root} has no finished dense evaluation yet: run `resp study`")
    methods = list(params.study.methods)
    targets = [artifacts.target_key(t) for t in params.study.targets]
    st = params.study
    lines = ["# The study: every method over calibration seeds", "",
             f"Model `{params.model.name_or_path}`; tasks {', '.join(st.tasks)}; calibration seeds {st.seeds} (each sets "
             "calibration.seed, generation.seed, prune.seed); "
             f"{st.num_items} test items per task, greedy and {st.samples} sampled completion(s) per item "
             f"(T={params.evaluation.temperature}); strict extraction; targets {', '.join(targets)}; "
             f"{params.calibration.num_prompts} calibration prompts, {params.prune.steps} pruning steps. Intervals: "
             f"95 % two-stage bootstrap (seeds, then items within each seed; {params.report.bootstrap_samples} resamples). "
             f"Cells finished: {out['cells_done']} of {out['cells_total']}; compute {out['wall_seconds'] / 3600:.2f} h "
             "(sum of cell wall times, 1 thread on a 2-core machine).", ""]
    head = next((t for t in targets if t == "0.40"), targets[-1])
    lines += _headline(out, head, methods, st.reference)
    lines += _pairs_section(out, "Regeneration: fresh streams, common streams, none", REGENERATION_ROWS, targets,
                            "resp regenerates with fresh random streams (the paper), resp_common reuses the dense "
                            "traces' per-prompt streams, resp_noregen never regenerates.")
    lines += _pairs_section(out, "FLAP with and without bias compensation", FLAP_ROWS, targets,
                            "flap adds W[:, removed] @ mean(x[removed]) to o_proj/down_proj biases (created: the model "
                            "has none), as FLAP's code does; flap_nobias is the ablation without it.")
    lines += _accuracy_section(out, targets, methods)
    lines += _drift_section(out, params.prune.drift_threshold)
    lines += _composition_section(out, [t for t in targets if t in ("0.30", "0.40")] or targets, methods)
    _plots(out, params, root / "plots")
    artifacts.write_json(root / "metrics.json", out, newline=True)
    return artifacts.write_text(root / "results.md", "\n".join(lines) + "\n")
