"""resp.report: from hand-written metrics files, the exact markdown tables (strict accuracy
first, flexible too), RESP's margin over the strongest baseline, the 90%-of-dense rule (both on
strict accuracy), metrics.json, plot data, valid and reproducible PNGs, and one-line errors
naming a missing, wrong or outdated metrics file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from resp.cli import app
from resp.report import ReportError, report_files, write_report

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["arith", "choice"]
METHODS = ["resp", "gisp", "magnitude"]
TARGETS = [0.2, 0.4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVALUATION = {"backend": "hf", "num_items": 500, "max_new_tokens": 96, "batch_size": 100, "temperature": 0.6, "top_p": 0.95,
              "top_k": 20, "sample_seeds": [0, 1], "nll_traces": 64, "nll_batch_size": 16}

# task -> method -> sparsity key -> (measured sparsity, greedy acc, sampled acc, greedy mean tokens, greedy truncation, nll);
# the accuracies are strict; flexible ones are FLEXIBLE_BONUS higher (more where FLEXIBLE_EXTRA says).
NUMBERS = {
    "arith": {
        "dense": {"dense": (0.0, 0.9, 0.85, 40.0, 0.0, 0.5)},
        "resp": {"0.20": (0.2012, 0.88, 0.86, 42.5, 0.02, 0.6), "0.40": (0.4003, 0.80, 0.78, 50.0, 0.1, 0.9)},
        "gisp": {"0.20": (0.2011, 0.85, 0.83, 44.0, 0.04, 0.7), "0.40": (0.4007, 0.6, 0.55, 70.0, 0.3, 1.5)},
        "magnitude": {"0.20": (0.2, 0.7, 0.6, 80.0, 0.5, 2.0), "0.40": (0.4, 0.2, 0.1, 96.0, 1.0, 4.0)},
    },
    "choice": {
        "dense": {"dense": (0.0, 0.6, 0.55, 30.0, 0.0, 0.4)},
        "resp": {"0.20": (0.2, 0.58, 0.5, 31.0, 0.0, 0.5), "0.40": (0.4, 0.55, 0.5, 33.0, 0.0, 0.6)},
        "gisp": {"0.20": (0.2, 0.59, 0.52, 32.0, 0.0, 0.5), "0.40": (0.4, 0.5, 0.45, 35.0, 0.04, 0.8)},
        "magnitude": {"0.20": (0.2, 0.3, 0.25, 60.0, 0.2, 1.0), "0.40": (0.4, 0.5, 0.4, 90.0, 0.9, 3.0)},
    },
}
FORMATS = {"arith": "gsm8k", "choice": "mathqa"}
FLEXIBLE_BONUS = 0.05
# Flexible accuracy would make magnitude the strongest baseline at choice 0.20 (0.7 vs gisp 0.64):
# the report must still compare on strict accuracy (gisp 0.59).
FLEXIBLE_EXTRA = {("choice", "magnitude", "0.20"): 0.35}


def result(sparsity, greedy, sampled, tokens, truncation, nll, bonus=FLEXIBLE_BONUS) -> dict:
    """One entry of `results` as resp.evaluate.evaluate_masks writes it."""
    return {"sparsity": sparsity, "structure_ratio": sparsity,
            "greedy": {"n": 500, "accuracy_strict": greedy, "accuracy_flexible": round(greedy + bonus, 4),
                       "mean_completion_tokens": tokens, "truncation_rate": truncation},
            "sampled": {"accuracy_strict": sampled, "accuracy_flexible": round(sampled + bonus, 4),
                        "mean_completion_tokens": tokens + 1, "truncation_rate": truncation / 2,
                        "per_seed": [{"seed": 0}, {"seed": 1}]},
            "nll": {"nll": nll, "n_tokens": 1000}}


def write_metrics(metrics_dir: Path, numbers=NUMBERS) -> Path:
    for task, methods in numbers.items():
        for method, results in methods.items():
            body = {"task": task, "method": method, "model": {"key": "abc"}, "format": FORMATS[task], "split": "test",
                    "few_shot": 0, "evaluation": EVALUATION, "heldout": None,
                    "results": {key: result(*values, bonus=FLEXIBLE_BONUS + FLEXIBLE_EXTRA.get((task, method, key), 0))
                                for key, values in results.items()}}
            path = metrics_dir / task / f"{method}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(body))
    return metrics_dir


EXPECTED_MD = """\
# Results

Every method prunes the same model to each target parameter sparsity (columns); `dense` is the unpruned model. Protocol:

- arith: first 500 items of split test (gsm8k format, 0-shot), at most 96 new tokens, generated with hf; sampled at T=0.6, top-p 0.95, top-k 20, mean over seeds [0, 1].
- choice: first 500 items of split test (mathqa format, 0-shot), at most 96 new tokens, generated with hf; sampled at T=0.6, top-p 0.95, top-k 20, mean over seeds [0, 1].

Accuracy is scored twice, as lm-eval does: **strict** reads the answer stated after `</think>` (a completion cut inside its thinking is wrong); **flexible** reads the last number or option (after `</think>` if there is one, else anywhere). Comparisons below use greedy strict accuracy.

## Accuracy (%), strict: greedy / sampled

| method | arith 0.20 | arith 0.40 | choice 0.20 | choice 0.40 |
|---|---:|---:|---:|---:|
| dense | 90.0 / 85.0 | 90.0 / 85.0 | 60.0 / 55.0 | 60.0 / 55.0 |
| resp | 88.0 / 86.0 | 80.0 / 78.0 | 58.0 / 50.0 | 55.0 / 50.0 |
| gisp | 85.0 / 83.0 | 60.0 / 55.0 | 59.0 / 52.0 | 50.0 / 45.0 |
| magnitude | 70.0 / 60.0 | 20.0 / 10.0 | 30.0 / 25.0 | 50.0 / 40.0 |

## Accuracy (%), flexible: greedy / sampled

| method | arith 0.20 | arith 0.40 | choice 0.20 | choice 0.40 |
|---|---:|---:|---:|---:|
| dense | 95.0 / 90.0 | 95.0 / 90.0 | 65.0 / 60.0 | 65.0 / 60.0 |
| resp | 93.0 / 91.0 | 85.0 / 83.0 | 63.0 / 55.0 | 60.0 / 55.0 |
| gisp | 90.0 / 88.0 | 65.0 / 60.0 | 64.0 / 57.0 | 55.0 / 50.0 |
| magnitude | 75.0 / 65.0 | 25.0 / 15.0 | 70.0 / 65.0 | 55.0 / 45.0 |

## Mean completion length (tokens) / truncation rate (%), greedy

| method | arith 0.20 | arith 0.40 | choice 0.20 | choice 0.40 |
|---|---:|---:|---:|---:|
| dense | 40.0 / 0.0 | 40.0 / 0.0 | 30.0 / 0.0 | 30.0 / 0.0 |
| resp | 42.5 / 2.0 | 50.0 / 10.0 | 31.0 / 0.0 | 33.0 / 0.0 |
| gisp | 44.0 / 4.0 | 70.0 / 30.0 | 32.0 / 0.0 | 35.0 / 4.0 |
| magnitude | 80.0 / 50.0 | 96.0 / 100.0 | 60.0 / 20.0 | 90.0 / 90.0 |

## Measured parameter sparsity (%)

| method | arith 0.20 | arith 0.40 | choice 0.20 | choice 0.40 |
|---|---:|---:|---:|---:|
| resp | 20.1 | 40.0 | 20.0 | 40.0 |
| gisp | 20.1 | 40.1 | 20.0 | 40.0 |
| magnitude | 20.0 | 40.0 | 20.0 | 40.0 |

## RESP against the strongest baseline (greedy strict accuracy, %)

The strongest baseline is the best method other than resp at that sparsity (ties: the one listed first).

- arith at 0.20: resp 88.0 vs gisp 85.0: +3.0 points.
- arith at 0.40: resp 80.0 vs gisp 60.0: +20.0 points.
- choice at 0.20: resp 58.0 vs gisp 59.0: -1.0 points.
- choice at 0.40: resp 55.0 vs gisp 50.0: +5.0 points.

## First target sparsity below 90% of dense accuracy (greedy, strict)

| method | arith (< 81.0) | choice (< 54.0) |
|---|---:|---:|
| resp | 0.40 | never |
| gisp | 0.40 | 0.40 |
| magnitude | 0.20 | 0.20 |
"""
# Margins (strict): 88-85=+3, 80-60=+20, 58-59=-1 (flexible would name magnitude, 70),
# 55-max(50 gisp, 50 magnitude: tie, gisp listed first)=+5.
# 90% of dense (strict): arith 0.9*90=81 (resp 80 at 0.40 is below), choice 0.9*60=54 (resp 58, 55: never);
# on flexible accuracy the floors would read 85.5 and 58.5.


def test_results_markdown(tmp_path):
    out = tmp_path / "report"
    written = write_report(write_metrics(tmp_path / "metrics"), out, TASKS, METHODS, TARGETS)
    assert written == report_files(out, TASKS)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted([
        "results.md", "metrics.json", "plots/accuracy_arith.csv", "plots/accuracy_arith.png",
        "plots/accuracy_choice.csv", "plots/accuracy_choice.png", "plots/length_arith.csv", "plots/length_arith.png",
        "plots/length_choice.csv", "plots/length_choice.png"])
    assert (out / "results.md").read_text() == EXPECTED_MD


def test_metrics_json_and_plot_data(tmp_path):
    out = tmp_path / "report"
    write_report(write_metrics(tmp_path / "metrics"), out, TASKS, METHODS, TARGETS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arith"]["dense"] == {
        "sparsity": 0.0, "greedy_accuracy_strict": 0.9, "greedy_accuracy_flexible": 0.95,
        "greedy_mean_completion_tokens": 40.0, "greedy_truncation_rate": 0.0,
        "sampled_accuracy_strict": 0.85, "sampled_accuracy_flexible": 0.9,
        "sampled_mean_completion_tokens": 41.0, "sampled_truncation_rate": 0.0, "nll": 0.5}
    assert metrics["choice"]["gisp"]["0.40"] == {
        "sparsity": 0.4, "greedy_accuracy_strict": 0.5, "greedy_accuracy_flexible": 0.55,
        "greedy_mean_completion_tokens": 35.0, "greedy_truncation_rate": 0.04,
        "sampled_accuracy_strict": 0.45, "sampled_accuracy_flexible": 0.5,
        "sampled_mean_completion_tokens": 36.0, "sampled_truncation_rate": 0.02, "nll": 0.8}
    assert (metrics["choice"]["magnitude"]["0.20"]["greedy_accuracy_strict"],
            metrics["choice"]["magnitude"]["0.20"]["greedy_accuracy_flexible"]) == (0.3, 0.7)
    assert {task: {m: sorted(v) for m, v in methods.items() if m != "dense"} for task, methods in metrics.items()} == {
        task: {m: ["0.20", "0.40"] for m in METHODS} for task in TASKS}
    assert (out / "plots" / "accuracy_arith.csv").read_text() == (
        "sparsity,dense,resp,gisp,magnitude\n"
        "0.2,90.0,88.0,85.0,70.0\n"
        "0.4,90.0,80.0,60.0,20.0\n")
    assert (out / "plots" / "accuracy_choice.csv").read_text() == (  # strict: magnitude 30, not its flexible 70
        "sparsity,dense,resp,gisp,magnitude\n"
        "0.2,60.0,58.0,59.0,30.0\n"
        "0.4,60.0,55.0,50.0,50.0\n")
    assert (out / "plots" / "length_choice.csv").read_text() == (
        "sparsity,dense,resp,gisp,magnitude\n"
        "0.2,30.0,31.0,32.0,60.0\n"
        "0.4,30.0,33.0,35.0,90.0\n")


def test_output_is_reproducible(tmp_path):
    metrics_dir = write_metrics(tmp_path / "metrics")
    first, second = tmp_path / "first", tmp_path / "second"
    write_report(metrics_dir, first, TASKS, METHODS, TARGETS)
    write_report(metrics_dir, second, TASKS, METHODS, TARGETS)
    for path in report_files(first, TASKS):
        twin = second / path.relative_to(first)
        assert path.read_bytes() == twin.read_bytes(), path.name
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_MAGIC)
            assert b"Software" not in path.read_bytes()
    text = (first / "metrics.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert sorted(p.name for p in (first / "plots").iterdir() if p.name.endswith(".tmp")) == []


def test_strongest_baseline_needs_resp_and_another_method(tmp_path):
    out = tmp_path / "report"
    write_report(write_metrics(tmp_path / "metrics"), out, ["arith"], ["gisp"], TARGETS)
    text = (out / "results.md").read_text()
    assert "Not computed: the report needs resp and at least one other method.\n" in text
    assert "| gisp | 0.40 |\n" in text


def test_missing_metrics_file(tmp_path):
    metrics_dir = write_metrics(tmp_path / "metrics")
    (metrics_dir / "choice" / "gisp.json").unlink()
    missing = metrics_dir / "choice" / "gisp.json"
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {missing} not found: evaluate gisp on choice first "
            f"(`resp evaluate --task choice ... --out {missing}`, or `dvc repro`)") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS)
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
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS)
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
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS)
    assert not (tmp_path / "report").exists()


def test_missing_target_and_wrong_file(tmp_path):
    numbers = json.loads(json.dumps(NUMBERS))
    del numbers["arith"]["resp"]["0.40"]
    metrics_dir = write_metrics(tmp_path / "metrics", numbers)
    path = metrics_dir / "arith" / "resp.json"
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {path} has no result at sparsity 0.40: re-run `resp evaluate` with the masks of every "
            "target in prune.targets") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS)
    (metrics_dir / "arith" / "gisp.json").write_text(path.read_text())
    gisp = metrics_dir / "arith" / "gisp.json"
    with pytest.raises(ReportError, match="^" + re.escape(
            f"metrics file {gisp} holds 'resp' on 'arith', not 'gisp' on 'arith': re-run `resp evaluate` with --out {gisp}") + "$"):
        write_report(metrics_dir, tmp_path / "report", TASKS, ["gisp"], TARGETS)


def test_cli_report(tmp_path):
    metrics_dir = write_metrics(tmp_path / "metrics")
    out = tmp_path / "report"
    args = ["report", "--metrics-dir", str(metrics_dir), "--out", str(out), "--params", str(ROOT / "params.yaml"),
            "--set", "run.tasks=[arith,choice]", "--set", "run.methods=[resp,gisp,magnitude]",
            "--set", "prune.targets=[0.2,0.4]", "--set", "prune.milestones=[0.1,0.2]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 10 files to {out} (table: {out / 'results.md'})\n"
    assert (out / "results.md").read_text() == EXPECTED_MD
    (metrics_dir / "arith" / "dense.json").unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: metrics file {metrics_dir / 'arith' / 'dense.json'} not found: ")


def test_rows_show_the_label_the_masks_state(tmp_path):
    """A method whose masks carry a label (FLAP without bias compensation) is shown under it."""
    metrics_dir = write_metrics(tmp_path / "metrics")
    for task in TASKS:
        path = metrics_dir / task / "magnitude.json"
        data = json.loads(path.read_text())
        for entry in data["results"].values():
            entry["label"] = "magnitude (no bias)"
        path.write_text(json.dumps(data))
    write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS)
    text = (tmp_path / "report" / "results.md").read_text()
    assert "\n| magnitude (no bias) | " in text and "\n| magnitude | " not in text
    assert "\n| resp | " in text   # methods without a label keep their name


def test_a_run_without_sampled_pass_reports_greedy_only(tmp_path):
    """evaluation.sample_seeds: [] skips the sampled pass: cells say "-", the protocol says so."""
    metrics_dir = write_metrics(tmp_path / "metrics")
    for path in metrics_dir.glob("*/*.json"):
        data = json.loads(path.read_text())
        data["evaluation"]["sample_seeds"] = []
        for entry in data["results"].values():
            entry["sampled"] = None
        path.write_text(json.dumps(data))
    write_report(metrics_dir, tmp_path / "report", TASKS, METHODS, TARGETS)
    text = (tmp_path / "report" / "results.md").read_text()
    assert "no sampled pass (evaluation.sample_seeds is empty)" in text
    assert "| dense | 90.0 / - | 90.0 / - |" in text
    flat = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert flat["arith"]["resp"]["0.20"]["sampled_accuracy_strict"] is None
