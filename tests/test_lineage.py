"""resp.lineage: the joins between artifacts end in one line naming the file, what it was made from, and the fix."""

import json
from types import SimpleNamespace

import pytest
from conftest import make_qwen3

from resp.lineage import (LineageError, check_mask_file, check_trace_records, export_digest, metrics_digests,
                          read_mask)
from resp.masks import Mask
from resp.structures import structures_for


def _trace(prompt_id: str, completion: list) -> SimpleNamespace:
    return SimpleNamespace(prompt_id=prompt_id, prompt_ids=[1, 2], completion_ids=completion)


def test_trace_records_must_be_what_the_manifest_says():
    good = SimpleNamespace(manifest={"n": 2}, traces=[_trace("a", [3]), _trace("b", [4])])
    check_trace_records(good, "t.jsonl")
    for traces, manifest, message in [
        ([_trace("a", [3]), _trace("a", [3])], {}, "trace set t.jsonl record 2 repeats an earlier record (prompt a)"),
        ([_trace("a", [3])], {"n": 2}, "trace set t.jsonl holds 1 records but its manifest says 2"),
        ([_trace("a", ["3"])], {}, "trace set t.jsonl record 1: completion_ids is not a list of token ids (list)"),
        ([_trace("a", [True])], {}, "record 1: completion_ids is not a list of token ids"),
    ]:
        with pytest.raises(LineageError) as info:
            check_trace_records(SimpleNamespace(manifest=manifest, traces=traces), "t.jsonl")
        assert message in str(info.value) and str(info.value).endswith("regenerate the trace set with `resp traces`")


def test_a_renamed_mask_and_a_mask_of_another_method_are_refused(tmp_path):
    s = structures_for(make_qwen3(), "query_head")
    path = Mask.dense(s).save(tmp_path / "sparsity-0.30.safetensors", {"target": 0.3, "method": "resp", "task": "arith"})
    assert check_mask_file(path, method="resp", task="arith")["target"] == 0.3
    renamed = tmp_path / "sparsity-0.50.safetensors"
    path.rename(renamed)
    path.with_name(path.name + ".json").rename(renamed.with_name(renamed.name + ".json"))
    with pytest.raises(LineageError, match=r"was made for target 0.3, not the 0.50 its file name says: it was renamed"):
        check_mask_file(renamed)
    with pytest.raises(LineageError, match=r"was made by resp on arith, not method 'gisp': pass --method resp"):
        check_mask_file(renamed, target=0.3, method="gisp")


def test_a_truncated_mask_is_one_line(tmp_path):
    path = tmp_path / "sparsity-0.30.safetensors"
    path.write_bytes(b"not a safetensors file")
    path.with_name(path.name + ".json").write_text("{}")
    with pytest.raises(LineageError, match=r"cannot be read \(.*\): it is truncated or corrupt; re-run `resp prune`"):
        read_mask(path)


def test_metrics_and_exports_name_the_masks_they_were_made_from(tmp_path):
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"results": {"dense": {}, "0.30": {"mask_digest": "abc"}, "0.50": {}}}))
    assert metrics_digests(metrics) == {0.3: "abc", 0.5: None}
    metrics.write_text("[]")
    with pytest.raises(LineageError, match=r"metrics file .* cannot be read \(TypeError: .*\): re-run `resp evaluate`"):
        metrics_digests(metrics)
    (tmp_path / "export").mkdir()
    assert export_digest(tmp_path / "export") is None
    (tmp_path / "export" / "resp_manifest.json").write_text(json.dumps({"mask_digest": "def"}))
    assert export_digest(tmp_path / "export") == "def"
