"""resp.stages: the stage table agrees with the functions it names; calibration sources are a table;
what the stage functions add to the composition tested in test_recipe (regeneration streams)."""

import inspect
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
