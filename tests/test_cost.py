"""resp.cost and the cheaper schedule options: the schedule's scoring passes (real schedule with fake
steps, against the cost model's count), rotating subsets and token caps, counted cost in a real
run's summary (byte-identical on rerun, wall seconds beside the run), predictions by hand, rates
checks, `resp cost`, and the options' validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_qwen3
from test_schedule import Fake, run
from typer.testing import CliRunner

from resp.cli import app
from resp.config import ParamsError, declared_method, load_params
from resp.cost import (CostError, Rates, check_rates, generation_spent, load_rates, matmul_params, predict_run,
                       rates_from_gpu_check, schedule_passes)
from resp.memory import load_config
from resp.schedule import ScheduleConfig, scheduled_subset
from resp.structures import structures_for
from resp.traces import Trace, TraceSet

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"model_type": "qwen3", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 3, "max_position_embeddings": 16,
         "tie_word_embeddings": False}


def test_score_every_reuses_scores_and_rescoring_after_regeneration(tmp_path):
    s = structures_for(make_qwen3(), "query_head", None)
    fake = Fake(s, tmp_path)
    cfg = ScheduleConfig([0.2, 0.3, 0.4], 8, [0.1, 0.2, 0.3], False, score_every=3)
    st = run(tmp_path, fake, s, cfg)
    scored = [e["step"] for e in st.log if "reused_scores" not in e]
    # step 1 scores; regenerations before steps 3, 5 and 7 force fresh scores; 2, 4, 6, 8 re-rank the last ones
    assert [e["step"] for e in st.log if e["regenerated"]] == [3, 5, 7]
    assert scored == [1, 3, 5, 7] and fake.calls == st.scored == 4
    for e in st.log:
        if "reused_scores" in e:
            last = max(j for j in scored if j < e["step"])
            assert e["reused_scores"] == str(tmp_path / "steps" / f"step-{last:04d}" / "scores.safetensors")
    assert schedule_passes(cfg.targets, cfg.steps, cfg.milestones, cfg.score_every) == (4, 3)
    assert [x["kind"] for x in st.spent].count("score") == 4 and [x["kind"] for x in st.spent].count("regenerate") == 3
    masks = [st.saved[t] for t in cfg.targets]
    assert len(set(masks)) == 3


def test_schedule_passes_by_hand():
    # points .1 .2 .3 .4; milestone .1 crossed before step 2, .2 before step 3
    assert schedule_passes([0.2, 0.4], 4, [0.1, 0.2], 1) == (4, 2)
    assert schedule_passes([0.2, 0.4], 4, [0.1, 0.2], 3) == (3, 2)   # steps 1, 2, 3 score (regenerated), 4 reuses
    assert schedule_passes([0.2, 0.4], 4, [], 3) == (2, 0)           # steps 1 and 4
    assert schedule_passes([0.2, 0.4], 4, [], 4) == (1, 0)


def trace(i, prompt, completion):
    return Trace(f"t{i}", list(range(1, prompt + 1)), list(range(1, completion + 1)), "", False)


def test_rotating_subsets_and_token_cap():
    traces = [trace(i, 2, 5) for i in range(7)]
    assert [t.prompt_id for t in scheduled_subset(traces, 0, 3, None)] == ["t0", "t3", "t6"]
    assert [t.prompt_id for t in scheduled_subset(traces, 4, 3, None)] == ["t1", "t4"]
    assert scheduled_subset(traces, 5, 1, None) == traces
    capped = scheduled_subset(traces, 2, 3, 3)
    assert [(t.prompt_id, t.prompt_ids, t.completion_ids) for t in capped] == [("t2", [1, 2], [1, 2, 3]),
                                                                               ("t5", [1, 2], [1, 2, 3])]
    assert traces[2].completion_ids == [1, 2, 3, 4, 5]  # the trace set itself is untouched


def test_run_summary_counts_what_was_spent(tiny_params, tmp_path):
    from resp.artifacts import read_manifest
    from resp.models import load_model
    from resp.recipe import make_traces, prune

    tiny_dense_traces = make_traces(tiny_params, "arith", "train", None, tmp_path / "dense.jsonl")

    params = load_params(ROOT / "params.yaml", [])  # the options validate in the repo's params
    assert (params.prune.score_every, params.prune.score_subsets, params.prune.score_tokens) == (1, 1, None)
    p = tiny_params.model_copy(update={"prune": tiny_params.prune.model_copy(
        update={"score_every": 2, "score_subsets": 2, "score_tokens": 5})})
    prune(p, "arith", declared_method(p, "resp"), tmp_path / "run", dense_traces=str(tiny_dense_traces))
    summary_bytes = (tmp_path / "run" / "summary.json").read_bytes()
    cost = json.loads(summary_bytes)["cost"]
    score_files = sorted((tmp_path / "run" / "steps").rglob("scores*.safetensors"))
    assert cost["score"]["passes"] == len(score_files) == schedule_passes(
        p.prune.targets, p.prune.steps, p.prune.milestones, 2)[0]
    dense = TraceSet.load(tiny_dense_traces).traces
    first = read_manifest(tmp_path / "run" / "steps" / "step-0001" / "scores.safetensors")
    expected = scheduled_subset(dense, 0, 2, 5)
    assert first["part"] == 0 and first["spent"]["traces"] == len(expected) == 3
    assert first["spent"]["tokens"] == sum(len(t.prompt_ids) + min(len(t.completion_ids), 5) for t in dense[0::2])
    assert first["spent"]["backward_passes"] == 1  # 3 traces, importance.batch_size 4
    model, _ = load_model(p.model.name_or_path)
    P = matmul_params(model)
    assert P == sum(x.numel() for x in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert cost["score"]["tokens"] == sum(read_manifest(f)["spent"]["tokens"] for f in score_files)
    regenerated = sorted((tmp_path / "run" / "traces").glob("milestone-*.jsonl"))
    assert cost["regenerate"]["passes"] == len(regenerated) == 2
    assert cost["regenerate"]["tokens_generated"] == sum(generation_spent(f, P)["tokens_generated"] for f in regenerated)
    assert cost["regenerate"]["flops"] == 2 * P * (cost["regenerate"]["prompt_tokens"] + cost["regenerate"]["tokens_generated"])
    wall = json.loads((tmp_path / "run.wall.json").read_text())
    assert set(wall["by_step"]) >= {"calibrate", "score", "apply", "regenerate", "write_run"}
    assert not list((tmp_path / "run").rglob("*wall*"))

    # rerun: same bytes
    prune(p, "arith", declared_method(p, "resp"), tmp_path / "run", dense_traces=str(tiny_dense_traces))
    assert (tmp_path / "run" / "summary.json").read_bytes() == summary_bytes


RATES = Rates(device="GPU-X", model={**{k: SHAPE[k] for k in SHAPE if k not in ("head_dim", "max_position_embeddings",
                                                                               "tie_word_embeddings")}, "parameters": 242},
              dtype="bfloat16", score_tokens_per_s=100.0, generate_tokens_per_s=10.0, score_batch_size=4,
              generate_batch_size=16, source="test")


def test_prediction_by_hand(tiny_params):
    p = tiny_params.model_copy(update={"prune": tiny_params.prune.model_copy(update={
        "steps": 4, "targets": [0.2, 0.4], "milestones": [0.1, 0.2], "score_every": 3, "score_subsets": 2,
        "score_tokens": 8})})
    pred = predict_run(p, "resp", 10, 5, 20, RATES, (1000, 600))
    assert (pred.scoring_passes, pred.regenerations) == (3, 2)
    assert pred.score_tokens == 3 * 5 * (5 + 8) == 195              # 10 prompts / 2 subsets, 8 of 20 tokens
    assert pred.generated_tokens == 3 * 10 * 20 == 600              # dense traces + 2 regenerations
    assert pred.score_seconds == pytest.approx(1.95) and pred.generate_seconds == pytest.approx(60.0)
    assert pred.score_flops == 195 * (2 * 1000 + 2 * 1000 + 2 * 600)  # forward, input grads, scored weight grads
    assert pred.generate_flops == 2 * 1000 * (600 + 3 * 10 * 5)
    with pytest.raises(CostError, match="one-shot wanda_sp baseline"):
        predict_run(p, "wanda_sp", 10, 5, 20, RATES, (1000, 600))
    with pytest.raises(CostError, match="regenerates on drift or branches at milestones"):
        predict_run(p, "resp_drift", 10, 5, 20, RATES, (1000, 600))


def test_rates_from_another_device_or_model_are_refused(tmp_path):
    config = load_config(SHAPE)
    check_rates(RATES, config, 242, None)
    check_rates(RATES, config, 242, "GPU-X")
    with pytest.raises(CostError, match="measured on 'GPU-X', not on 'GPU-Y'"):
        check_rates(RATES, config, 242, "GPU-Y")
    bigger = load_config({**SHAPE, "hidden_size": 8})
    with pytest.raises(CostError, match=r"not on this config's .* \(hidden_size 8\): measure this model's rates"):
        check_rates(RATES, bigger, 500, None)
    path = RATES.save(tmp_path / "rates.json")
    assert load_rates(path) == RATES
    (tmp_path / "bad.json").write_text('{"device": "x"}')
    with pytest.raises(CostError, match="is not a rates file"):
        load_rates(tmp_path / "bad.json")
    with pytest.raises(CostError, match="rates file .* not found"):
        load_rates(tmp_path / "none.json")


def test_rates_from_the_gpu_check_take_its_fastest_mean_mode_scoring():
    check = {"device": "GPU-X", "dtype": "torch.bfloat16", "parameters": 242, "torch": "t", "transformers": "v",
             "model_shape": SHAPE, "generation": {"new_tok_s": 10.0, "batch": 16},
             "scoring": [{"per_sample_abs": False, "batch_size": 1, "all_tok_s": 50.0},
                         {"per_sample_abs": False, "batch_size": 4, "all_tok_s": 100.0},
                         {"per_sample_abs": True, "batch_size": 1, "all_tok_s": 400.0}]}
    got = rates_from_gpu_check(check)
    assert (got.score_tokens_per_s, got.score_batch_size, got.generate_tokens_per_s, got.dtype) == (100.0, 4, 10.0, "bfloat16")
    assert got.model == RATES.model


def test_cli_cost_prints_the_split(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SHAPE))
    rates = RATES.save(tmp_path / "rates.json")
    args = ["cost", "--config", str(config), "--prompts", "10", "--prompt-tokens", "5", "--completion-tokens", "20",
            "--params", str(ROOT / "params.yaml"), "--set", "prune.steps=4", "--set", "prune.targets=[0.2,0.4]",
            "--set", "prune.milestones=[0.1,0.2]"]
    result = CliRunner().invoke(app, [*args, "--rates", str(rates)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line[:1].isalpha()}
    # 4 passes x 10 x 25 tokens at 100/s = 10 s; 3 x 10 x 20 tokens at 10/s = 60 s
    assert rows["scoring"][1:3] == ["4", "1000"] and rows["scoring"][5] == "10.0"
    assert rows["generation"][1:3] == ["3", "600"] and rows["generation"][5] == "60.0"
    assert rows["total"][3] == "70.0"
    same = CliRunner().invoke(app, [*args, "--score-tok-s", "100", "--generate-tok-s", "10"])
    assert same.exit_code == 0 and same.output.splitlines()[2:] == result.output.splitlines()[2:]
    neither = CliRunner().invoke(app, args)
    assert neither.exit_code == 2 and "error: give either --rates FILE or both --score-tok-s and --generate-tok-s" in neither.output
    other = CliRunner().invoke(app, [*args, "--rates", str(rates), "--gpu", "GPU-Y"])
    assert other.exit_code == 2 and "error: the rates were measured on 'GPU-X', not on 'GPU-Y'" in other.output


def test_schedule_options_that_leave_targets_unreachable_are_refused():
    with pytest.raises(ParamsError, match=r"prune.score_subsets \(40\) exceeds calibration.num_prompts \(32\)"):
        load_params(ROOT / "params.yaml", ["prune.score_subsets=40"])
    with pytest.raises(ParamsError, match=r"score_every \(11\) exceeds steps \(10\)"):
        load_params(ROOT / "params.yaml", ["prune.score_every=11"])
    with pytest.raises(ParamsError, match="score_tokens: Input should be greater than 0"):
        load_params(ROOT / "params.yaml", ["prune.score_tokens=0"])
