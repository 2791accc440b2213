from pathlib import Path

import pytest

from resp.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent


SHIPPED = sorted(p for p in ROOT.glob("**/params*.yaml") if not {".venv", "data"} & set(p.relative_to(ROOT).parts))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_params_file_validates(path):
    load_params(path)


def test_overrides_apply_and_are_validated():
    p = load_params(ROOT / "params.yaml", ["prune.targets=[0.25]", "prune.milestones=[0.1]", "model.device=cuda"])
    assert p.prune.targets == [0.25] and p.model.device == "cuda"
    assert (p.model.trust_remote_code, p.registry.connect_timeout_s) == (False, 5)
    fast = load_params(ROOT / "params.yaml", ["generation.backend=hf_compiled", "importance.loss_chunk_tokens=4096"])
    assert (fast.generation.backend, fast.importance.loss_chunk_tokens) == ("hf_compiled", 4096)


def test_every_error_is_reported_at_once():
    with pytest.raises(ParamsError) as e:
        load_params(ROOT / "params.yaml", ["prune.targets=[0.2,1.2]", "prune.bogus=1", "prune.attention_unit=rows"])
    message = str(e.value)
    assert "prune.targets: Value error, sparsity 1.2 is outside (0, 1): use a fraction such as 0.4" in message
    assert "prune.bogus: Extra inputs are not permitted" in message
    assert "prune.attention_unit: Input should be 'query_head' or 'kv_group'" in message
    assert "\n" not in message


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ParamsError, match=r"params file .*missing.yaml not found: run from the project root or pass --params PATH"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("world: [unclosed")
    with pytest.raises(ParamsError, match=r"p.yaml is not valid YAML \(line 1: expected ',' or '\]', but got '<stream end>'\); fix the file$"):
        load_params(bad)
    with pytest.raises(ParamsError, match=r"override 'prune' must look like section.key=value"):
        load_params(ROOT / "params.yaml", ["prune"])
    with pytest.raises(ParamsError, match=r"override 'nope.key': 'nope' is not a section of params.yaml"):
        load_params(ROOT / "params.yaml", ["nope.key=1"])
    with pytest.raises(ParamsError, match=r"override 'schedule.cron=\*/5 \* \* \* \*': the value is not valid YAML; quote it"):
        load_params(ROOT / "params.yaml", ["schedule.cron=*/5 * * * *"])
    with pytest.raises(ParamsError, match=r"run.tasks/prose_task name unknown tasks \['nope'\]"):
        load_params(ROOT / "params.yaml", ["run.tasks=[nope]"])


@pytest.mark.parametrize("overrides,message", [
    (["prune.targets=[0.0,0.2]"], "prune.targets: Value error, sparsity 0.0 is outside (0, 1): use a fraction such as 0.4"),
    (["prune.targets=[0.2,0.2,0.5]"], "prune.targets: Value error, [0.2, 0.2, 0.5] repeats a value: list each sparsity once"),
    (["prune.milestones=[0.1,0.1]"], "prune.milestones: Value error, [0.1, 0.1] repeats a value: list each sparsity once"),
    (["prune.milestones=[0.3,0.1]"], "prune.milestones: Value error, [0.3, 0.1] must be sorted ascending"),
    (["prune.milestones=[0.1,0.5]"], "prune: Value error, milestones [0.5] are not below the last target 0.5: a milestone "
                                     "there never triggers (no scoring step follows the last prune); drop them"),
    (["prune.targets=[0.2,0.3]"], "prune: Value error, milestones [0.3, 0.4] are not below the last target 0.3"),
    (["registry.connect_timeout_s=11"], "registry.connect_timeout_s: Input should be less than or equal to 10"),
    (["importance.loss_chunk_tokens=0"], "importance.loss_chunk_tokens: Input should be greater than 0"),
    (["generation.backend=loop"], "generation.backend: Input should be 'hf', 'hf_static', 'hf_compiled' or 'vllm'"),
])
def test_schedule_and_knob_validation(overrides, message):
    """Issue 13: targets in (0, 1), unique and sorted; milestones unique, sorted, below the last target."""
    with pytest.raises(ParamsError) as e:
        load_params(ROOT / "params.yaml", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_params_and_empty_override_keys(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ParamsError, match=r"latin.yaml is not UTF-8 text \(byte 0xe9 at offset 5\): save it as UTF-8$"):
        load_params(latin)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n")
    with pytest.raises(ParamsError, match=r"list.yaml does not hold a mapping of sections"):
        load_params(listing)
    for item in ("=1", "prune.=1", ".steps=1"):
        with pytest.raises(ParamsError, match=rf"^override '{item}' has an empty key part before '=': write "
                                              r"section.key=value, e.g. prune.steps=10$"):
            load_params(ROOT / "params.yaml", [item])
