"""benchmarks/gpu_check.py --smoke on CPU: the prepared GPU check runs end to end on a small config,
its quality checks hold where they must (float32 masks equal, hf_static's completions the loop's,
full and chunked losses equal), it writes a rates file resp cost reads, and it never writes smoke
numbers over the committed GPU results. (hf_compiled is left out here: inductor takes minutes on CPU.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from resp.cost import load_rates

ROOT = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_measures_and_checks(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    gpu_check().main(["--smoke", "--gen-backends", "hf", "hf_static", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["smoke"] and "failed" not in report
    quality = report["quality"]
    assert quality["generation"] == {"hf/greedy_vs_cpu": 1.0, "hf_static/greedy": 1.0, "hf_static/sampled": 1.0}
    assert quality["masks"]["cpu/float32/chunked"]["equal"] and quality["masks"]["cpu/float32/full"]["equal"]
    # on CPU the device rows are CPU rows: bfloat16 masks need not equal the float32 ones
    assert set(quality["masks"]) == {f"cpu/{d}/{loss}" for d in ("float32", "bfloat16") for loss in ("full", "chunked")}
    rows = {(r["loss"], r["batch_size"]): r for r in report["scoring"]}
    assert set(rows) == {(loss, b) for loss in ("full", "chunked") for b in (1, 2)}
    for b in (1, 2):
        assert rows["chunked", b]["mean_loss"] == pytest.approx(rows["full", b]["mean_loss"], rel=1e-6)
        assert rows["chunked", b]["predicted_peak_bytes"] < rows["full", b]["predicted_peak_bytes"]
    backends = {r["backend"]: r for r in report["generation_backends"]}
    assert set(backends) == {"hf", "hf_static"} and backends["hf_static"]["rows_equal_to_hf"] == 1.0
    assert report["generation"] == max(backends.values(), key=lambda r: r["new_tok_s"])
    rates = load_rates(tmp_path / "gpu_check-rates.json")
    assert rates.generate_tokens_per_s == report["generation"]["new_tok_s"]
    assert rates.score_tokens_per_s == max(r["all_tok_s"] for r in report["scoring"])


def test_smoke_refuses_to_overwrite_the_committed_results(capsys):
    with pytest.raises(SystemExit):
        gpu_check().parse_args(["--smoke", "--out", str(ROOT / "benchmarks" / "results" / "gpu_check.json")])
    assert "--smoke would overwrite the committed GPU results" in capsys.readouterr().err
    assert gpu_check().parse_args(["--smoke"]).out != ROOT / "benchmarks" / "results" / "gpu_check.json"
