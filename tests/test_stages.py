"""resp.stages: the stage table agrees with the functions it names; calibration sources are a table;
what the stage functions add to the composition tested in test_recipe (regeneration streams)."""

import inspect
from pathlib import Path
from typing import get_args

import pytest

import resp.stages.score
from resp.config import MethodParams, declared_method
from resp.recipe import make_traces, prune
from resp.stages.calibrate import SOURCES
from resp.stages.regenerate import regeneration_seed
from resp.stages.table import STAGES, stage_of, stage_params, stage_sections
from resp.traces import TraceSet


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_declaration_names_arguments_its_function_takes(name):
    stage = STAGES[name]
    arguments = inspect.signature(stage.function).parameters
    assert stage.name == name and stage.function.__name__ == stage.code.split(":")[1]
    assert set(stage.files) | set(stage.outputs) <= set(arguments), name
    assert stage.function.__module__ == stage.module
    assert all(part in STAGES for part in stage.parts)


def test_the_stages_reading_a_method_declaration_take_the_method_value():
    """A stage whose params sections include `methods.{method}` takes the `Method` (name and declaration)
    and reads the declaration from it; the others take no method or a label (`evaluate`: "dense" too)."""
    takes = {name for name, stage in STAGES.items()
             if getattr(inspect.signature(stage.function).parameters.get("method"), "annotation", None) == "Method"}
    reads = {name for name, stage in STAGES.items() if any(s.startswith("methods.{method}") for s in stage.sections)}
    assert takes == reads == {"prune", "calibrate", "score", "regenerate", "baseline", "write_run", "heal",
                              "heal_traces"}


def test_a_stage_is_found_by_its_function():
    assert stage_of(resp.stages.score.score) is STAGES["score"]
    with pytest.raises(KeyError, match="is no stage's function"):
        stage_of(inspect.signature)


def test_a_stage_reads_the_sections_it_declares(tiny_params):
    assert stage_sections("regenerate", task="arith", method="resp") == (
        "model", "tasks.arith", "generation", "methods.resp", "export.channel_multiple",
        "scale.vllm_gpu_memory_utilization")
    assert stage_params(tiny_params, "apply") == {
        "model": tiny_params.model.model_dump(mode="json"), "importance.normalize": "paper",
        "prune.attention_unit": "query_head", "prune.protected_layers": None}


def test_every_calibration_source_has_an_entry():
    assert set(SOURCES) == set(get_args(MethodParams.model_fields["calibration"].annotation))
    assert SOURCES["none"] is None
    # only `self` reads the dense traces made beforehand
    assert [c for c in SOURCES if MethodParams(scorer="taylor" if c != "none" else "magnitude",
                                               calibration=c).reads_dense_traces] == ["self"]


def test_common_streams_reuse_the_dense_seed_and_fresh_streams_get_their_own():
    assert regeneration_seed(7, "common", "milestone-0.10") == 7
    fresh = [regeneration_seed(7, "fresh", tag) for tag in ("milestone-0.10", "milestone-0.20", "drift-step0003")]
    assert len(set(fresh)) == 3 and fresh == [regeneration_seed(7, "fresh", t) for t in
                                              ("milestone-0.10", "milestone-0.20", "drift-step0003")]
    # prompt i samples from base + i, and torch keeps a seed's low 32 bits: a fresh base and the 2**20 prompts
    # after it stay clear of the dense streams 7 .. 7 + 2**20 - 1, modulo 2**32 too
    assert all(7 + 2**20 <= f and f + 2**20 <= 7 + 2**32 for f in fresh)
    assert regeneration_seed(8, "fresh", "milestone-0.10") == fresh[0] + 1


def test_fresh_and_common_regeneration_differ_only_in_their_random_numbers(tiny_params, tmp_path):
    # the tiny random model is peaked at T=0.6: sample hotter so that different streams give different tokens
    tree = tiny_params.model_dump(mode="json")
    tree["generation"].update(temperature=1.0, top_k=0, top_p=1.0)
    tiny_params = type(tiny_params).model_validate(tree)
    dense = make_traces(tiny_params, "arith", "train", None, tmp_path / "dense.jsonl")
    prune(tiny_params, "arith", declared_method(tiny_params, "resp"), tmp_path / "fresh", str(dense))
    prune(tiny_params, "arith", declared_method(tiny_params, "resp_common"), tmp_path / "common", str(dense))
    fresh = TraceSet.load(tmp_path / "fresh" / "traces" / "milestone-0.05.jsonl")
    common = TraceSet.load(tmp_path / "common" / "traces" / "milestone-0.05.jsonl")
    assert common.manifest["sampling"]["seed"] == TraceSet.load(dense).manifest["sampling"]["seed"] == 0
    assert fresh.manifest["sampling"]["seed"] == regeneration_seed(0, "fresh", "milestone-0.05")
    assert (fresh.manifest["regeneration_stream"], common.manifest["regeneration_stream"]) == ("fresh", "common")
    # both sampled the same prompts from the same pruned model (the first step is identical): only the streams differ
    assert fresh.manifest["mask_digest"] == common.manifest["mask_digest"]
    assert [t.prompt_id for t in fresh.traces] == [t.prompt_id for t in common.traces]
    assert [t.completion_ids for t in fresh.traces] != [t.completion_ids for t in common.traces]


# ---- the score stage on torchrun workers (scale.score_nproc): one scoring path, in process or distributed

def scoring_traces(path):
    """8 traces of random tokens, three of them wrong: trace_filter correct keeps 5, the first of 2 rotating
    subsets 3 of those (t0, t3, t6: shards of 2 and 1 traces on two workers), cut to 5 completion tokens."""
    import torch

    from resp.traces import Trace

    made = []
    for i, (prompt, completion) in enumerate([(2, 3), (4, 5), (1, 2), (5, 7), (3, 3), (2, 6), (3, 1), (4, 4)]):
        ids = torch.randint(1, 300, (prompt + completion,), generator=torch.Generator().manual_seed(i)).tolist()
        made.append(Trace(f"t{i}", ids[:prompt], ids[prompt:], "", False, answer=str(i), correct=i % 3 != 1))
    TraceSet(made, {"kind": "test"}).save(path)
    return str(path)


def scoring_params(tiny_model_dir, tiny_world_dir, *extra):
    from conftest import tiny_overrides

    from resp.config import load_params

    root = Path(__file__).resolve().parent.parent
    return load_params(root / "params.yaml", tiny_overrides(tiny_model_dir, tiny_world_dir) + [
        "methods.filtered={scorer: taylor, calibration: self, trace_filter: correct}", "prune.score_subsets=2",
        "prune.score_tokens=5", "importance.batch_size=2", *extra])


@pytest.mark.parametrize("scoring", ["data_parallel", "sharded"])
def test_the_score_stage_on_two_workers_scores_as_one_process(scoring, tiny_model_dir, tiny_world_dir, tmp_path):
    """scale.score_nproc: 2 launches two gloo workers (torchrun) from the stage itself, each holding the
    model or half of it (FSDP2): the same scores as one process up to fp32 summation order (rtol 1e-5),
    the same manifest but for world_size/scoring, and the apply stage on them writes identical masks;
    both score under a mask, on the filtered traces' first subset."""
    import torch

    from resp.importance import load_scores
    from resp.masks import Mask
    from resp.stages.apply import apply
    from resp.stages.common import base_model
    from resp.stages.score import score

    one = scoring_params(tiny_model_dir, tiny_world_dir)
    two = scoring_params(tiny_model_dir, tiny_world_dir, "scale.score_nproc=2", f"scale.scoring={scoring}")
    traces, base = scoring_traces(tmp_path / "traces.jsonl"), base_model(one)
    dense = score(one, "arith", declared_method(one, "filtered"), base, None, traces, traces, str(tmp_path / "dense.safetensors"))
    mask = apply(one, base, dense, None, 0.1, str(tmp_path / "mask.safetensors"))

    run = {"task": "arith", "method": declared_method(one, "filtered"), "base": base, "mask": mask, "traces": traces, "reference": traces}
    in_process = score(one, **run, out=str(tmp_path / "one" / "scores.safetensors"))
    failed_before = tmp_path / "two" / ".scores.safetensors.workers-x1"   # an earlier failure's log: gone after success
    failed_before.mkdir(parents=True)
    (failed_before / "workers.log").write_text("resp worker error: ...\n")
    workers = score(two, **run, out=str(tmp_path / "two" / "scores.safetensors"))
    assert workers == str(tmp_path / "two" / "scores.safetensors")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["scores.safetensors", "scores.safetensors.json"]
    (a, a_manifest), (b, b_manifest) = load_scores(in_process), load_scores(workers)
    assert (a_manifest.pop("world_size"), a_manifest.pop("scoring")) == (1, "one_process")
    assert (b_manifest.pop("world_size"), b_manifest.pop("scoring")) == (2, scoring)
    assert a_manifest.pop("mean_loss") == pytest.approx(b_manifest.pop("mean_loss"), rel=1e-6)
    assert a_manifest == b_manifest and (a.n_samples, b.n_samples, a_manifest["used_traces"]) == (3, 3, 5)
    assert a.n_tokens == b.n_tokens and a_manifest["mask_digest"] == Mask.load(mask)[0].digest()
    assert torch.allclose(a.attention, b.attention, rtol=1e-5, atol=1e-12)
    assert torch.allclose(a.channels, b.channels, rtol=1e-5, atol=1e-12)
    for target in (0.2, 0.4):
        masks = [Mask.load(apply(one, base, scores, mask, target, str(tmp_path / f"{name}-{target}.safetensors")))[0]
                 for name, scores in (("one", in_process), ("two", workers))]
        assert masks[0].digest() == masks[1].digest()


@pytest.mark.parametrize("overrides, message", [
    (["scale.score_nproc=2"], ("scale.score_nproc is 2 but this machine has 1 CPU core(s) for model.device cpu: set "
                               "scale.score_nproc to at most 1 (1 scores in this process)")),
    (["scale.score_nproc=2", "model.device=cuda"], ("scale.score_nproc is 2 but this machine has 0 CUDA device(s) for "
                                                    "model.device cuda: set scale.score_nproc to at most 0")),
])
def test_more_workers_than_devices_is_one_line_before_any_work(overrides, message, tiny_model_dir, tiny_world_dir,
                                                                  tmp_path, monkeypatch):
    import os

    import torch

    from resp.distributed import DistributedError

    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    params = scoring_params(tiny_model_dir, tiny_world_dir, *overrides)
    dense = scoring_traces(tmp_path / "dense.jsonl")
    with pytest.raises(DistributedError) as info:
        prune(params, "arith", declared_method(params, "resp"), tmp_path / "run", dense)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()   # refused before the run directory or any trace was made


@pytest.mark.parametrize("overrides, message", [
    (["importance.per_sample_abs=true"], ("scale.scoring: sharded scores in mean mode only: set "
                                          "importance.per_sample_abs: false, or scale.scoring: data_parallel")),
    (["importance.loss_chunk_tokens=4"], ("scale.scoring: sharded computes the loss in the model's own forward: set "
                                          "importance.loss_chunk_tokens: null, or scale.scoring: data_parallel")),
])
def test_what_sharded_workers_cannot_score_is_one_line_before_launching(overrides, message, tiny_model_dir,
                                                                         tiny_world_dir, tmp_path):
    from resp.distributed import DistributedError
    from resp.stages.common import base_model
    from resp.stages.score import score

    params = scoring_params(tiny_model_dir, tiny_world_dir, "scale.score_nproc=2", "scale.scoring=sharded", *overrides)
    traces = scoring_traces(tmp_path / "traces.jsonl")
    with pytest.raises(DistributedError, match=message.replace("(", r"\(")):
        score(params, "arith", declared_method(params, "resp"), base_model(params), None, traces, traces, str(tmp_path / "s.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces.jsonl", "traces.jsonl.json"]


def test_missing_torchrun_is_one_line(tiny_model_dir, tiny_world_dir, monkeypatch):
    import importlib.util
    import sys

    from resp.distributed import DistributedError, check_launch

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch.distributed.run"
                        else find_spec(name, *a))
    with pytest.raises(DistributedError) as info:
        check_launch(scoring_params(tiny_model_dir, tiny_world_dir, "scale.score_nproc=2"))
    assert str(info.value) == (f"torchrun (torch.distributed.run) is not available to {sys.executable}: install a torch "
                               "build with distributed support, or set scale.score_nproc: 1")
    check_launch(scoring_params(tiny_model_dir, tiny_world_dir))   # one process needs no torchrun


def test_a_failed_worker_is_one_line_naming_its_log(tiny_model_dir, tiny_world_dir, tmp_path):
    from resp.distributed import DistributedError
    from resp.stages.common import base_model
    from resp.stages.score import score

    params = scoring_params(tiny_model_dir, tiny_world_dir, "scale.score_nproc=2")
    traces = scoring_traces(tmp_path / "traces.jsonl")
    (tmp_path / "mask.safetensors").write_bytes(b"not a mask")
    out = tmp_path / "steps" / "scores.safetensors"
    with pytest.raises(DistributedError) as info:
        score(params, "arith", declared_method(params, "resp"), base_model(params), str(tmp_path / "mask.safetensors"), traces, traces, str(out))
    [workdir] = (tmp_path / "steps").iterdir()    # kept for the log; nothing else written
    assert workdir.name.startswith(".scores.safetensors.workers-")
    text = str(info.value)
    assert text.startswith("resp scoring failed on 2 torchrun workers (exit 1): ") and "\n" not in text
    assert text.endswith(f"; full log: {workdir / 'workers.log'}") and "resp worker error" in (workdir / "workers.log").read_text()
