"""params.yaml and dvc.yaml agree on the declared methods (the DVC lists are literal, so a test keeps them honest)."""

from pathlib import Path

import pytest
import yaml

from resp.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent


def test_dvc_prune_stages_match_the_declared_calibration():
    params = load_params(ROOT / "params.yaml")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    self_stage = stages["prune_self"]["matrix"]["method"]
    other_stage = stages["prune_baseline"]["matrix"]["method"]
    assert set(self_stage) == {m for m in params.run.methods if params.methods[m].calibration == "self"}
    assert set(other_stage) == {m for m in params.run.methods if params.methods[m].calibration != "self"}
    assert "--traces" in stages["prune_self"]["cmd"] and "--traces" not in stages["prune_baseline"]["cmd"]
    for name in ("prune_self", "prune_baseline"):
        assert "methods.${item.method}" in stages[name]["params"]
    assert "resp/baselines.py" in stages["prune_baseline"]["deps"] and "baselines" in stages["prune_baseline"]["params"]


@pytest.mark.parametrize("declaration, message", [
    ("{scorer: magnitude, calibration: gold}", "scorer magnitude reads no calibration data: set calibration: none"),
    ("{scorer: flap, calibration: none}", "scorer flap needs calibration data: set calibration to self, gold or generic"),
    ("{scorer: wanda_sp, calibration: self, regenerate: true}", "regenerate needs the iterative taylor scorer"),
    ("{scorer: taylor, calibration: gold, regenerate: true}", "regenerate needs the iterative taylor scorer"),
    ("{scorer: obs, calibration: gold}", "methods.x.scorer"),
    ("{scorer: taylor, calibration: c4}", "methods.x.calibration"),
])
def test_a_method_declaration_a_scorer_cannot_use_is_one_line(declaration, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(")) as info:
        load_params(ROOT / "params.yaml", [f"methods.x={declaration}"])
    assert "\n" not in str(info.value)


def test_run_methods_must_be_declared():
    with pytest.raises(ParamsError, match=r"run.methods names undeclared methods \['sparsegpt'\]"):
        load_params(ROOT / "params.yaml", ["run.methods=[resp, sparsegpt]"])
