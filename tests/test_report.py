"""resp.report: from hand-written metrics files and run summaries, the exact markdown tables
(accuracy as `mean [low, high]`, strict first, flexible too), the reference (resp) against the
strongest baseline (ablations are not baselines), the regeneration effect and the ablations as
paired differences with intervals, reflection rates, trace drift per step (table, CSV, PNG), the
90%-of-dense rule, metrics.json, reproducible bytes, and one-line errors naming a missing, wrong
or outdated metrics file or run summary. Expected intervals are computed here with resp.stats
from the per-item vectors the fixture writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from resp.cli import app
from resp.config import ReportParams, load_params
from resp.report import ReportError, report_files, write_report
from resp.stats import bootstrap_interval, paired_difference

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["arith", "choice"]
METHODS = ["resp", "resp_noregen", "gisp", "magnitude", "resp_verify", "resp_drift"]
TARGETS = [0.2, 0.4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_ITEMS = 100
SAMPLES = 3
PARAMS = ReportParams(reference="resp", no_regeneration="resp_noregen",
                      ablations=["resp_verify", "resp_filter_correct", "resp_filter_agree", "resp_drift", "resp_selective"],
                      drift_triggered="resp_drift", bootstrap_samples=400, confidence=0.95, seed=0)
# as resp.evaluate writes it: `samples` completions per item in the sampled pass
EVALUATION = {"backend": "hf", "num_items": N_ITEMS, "max_new_tokens": 96, "batch_size": 100, "temperature": 0.6,
              "top_p": 0.95, "top_k": 20, "samples": SAMPLES, "sample_seed": 0, "reflection_markers": ["check:", "wait,"],
              "nll_traces": 64, "nll_batch_size": 16}

# task -> method -> sparsity key -> (measured sparsity, greedy acc, sampled acc, greedy mean tokens, greedy truncation, nll);
# the accuracies are strict; flexible ones are FLEXIBLE_BONUS higher (more where FLEXIBLE_EXTRA says).
# Per item: the first round(acc * 100) items are right (sampled completion k: rotated by k items), so
# a paired difference of two methods is their accuracy difference, all of it in one direction.
NUMBERS = {
    "arith": {
        "dense": {"dense": (0.0, 0.9, 0.85, 40.0, 0.0, 0.5)},
        "resp": {"0.20": (0.2012, 0.88, 0.86, 42.5, 0.02, 0.6), "0.40": (0.4003, 0.80, 0.78, 50.0, 0.1, 0.9)},
        "resp_noregen": {"0.20": (0.2012, 0.70, 0.66, 45.0, 0.05, 0.7), "0.40": (0.4003, 0.55, 0.5, 60.0, 0.2, 1.2)},
        "gisp": {"0.20": (0.2011, 0.85, 0.83, 44.0, 0.04, 0.7), "0.40": (0.4007, 0.6, 0.55, 70.0, 0.3, 1.5)},
        "magnitude": {"0.20": (0.2, 0.7, 0.6, 80.0, 0.5, 2.0), "0.40": (0.4, 0.2, 0.1, 96.0, 1.0, 4.0)},
        # an ablation better than every baseline (and than resp) at 0.20: it must not be named the strongest baseline
        "resp_verify": {"0.20": (0.2012, 0.95, 0.9, 41.0, 0.0, 0.6), "0.40": (0.4003, 0.82, 0.8, 48.0, 0.1, 0.9)},
        "resp_drift": {"0.20": (0.2012, 0.88, 0.85, 42.0, 0.02, 0.6), "0.40": (0.4003, 0.78, 0.75, 52.0, 0.1, 1.0)},
    },
    "choice": {
        "dense": {"dense": (0.0, 0.6, 0.55, 30.0, 0.0, 0.4)},
        "resp": {"0.20": (0.2, 0.58, 0.5, 31.0, 0.0, 0.5), "0.40": (0.4, 0.55, 0.5, 33.0, 0.0, 0.6)},
        # the same per-item results as resp at 0.20: no regeneration effect there
        "resp_noregen": {"0.20": (0.2, 0.58, 0.5, 31.0, 0.0, 0.5), "0.40": (0.4, 0.45, 0.4, 40.0, 0.1, 0.9)},
        "gisp": {"0.20": (0.2, 0.59, 0.52, 32.0, 0.0, 0.5), "0.40": (0.4, 0.5, 0.45, 35.0, 0.04, 0.8)},
        "magnitude": {"0.20": (0.2, 0.3, 0.25, 60.0, 0.2, 1.0), "0.40": (0.4, 0.5, 0.4, 90.0, 0.9, 3.0)},
        "resp_verify": {"0.20": (0.2, 0.6, 0.52, 31.0, 0.0, 0.5), "0.40": (0.4, 0.56, 0.5, 33.0, 0.0, 0.6)},
        "resp_drift": {"0.20": (0.2, 0.57, 0.5, 31.0, 0.0, 0.5), "0.40": (0.4, 0.55, 0.49, 34.0, 0.0, 0.6)},
    },
}
FORMATS = {"arith": "gsm8k", "choice": "mathqa"}
FLEXIBLE_BONUS = 0.05
# Flexible accuracy would make magnitude the strongest baseline at choice 0.20 (0.7 vs gisp 0.64):
# the report must still compare on strict accuracy (gisp 0.59).
FLEXIBLE_EXTRA = {("choice", "magnitude", "0.20"): 0.35}
REFLECTION = 0.3   # reflection rate = REFLECTION - truncation / 4

# run summaries: method -> (loss at each step, regenerated before that scoring); step i+1 is scored
# at sparsity 0.1 * i and prunes to 0.1 * (i + 1)
DRIFT = {
    "resp": ([0.5, 0.52, 0.61, 0.66], [False, True, True, False]),
    "resp_noregen": ([0.5, 0.7, 0.95, 1.3], [False, False, False, False]),
    "resp_drift": ([0.5, 0.58, 0.6, 0.72], [False, False, True, False]),
}


def ones(rate: float, shift: int = 0) -> list[int]:
    k = round(rate * N_ITEMS)
    return np.roll([1] * k + [0] * (N_ITEMS - k), shift).tolist()


def summary(strict: float, flexible: float, tokens: float, truncation: float, shift: int = 0) -> dict:
    """One pass's summary as resp.evaluation.summarize writes it (records left out)."""
    reflection = round(REFLECTION - truncation / 4, 4)
    return {"n": N_ITEMS, "accuracy_strict": strict, "accuracy_flexible": flexible, "mean_completion_tokens": tokens,
            "truncation_rate": truncation, "reflection_rate": reflection,
            "per_item": {"correct_strict": ones(strict, shift), "correct_flexible": ones(flexible, shift),
                         "completion_tokens": [int(tokens)] * N_ITEMS, "truncated": ones(truncation, shift),
                         "reflection": ones(reflection, shift)}}


def composition(sparsity: float) -> dict:
    """A mask's composition as Mask.composition writes it, made up from the sparsity (2 layers)."""
    heads, channels = round(20 * sparsity), round(1000 * sparsity)
    return {"heads_pruned": heads, "heads_total": 16, "kv_groups_dead": heads // 4, "kv_groups_total": 8,
            "channels_pruned": channels, "channels_total": 2000,
            "per_layer": {"heads_pruned": [heads, 0], "kv_groups_dead": [heads // 4, 0],
                          "channels_pruned": [channels - 7, 7]}}


def result(sparsity, greedy, sampled, tokens, truncation, nll, bonus=FLEXIBLE_BONUS) -> dict:
    """One entry of `results` as resp.evaluation.evaluate_masks writes it."""
    samples = [{"sample": k, **summary(sampled, round(sampled + bonus, 4), tokens + 1, truncation / 2, shift=k)}
               for k in range(SAMPLES)]
    return {"sparsity": sparsity, "structure_ratio": sparsity, "composition": composition(sparsity),
            "greedy": summary(greedy, round(greedy + bonus, 4), tokens, truncation),
            "sampled": {**{key: samples[0][key] for key in ("accuracy_strict", "accuracy_flexible",
                                                            "mean_completion_tokens", "truncation_rate",
                                                            "reflection_rate")},
                        "per_sample": samples},
            "nll": {"nll": nll, "n_tokens": 1000}}


def write_metrics(metrics_dir: Path, numbers=NUMBERS) -> Path:
    for task, methods in numbers.items():
        for method, results in methods.items():
            body = {"task": task, "method": method, "model": {"key": "abc"}, "format": FORMATS[task], "split": "test",
                    "few_shot": 0, "evaluation": EVALUATION, "item_ids": [f"test-{i}" for i in range(N_ITEMS)],
                    "heldout": None,
                    "results": {key: result(*values, bonus=FLEXIBLE_BONUS + FLEXIBLE_EXTRA.get((task, method, key), 0))
                                for key, values in results.items()}}
            path = metrics_dir / task / f"{method}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(body))
    return metrics_dir


def write_summaries(runs_dir: Path, drift=DRIFT) -> Path:
    """summary.json of each drift method, as resp.recipe.prune writes it (the fields the report reads)."""
    for task in TASKS:
        for method, (losses, regenerated) in drift.items():
            steps = [{"step": i + 1, "target": round(0.1 * (i + 1), 2), "scored_sparsity": round(0.1 * i, 2),
                      "sparsity": round(0.1 * (i + 1), 2), "loss": loss, "regenerated": again, "traces": "t.jsonl"}
                     for i, (loss, again) in enumerate(zip(losses, regenerated))]
            trace_sets = [{"tag": "initial", "at_step": 0}] + [
                {"tag": f"regenerated-{s['step']}", "at_step": s["step"]} for s in steps if s["regenerated"]]
            path = runs_dir / task / method / "summary.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"method": method, "task": task, "trace_sets": trace_sets, "steps": steps,
                                        "masks": {}}))
    return runs_dir


def report(tmp: Path, methods=METHODS, numbers=NUMBERS, params=PARAMS, tasks=TASKS) -> Path:
    out = tmp / "report"
    write_report(write_metrics(tmp / "metrics", numbers), out, tasks, methods, TARGETS,
                 runs_dir=write_summaries(tmp / "runs"), params=params)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """The report of the full fixture, written once for the tests that only read it."""
    return report(tmp_path_factory.mktemp("full"))


def section(text: str, title: str) -> str:
    """From `## title` up to the next `## ` section (exclusive)."""
    start = text.index(f"\n## {title}\n") + 1
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end + 1]


# per-item vectors as the fixture writes them: greedy strict (items), sampled strict (items x samples)
def greedy_strict(task, method, key):
    return np.array(ones(NUMBERS[task][method][key][1]), dtype=float)


def sampled_strict(task, method, key):
    rate = NUMBERS[task][method][key][2]
    return np.array([ones(rate, k) for k in range(SAMPLES)], dtype=float).T


def cell(values) -> str:
    mean, low, high = bootstrap_interval(values, PARAMS.bootstrap_samples, PARAMS.confidence, PARAMS.seed)
    assert low <= mean <= high
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def diff(a, b) -> str:
    d, low, high = paired_difference(a, b, PARAMS.bootstrap_samples, PARAMS.confidence, PARAMS.seed)
    assert low <= d <= high
    return f"{100 * d:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def test_files_and_sections(written):
    assert [p for p in sorted(written.rglob("*")) if p.is_file()] == sorted(report_files(written, TASKS))
    assert sorted(str(p.relative_to(written)) for p in report_files(written, TASKS)) == sorted([
        "results.md", "metrics.json", *(f"plots/{name}_{task}.{ext}" for name in ("accuracy", "length", "drift")
                                        for task in TASKS for ext in ("csv", "png"))])
    text = (written / "results.md").read_text()
    assert [line for line in text.splitlines() if line.startswith("#")] == [
        "# Results",
        "## Accuracy (%), strict, greedy",
        "## Accuracy (%), strict, sampled",
        "## Accuracy (%), flexible, greedy",
        "## Accuracy (%), flexible, sampled",
        "## Mean completion length (tokens) / truncation rate (%), greedy",
        "## Self-checks and self-corrections",
        "## Measured parameter sparsity (%)",
        "## What each mask removed: query heads / dead KV groups / MLP channels",
        "## RESP against the strongest baseline",
        "## Regeneration effect",
        "## Ablations of RESP",
        "## Trace drift per pruning step",
        "### arith",
        "### choice",
        "## First target sparsity below 90% of dense accuracy (greedy, strict)",
        "## Held-out decode-only NLL (nats/token)",
    ]
    assert ("- arith: first 100 items of split test (gsm8k format, 0-shot), at most 96 new tokens, generated with hf; "
            "sampled at T=0.6, top-p 0.95, top-k 20, mean over 3 completions per item (seed 0).\n") in text
    assert ("Each accuracy is `mean [low, high]`: a 95% percentile bootstrap interval over items (400 resamples, "
            "seed 0)") in text
    # ablations are neither baselines nor compared as such; unevaluated ablations are left out
    assert ("Reference: resp; without regeneration: resp_noregen; ablations: resp_verify, resp_drift; "
            "baselines: gisp, magnitude.\n") in text


def test_accuracy_cells_state_the_mean_and_its_interval(written):
    text = (written / "results.md").read_text()
    rows = [f"| {m} | " + " | ".join(cell(greedy_strict(task, m, _k(t))) for task in TASKS for t in TARGETS) + " |"
            for m in METHODS]
    dense = "| dense | " + " | ".join(cell(greedy_strict(task, "dense", "dense")) for task in TASKS for _ in TARGETS) + " |"
    assert section(text, "Accuracy (%), strict, greedy") == "\n".join([
        "## Accuracy (%), strict, greedy", "",
        "| method | arith 0.20 | arith 0.40 | choice 0.20 | choice 0.40 |",
        "|---|---:|---:|---:|---:|", dense, *rows, ""]) + "\n"
    # sampled: an item's value is its mean over the three completions
    assert f"| resp | {cell(sampled_strict('arith', 'resp', '0.20'))} | " in section(text, "Accuracy (%), strict, sampled")
    assert cell(sampled_strict("arith", "resp", "0.20")) != cell(greedy_strict("arith", "resp", "0.20"))
    # a known cell: 88 of 100 items right; the interval is the bootstrap's, not a normal approximation
    mean, low, high = bootstrap_interval(greedy_strict("arith", "resp", "0.20"), 400, 0.95, 0)
    assert mean == 0.88 and 0.78 < low < 0.88 < high < 0.96
    assert f"| resp | 88.0 [{100 * low:.1f}, {100 * high:.1f}] | " in text


def _k(target: float) -> str:
    return f"{target:.2f}"


def test_interval_cell_of_a_hand_built_vector(tmp_path):
    """Twenty right answers scattered over 100 items: the cell is the bootstrap interval of exactly
    that vector (not of the nested fixture pattern), with the seed and sample count of params."""
    metrics_dir = write_metrics(tmp_path / "metrics")
    vector = [1, 0, 0, 0, 0] * 20
    path = metrics_dir / "arith" / "magnitude.json"
    data = json.loads(path.read_text())
    data["results"]["0.40"]["greedy"]["per_item"]["correct_strict"] = vector
    path.write_text(json.dumps(data))
    params = PARAMS.model_copy(update={"bootstrap_samples": 1000, "seed": 7})
    write_report(metrics_dir, tmp_path / "report", ["arith"], ["magnitude"], TARGETS,
                 runs_dir=write_summaries(tmp_path / "runs"), params=params)
    mean, low, high = bootstrap_interval(np.array(vector, dtype=float), 1000, 0.95, 7)
    assert mean == 0.2 and low < mean < high and high - low < 0.2
    text = (tmp_path / "report" / "results.md").read_text()
    row = next(line for line in section(text, "Accuracy (%), strict, greedy").splitlines() if line.startswith("| magnitude |"))
    assert row.endswith(f" | 20.0 [{100 * low:.1f}, {100 * high:.1f}] |")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["arith"]["magnitude"]["0.40"]
    assert (metrics["greedy_accuracy_strict"], metrics["greedy_accuracy_strict_low"],
            metrics["greedy_accuracy_strict_high"]) == (0.2, low, high)


def test_reference_against_the_strongest_baseline(written):
    """Strict greedy accuracy picks the baseline; resp_verify (95 at arith 0.20, an ablation) is not one;
    choice 0.40 ties gisp and magnitude at 50 (gisp, listed first, wins)."""
    text = section((written / "results.md").read_text(), "RESP against the strongest baseline")
    rows = []
    for task, key, accuracies in [("arith", "0.20", "88.0 / 85.0"), ("arith", "0.40", "80.0 / 60.0"),
                                  ("choice", "0.20", "58.0 / 59.0"), ("choice", "0.40", "55.0 / 50.0")]:
        rows.append(f"| {task} | {key} | gisp | {accuracies} | "
                    f"{diff(greedy_strict(task, 'resp', key), greedy_strict(task, 'gisp', key))} | "
                    f"{diff(sampled_strict(task, 'resp', key), sampled_strict(task, 'gisp', key))} |")
    assert text == "\n".join([
        "## RESP against the strongest baseline", "",
        "The reference method is resp. The strongest baseline is the baseline with the highest greedy strict accuracy "
        "at that sparsity (ties: the one listed first); baselines are the evaluated methods other than resp, "
        "resp_noregen and the ablations. Differences: resp minus the baseline, in accuracy points, with a 95% paired "
        "interval.", "",
        "| task | sparsity | strongest baseline | greedy strict, resp / baseline | difference, greedy strict | "
        "difference, sampled strict |",
        "|---|---:|---:|---:|---:|---:|", *rows, ""]) + "\n"
    assert "| arith | 0.40 | gisp | 80.0 / 60.0 | +20.0 [" in text
    assert "resp_verify" not in text.split("\n\n", 2)[2]


def test_regeneration_effect(written):
    """Identical per-item results (choice 0.20): no effect detected; 18 items more right (arith 0.20):
    a positive difference whose interval excludes 0."""
    text = section((written / "results.md").read_text(), "Regeneration effect")
    zero = "+0.0 [+0.0, +0.0]"
    assert ("- choice at 0.20: greedy strict +0.0 [+0.0, +0.0]: no effect detected (the interval includes 0); "
            "sampled strict +0.0 [+0.0, +0.0]: no effect detected (the interval includes 0).\n") in text
    greedy = paired_difference(greedy_strict("arith", "resp", "0.20"), greedy_strict("arith", "resp_noregen", "0.20"),
                               400, 0.95, 0)
    assert greedy[0] == pytest.approx(0.18) and greedy[1] > 0
    better = "resp is better than resp_noregen (the interval excludes 0)"
    line = (f"- arith at 0.20: greedy strict {diff(greedy_strict('arith', 'resp', '0.20'), greedy_strict('arith', 'resp_noregen', '0.20'))}: "
            f"{better}; sampled strict "
            f"{diff(sampled_strict('arith', 'resp', '0.20'), sampled_strict('arith', 'resp_noregen', '0.20'))}: {better}.\n")
    assert line in text and line.startswith("- arith at 0.20: greedy strict +18.0 [+")
    assert zero not in line
    assert text.count("\n- ") == len(TASKS) * len(TARGETS)


def test_regeneration_that_hurts_is_reported_too(tmp_path):
    numbers = json.loads(json.dumps(NUMBERS))
    numbers["arith"]["resp"], numbers["arith"]["resp_noregen"] = numbers["arith"]["resp_noregen"], numbers["arith"]["resp"]
    text = (report(tmp_path, ["resp", "resp_noregen"], numbers, tasks=["arith"]) / "results.md").read_text()
    assert ("- arith at 0.20: greedy strict -18.0 [" in text and
            "]: resp is worse than resp_noregen (the interval excludes 0); sampled strict -20.0 [" in text)


def test_ablations_of_the_reference(written):
    text = section((written / "results.md").read_text(), "Ablations of RESP")
    rows = []
    for ablation in ("resp_verify", "resp_drift"):   # report.ablations order, evaluated ones only
        for task in TASKS:
            for key in ("0.20", "0.40"):
                accuracies = f"{100 * NUMBERS[task][ablation][key][1]:.1f} / {100 * NUMBERS[task]['resp'][key][1]:.1f}"
                rows.append(f"| {ablation} | {task} | {key} | {accuracies} | "
                            f"{diff(greedy_strict(task, ablation, key), greedy_strict(task, 'resp', key))} | "
                            f"{diff(sampled_strict(task, ablation, key), sampled_strict(task, 'resp', key))} |")
    assert text == "\n".join([
        "## Ablations of RESP", "",
        "Each ablation minus resp, on the same items, in accuracy points, with a 95% paired interval (positive: the "
        "ablation is better).", "",
        "| ablation | task | sparsity | greedy strict, ablation / resp | difference, greedy strict | "
        "difference, sampled strict |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        "Regenerations spent (trace sets after the initial one, from summary.json): resp_drift regenerates when the "
        "traces' loss drifts, resp at its milestones.", "",
        "| task | resp | resp_drift |",
        "|---|---:|---:|",
        "| arith | 2 | 1 |",
        "| choice | 2 | 1 |", ""]) + "\n"
    assert "| resp_verify | arith | 0.20 | 95.0 / 88.0 | +7.0 [" in text


def test_reflection_and_other_plain_sections(written):
    text = (written / "results.md").read_text()
    assert section(text, "Self-checks and self-corrections") == """\
## Self-checks and self-corrections

Reflection rate (%), greedy / sampled: the share of completions containing one of `check:`, `wait,` (evaluation.reflection_markers).

| method | arith 0.20 | arith 0.40 | choice 0.20 | choice 0.40 |
|---|---:|---:|---:|---:|
| dense | 30.0 / 30.0 | 30.0 / 30.0 | 30.0 / 30.0 | 30.0 / 30.0 |
| resp | 29.5 / 29.8 | 27.5 / 28.7 | 30.0 / 30.0 | 30.0 / 30.0 |
| resp_noregen | 28.7 / 29.4 | 25.0 / 27.5 | 30.0 / 30.0 | 27.5 / 28.7 |
| gisp | 29.0 / 29.5 | 22.5 / 26.2 | 30.0 / 30.0 | 29.0 / 29.5 |
| magnitude | 17.5 / 23.8 | 5.0 / 17.5 | 25.0 / 27.5 | 7.5 / 18.8 |
| resp_verify | 30.0 / 30.0 | 27.5 / 28.7 | 30.0 / 30.0 | 30.0 / 30.0 |
| resp_drift | 29.5 / 29.8 | 27.5 / 28.7 | 30.0 / 30.0 | 30.0 / 30.0 |

"""
    assert section(text, "Mean completion length (tokens) / truncation rate (%), greedy").splitlines()[4:6] == [
        "| dense | 40.0 / 0.0 | 40.0 / 0.0 | 30.0 / 0.0 | 30.0 / 0.0 |",
        "| resp | 42.5 / 2.0 | 50.0 / 10.0 | 31.0 / 0.0 | 33.0 / 0.0 |"]
    assert section(text, "First target sparsity below 90% of dense accuracy (greedy, strict)") == """\
## First target sparsity below 90% of dense accuracy (greedy, strict)

| method | arith (< 81.0) | choice (< 54.0) |
|---|---:|---:|
| resp | 0.40 | never |
| resp_noregen | 0.20 | 0.40 |
| gisp | 0.40 | 0.40 |
| magnitude | 0.20 | 0.20 |
| resp_verify | never | never |
| resp_drift | 0.40 | never |

"""
    assert section(text, "Held-out decode-only NLL (nats/token)").splitlines()[4:6] == [
        "| dense | 0.5000 | 0.5000 | 0.4000 | 0.4000 |", "| resp | 0.6000 | 0.9000 | 0.5000 | 0.6000 |"]
    # the flexible tables use the flexible vectors: magnitude's 70 at choice 0.20
    assert "| magnitude | " in section(text, "Accuracy (%), flexible, greedy")
    assert section(text, "Accuracy (%), flexible, greedy").split("| magnitude | ")[1].split(" | ")[2].startswith("70.0 [")


def test_trace_drift_table_and_plot_data(written):
    text = section((written / "results.md").read_text(), "Trace drift per pruning step")
    table = """\
| step | resp: sparsity (%) | resp: loss | resp_noregen: sparsity (%) | resp_noregen: loss | resp_drift: sparsity (%) | resp_drift: loss |
|---|---:|---:|---:|---:|---:|---:|
| 1 | 0.0 | 0.5 | 0.0 | 0.5 | 0.0 | 0.5 |
| 2 | 10.0 | 0.52 (regenerated) | 10.0 | 0.7 | 10.0 | 0.58 |
| 3 | 20.0 | 0.61 (regenerated) | 20.0 | 0.95 | 20.0 | 0.6 (regenerated) |
| 4 | 30.0 | 0.66 | 30.0 | 1.3 | 30.0 | 0.72 |
"""
    assert text == (
        "## Trace drift per pruning step\n\n"
        "The decode-only loss (nats/token) of the current trace set under the model as pruned so far, at the sparsity "
        "it was scored at (%); (regenerated): the traces were regenerated just before this scoring. "
        "Plots: plots/drift_{task}.png.\n\n"
        f"### arith\n\n{table}\n### choice\n\n{table}\n")
    assert (written / "plots" / "drift_arith.csv").read_text() == (
        "step,resp_sparsity,resp_loss,resp_regenerated,resp_noregen_sparsity,resp_noregen_loss,"
        "resp_noregen_regenerated,resp_drift_sparsity,resp_drift_loss,resp_drift_regenerated\n"
        "1,0.0,0.5,0,0.0,0.5,0,0.0,0.5,0\n"
        "2,0.1,0.52,1,0.1,0.7,0,0.1,0.58,0\n"
        "3,0.2,0.61,1,0.2,0.95,0,0.2,0.6,1\n"
        "4,0.3,0.66,0,0.3,1.3,0,0.3,0.72,0\n")


def test_drift_of_runs_with_different_steps(tmp_path):
    """A method without a step another has: empty CSV cells and `-` in the table; tiny losses keep
    four significant digits (the 7th depends on the CPU's float reduction order)."""
    drift = {"resp": ([0.000199843, 0.00021], [False, True]), "resp_noregen": ([0.0002], [False])}
    out = tmp_path / "report"
    write_report(write_metrics(tmp_path / "metrics"), out, ["arith"], ["resp", "resp_noregen"], TARGETS,
                 runs_dir=write_summaries(tmp_path / "runs", drift), params=PARAMS)
    assert (out / "plots" / "drift_arith.csv").read_text() == (
        "step,resp_sparsity,resp_loss,resp_regenerated,resp_noregen_sparsity,resp_noregen_loss,resp_noregen_regenerated\n"
        "1,0.0,0.0001998,0,0.0,0.0002,0\n"
        "2,0.1,0.00021,1,,,\n")
    assert "| 2 | 10.0 | 0.00021 (regenerated) | - | - |\n" in (out / "results.md").read_text()


def test_metrics_json(written):
    metrics = json.loads((written / "metrics.json").read_text())
    interval = lambda v: bootstrap_interval(v, 400, 0.95, 0)   # noqa: E731
    _, low, high = interval(greedy_strict("arith", "dense", "dense"))
    _, sampled_low, sampled_high = interval(sampled_strict("arith", "dense", "dense"))
    dense = metrics["arith"]["dense"]
    assert {k: dense[k] for k in ("sparsity", "greedy_accuracy_strict", "greedy_accuracy_strict_low",
                                  "greedy_accuracy_strict_high", "greedy_accuracy_flexible", "sampled_accuracy_strict",
                                  "sampled_accuracy_strict_low", "sampled_accuracy_strict_high",
                                  "greedy_mean_completion_tokens", "greedy_truncation_rate", "greedy_reflection_rate",
                                  "sampled_reflection_rate", "nll")} == {
        "sparsity": 0.0, "greedy_accuracy_strict": 0.9, "greedy_accuracy_strict_low": low,
        "greedy_accuracy_strict_high": high, "greedy_accuracy_flexible": 0.95, "sampled_accuracy_strict": 0.85,
        "sampled_accuracy_strict_low": sampled_low, "sampled_accuracy_strict_high": sampled_high,
        "greedy_mean_completion_tokens": 40.0, "greedy_truncation_rate": 0.0, "greedy_reflection_rate": 0.3,
        "sampled_reflection_rate": 0.3, "nll": 0.5}
    assert sorted(metrics["choice"]) == sorted(["dense", *METHODS, "differences", "regenerations"])
    assert metrics["arith"]["regenerations"] == {"resp": 2, "resp_noregen": 0, "resp_drift": 1}
    differences = metrics["arith"]["differences"]["0.20"]
    assert differences["strongest_baseline"] == "gisp"
    d, lo, hi = paired_difference(greedy_strict("arith", "resp", "0.20"), greedy_strict("arith", "resp_noregen", "0.20"),
                                  400, 0.95, 0)
    assert (differences["reference_minus_no_regeneration_greedy_strict"],
            differences["reference_minus_no_regeneration_greedy_strict_low"],
            differences["reference_minus_no_regeneration_greedy_strict_high"]) == (d, lo, hi)
    names = ["reference_minus_strongest_baseline", "reference_minus_no_regeneration",
             "resp_verify_minus_reference", "resp_drift_minus_reference"]
    assert sorted(differences) == sorted(["strongest_baseline", *(f"{n}_{mode}_strict{end}" for n in names
                                                                  for mode in ("greedy", "sampled")
                                                                  for end in ("", "_low", "_high"))])
    assert metrics["choice"]["differences"]["0.20"]["reference_minus_no_regeneration_greedy_strict"] == 0.0


def test_accuracy_and_length_plot_data(written):
    assert (written / "plots" / "accuracy_arith.csv").read_text() == (
        "sparsity,dense,resp,resp_noregen,gisp,magnitude,resp_verify,resp_drift\n"
        "0.2,90.0,88.0,70.0,85.0,70.0,95.0,88.0\n"
        "0.4,90.0,80.0,55.0,60.0,20.0,82.0,78.0\n")
    assert (written / "plots" / "accuracy_choice.csv").read_text().splitlines()[1].startswith(
        "0.2,60.0,58.0,58.0,59.0,30.0,")   # strict: magnitude 30, not its flexible 70
    assert (written / "plots" / "length_choice.csv").read_text().splitlines()[2] == "0.4,30.0,33.0,40.0,35.0,90.0,33.0,34.0"


def test_output_is_reproducible(written, tmp_path):
    second = report(tmp_path)
    for path in report_files(written, TASKS):
        twin = second / path.relative_to(written)
        assert path.read_bytes() == twin.read_bytes(), path.name
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_MAGIC)
            assert b"Software" not in path.read_bytes()
    text = (written / "metrics.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert [p.name for p in (written / "plots").iterdir() if ".tmp-" in p.name] == []


def test_sections_need_their_methods(tmp_path):
    out = report(tmp_path, ["gisp"], tasks=["arith"])
    text = (out / "results.md").read_text()
    assert "Not computed: the report needs resp and at least one baseline in run.methods.\n" in text
    assert "Not computed: the report needs resp and resp_noregen in run.methods.\n" in text
    assert ("Not computed: the report needs resp and at least one of report.ablations (resp_verify, resp_filter_correct, "
            "resp_filter_agree, resp_drift, resp_selective) in run.methods.\n") in text
    assert ("Not computed: none of the reference, its no-regeneration ablation and the drift-triggered ablation is in run.methods.\n"
            in text)
    assert "| gisp | 0.40 |\n" in text
    assert (out / "plots" / "drift_arith.csv").read_text() == "step\n"
    assert (out / "plots" / "drift_arith.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "metrics.json").read_text())["arith"]["differences"] == {"0.20": {}, "0.40": {}}


def test_missing_metrics_file(tmp_path):
    metrics_dir = write_metrics(tmp_path / "metrics")
    (metrics_dir / "choice" / "gisp.json").unlink()
    missing = metrics_dir / "choice" / "gisp.json"
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {missing} not found: evaluate gisp on choice first "
            f"(`resp evaluate --task choice ... --out {missing}`, or `dvc repro`)") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=tmp_path, params=PARAMS)
    assert not (tmp_path / "report").exists()


def test_methods_evaluated_under_another_protocol_are_refused(tmp_path):
    metrics_dir = write_metrics(tmp_path / "metrics")
    path = metrics_dir / "choice" / "gisp.json"
    data = json.loads(path.read_text())
    data["evaluation"] = {**data["evaluation"], "backend": "vllm", "temperature": 0.7}
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} was evaluated with other settings than choice/dense.json (evaluation.backend, "
            "evaluation.temperature): re-run `resp evaluate` for both with the same params") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=tmp_path, params=PARAMS)
    assert not (tmp_path / "report").exists()


def test_methods_evaluated_on_other_items_are_refused(tmp_path):
    """Paired differences need the same items in the same order as dense.json."""
    metrics_dir = write_metrics(tmp_path / "metrics")
    path = metrics_dir / "arith" / "resp_verify.json"
    data = json.loads(path.read_text())
    data["item_ids"] = list(reversed(data["item_ids"]))
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} was evaluated on other items than arith/dense.json (item_ids differ): re-run "
            "`resp evaluate` for both with the same params and data") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS,
                     runs_dir=write_summaries(tmp_path / "runs"), params=PARAMS)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("mode,label", [("greedy", "dense"), ("sampled", "0.40")])
def test_metrics_file_without_strict_and_flexible_accuracy_is_refused(tmp_path, mode, label):
    """A metrics file written before both extractors existed (one plain `accuracy`) gives a
    one-line error that says to re-run `resp evaluate`, and no report."""
    metrics_dir = write_metrics(tmp_path / "metrics")
    method = "dense" if label == "dense" else "resp"
    path = metrics_dir / "arith" / f"{method}.json"
    data = json.loads(path.read_text())
    numbers = data["results"][label][mode]
    numbers["accuracy"] = numbers.pop("accuracy_strict")
    del numbers["accuracy_flexible"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} has no {mode}.accuracy_strict, {mode}.accuracy_flexible for {label} (written before "
            "strict and flexible accuracy were both scored): re-run `resp evaluate`") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=tmp_path, params=PARAMS)
    assert not (tmp_path / "report").exists()


def _drop_greedy_per_item(data):
    del data["results"]["0.20"]["greedy"]["per_item"]
    del data["results"]["0.20"]["greedy"]["reflection_rate"]
    return "greedy.reflection_rate, greedy.per_item for 0.20"


def _drop_sampled_per_item(data):
    for sample in data["results"]["0.20"]["sampled"]["per_sample"]:
        del sample["per_item"]
    return "sampled.per_seed[].per_item for 0.20"


@pytest.mark.parametrize("drop", [_drop_greedy_per_item, _drop_sampled_per_item])
def test_metrics_file_without_per_item_results_is_refused(tmp_path, drop):
    metrics_dir = write_metrics(tmp_path / "metrics")
    path = metrics_dir / "choice" / "gisp.json"
    data = json.loads(path.read_text())
    missing = drop(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} has no {missing} (written before per-item scoring): re-run `resp evaluate`") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=tmp_path, params=PARAMS)
    assert not (tmp_path / "report").exists()


def test_metrics_file_without_item_ids_or_with_inconsistent_vectors_is_refused(tmp_path):
    metrics_dir = write_metrics(tmp_path / "metrics")
    path = metrics_dir / "arith" / "dense.json"
    data = json.loads(path.read_text())
    del data["item_ids"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} has no item_ids (written before per-item scoring): re-run `resp evaluate`") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=tmp_path, params=PARAMS)
    metrics_dir = write_metrics(tmp_path / "metrics")
    path = metrics_dir / "arith" / "gisp.json"
    data = json.loads(path.read_text())
    data["results"]["0.40"]["greedy"]["per_item"]["correct_strict"][-1] = 1   # 61 right, the file says 0.6
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} states greedy.accuracy_strict 0.6 for 0.40 but its per-item results give 0.61: "
            "re-run `resp evaluate`") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=tmp_path, params=PARAMS)
    data["results"]["0.40"]["greedy"]["per_item"]["correct_strict"] = [1] * 60
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} has 60 per-item greedy strict results for 0.40, not one per item_ids (100): "
            "re-run `resp evaluate`") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=tmp_path, params=PARAMS)


def test_missing_or_outdated_run_summary_is_refused(tmp_path):
    metrics_dir = write_metrics(tmp_path / "metrics")
    runs_dir = tmp_path / "runs"
    run_dir = runs_dir / "arith" / "resp"
    with pytest.raises(ReportError, match="^" + re.escape(
            f"run summary {run_dir / 'summary.json'} not found: prune resp on arith first "
            f"(`resp prune --task arith --method resp --out {run_dir}`, or `dvc repro`)") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=runs_dir, params=PARAMS)
    write_summaries(runs_dir)
    path = runs_dir / "choice" / "resp_drift" / "summary.json"
    data = json.loads(path.read_text())
    for step in data["steps"]:
        del step["scored_sparsity"], step["regenerated"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="^" + re.escape(
            f"run summary {path} has no regenerated, scored_sparsity per step (written before trace drift was "
            f"recorded): re-run `resp prune --task choice --method resp_drift --out {path.parent}`, or `dvc repro`") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=runs_dir, params=PARAMS)
    assert not (tmp_path / "report").exists()


def test_missing_target_and_wrong_file(tmp_path):
    numbers = json.loads(json.dumps(NUMBERS))
    del numbers["arith"]["resp"]["0.40"]
    metrics_dir = write_metrics(tmp_path / "metrics", numbers)
    path = metrics_dir / "arith" / "resp.json"
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} has no result at sparsity 0.40: re-run `resp evaluate` with the masks of every "
            "target in prune.targets") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS, runs_dir=tmp_path, params=PARAMS)
    (metrics_dir / "arith" / "gisp.json").write_text(path.read_text())
    gisp = metrics_dir / "arith" / "gisp.json"
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {gisp} holds 'resp' on 'arith', not 'gisp' on 'arith': re-run `resp evaluate` with --out {gisp}") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, ["gisp"], TARGETS, runs_dir=tmp_path, params=PARAMS)


def test_cli_report(tmp_path):
    metrics_dir = write_metrics(tmp_path / "metrics")
    runs_dir = write_summaries(tmp_path / "runs")
    out = tmp_path / "report"
    args = ["report", "--metrics-dir", str(metrics_dir), "--runs-dir", str(runs_dir), "--out", str(out),
            "--params", str(ROOT / "params.yaml"),
            "--set", "run.tasks=[arith,choice]", "--set", f"run.methods=[{','.join(METHODS)}]",
            "--set", "prune.targets=[0.2,0.4]", "--set", "prune.milestones=[0.1,0.2]",
            "--set", "report.bootstrap_samples=400"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 14 files to {out} (table: {out / 'results.md'})\n"
    p = load_params(ROOT / "params.yaml", ["report.bootstrap_samples=400"])
    write_report(metrics_dir, tmp_path / "direct", TASKS, METHODS, TARGETS, runs_dir=runs_dir, params=p.report)
    assert (out / "results.md").read_text() == (tmp_path / "direct" / "results.md").read_text()
    (metrics_dir / "arith" / "dense.json").unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: metrics file {metrics_dir / 'arith' / 'dense.json'} not found: ")


def test_rows_show_the_label_the_masks_state(tmp_path):
    """A method whose masks carry a label (FLAP without bias compensation) is shown under it, the
    strongest baseline too."""
    metrics_dir = write_metrics(tmp_path / "metrics")
    path = metrics_dir / "arith" / "gisp.json"
    data = json.loads(path.read_text())
    for entry in data["results"].values():
        entry["label"] = "gisp (no bias)"
    path.write_text(json.dumps(data))
    write_report(metrics_dir, tmp_path / "report", ["arith"], ["resp", "gisp"], TARGETS,
                 runs_dir=write_summaries(tmp_path / "runs"), params=PARAMS)
    text = (tmp_path / "report" / "results.md").read_text()
    assert "\n| gisp (no bias) | " in text and "\n| gisp | " not in text
    assert "\n| arith | 0.20 | gisp (no bias) | 88.0 / 85.0 | " in text
    assert "\n| resp | " in text   # methods without a label keep their name


def test_a_run_without_sampled_pass_reports_greedy_only(tmp_path):
    """evaluation.samples: 0 skips the sampled pass: cells say "-", the protocol says so."""
    metrics_dir = write_metrics(tmp_path / "metrics")
    for path in metrics_dir.glob("*/*.json"):
        data = json.loads(path.read_text())
        data["evaluation"]["samples"] = 0
        for entry in data["results"].values():
            entry["sampled"] = None
        path.write_text(json.dumps(data))
    write_report(metrics_dir, tmp_path / "report", ["arith"], ["resp", "resp_noregen", "gisp"], TARGETS,
                 runs_dir=write_summaries(tmp_path / "runs"), params=PARAMS)
    text = (tmp_path / "report" / "results.md").read_text()
    assert "no sampled pass (evaluation.samples is 0)" in text
    assert "| dense | - | - |" in section(text, "Accuracy (%), strict, sampled")
    assert "| dense | 30.0 / - | 30.0 / - |" in text
    assert section(text, "RESP against the strongest baseline").splitlines()[-2].endswith(" | - |")
    assert "sampled strict -: not measured (no sampled pass)." in section(text, "Regeneration effect")
    flat = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert flat["arith"]["resp"]["0.20"]["sampled_accuracy_strict"] is None
    assert flat["arith"]["resp"]["0.20"]["sampled_accuracy_strict_low"] is None
    assert flat["arith"]["differences"]["0.20"]["reference_minus_no_regeneration_sampled_strict"] is None


def test_sampled_results_keyed_by_seed_read_the_same(tmp_path):
    """`sample_seeds` with `per_seed` entries (one sampled completion per seed) gives the same numbers."""
    first = report(tmp_path / "first", ["resp", "gisp"], tasks=["arith"])
    metrics_dir = tmp_path / "first" / "metrics"
    for path in metrics_dir.glob("*/*.json"):
        data = json.loads(path.read_text())
        ev = data["evaluation"]
        data["evaluation"] = {**{k: v for k, v in ev.items() if k not in ("samples", "sample_seed")},
                              "sample_seeds": [0, 1, 2]}
        for entry in data["results"].values():
            entry["sampled"]["per_seed"] = [{"seed": s.pop("sample"), **s} for s in entry["sampled"].pop("per_sample")]
        path.write_text(json.dumps(data))
    second = tmp_path / "second"
    write_report(metrics_dir, second, ["arith"], ["resp", "gisp"], TARGETS, runs_dir=tmp_path / "first" / "runs",
                 params=PARAMS)
    one, two = (first / "results.md").read_text(), (second / "results.md").read_text()
    assert "mean over seeds [0, 1, 2]." in two
    assert one.replace("mean over 3 completions per item (seed 0)", "mean over seeds [0, 1, 2]") == two
    assert (first / "metrics.json").read_bytes() == (second / "metrics.json").read_bytes()


def test_dvc_report_stage_reads_the_drift_summaries_of_the_run():
    """dvc.yaml lists the summaries literally: the report reads those of report.reference,
    report.no_regeneration and report.drift_triggered that run.methods holds, for every task, and the
    drift plots show their loss columns. By hand for params.yaml's run (arith; resp, resp_noregen, gisp,
    wanda_sp, flap): resp and resp_noregen, not resp_drift."""
    params = load_params(ROOT / "params.yaml")
    assert (params.run.tasks, params.run.methods) == (["arith"], ["resp", "resp_noregen", "gisp", "wanda_sp", "flap"])
    assert (params.report.reference, params.report.no_regeneration, params.report.drift_triggered) == (
        "resp", "resp_noregen", "resp_drift")
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = dvc["stages"]["report"]
    assert sorted(d for d in stage["deps"] if d.endswith("summary.json")) == [
        "data/runs/arith/resp/summary.json", "data/runs/arith/resp_noregen/summary.json"]
    assert {"resp/report.py", "resp/stats.py", "data/metrics"} <= set(stage["deps"])
    assert {"report", "evaluation", "run", "prune.targets"} <= set(stage["params"])
    assert "--runs-dir data/runs" in stage["cmd"]
    plots = {name: spec for entry in dvc["plots"] for name, spec in entry.items()}
    assert plots["drift_arith"]["x"] == "step"
    assert plots["drift_arith"]["y"] == {"data/report/plots/drift_arith.csv": ["resp_loss", "resp_noregen_loss"]}


def test_mask_composition_section(written):
    text = (written / "results.md").read_text()
    section = text.split("## What each mask removed")[1].split("\n## ")[0]
    # resp at 0.20 (sparsity 0.2012): 4 heads, 1 dead KV group, 201 channels; at 0.40: 8 / 2 / 400
    assert "\n| resp | 4 / 1 / 201 | 8 / 2 / 400 |" in section
    assert "Per layer, arith at 0.40 (heads / channels pruned):" in section
    assert "\n| resp | 8 / 393 | 0 / 7 |" in section
