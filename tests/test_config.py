from pathlib import Path

import pytest

from resp.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent


SHIPPED = sorted(p for p in ROOT.glob("**/params*.yaml") if not {".venv", "data"} & set(p.relative_to(ROOT).parts))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_params_file_validates(path):
    load_params(path)


def test_overrides_apply_and_are_validated():
    p = load_params(ROOT / "params.yaml", ["prune.targets=[0.25]", "model.device=cuda"])
    assert p.prune.targets == [0.25] and p.model.device == "cuda"


def test_every_error_is_reported_at_once():
    with pytest.raises(ParamsError) as e:
        load_params(ROOT / "params.yaml", ["prune.targets=[0.2,1.2]", "prune.bogus=1", "prune.attention_unit=rows"])
    message = str(e.value)
    assert "prune.targets: Value error, sparsity 1.2 is outside [0, 1): use a fraction such as 0.4" in message
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
