"""The Python API (`from resp import ...`, resp/api.py) on the tiny model: make_traces -> prune ->
export -> evaluate write the same bytes as the library entry points they wrap; bad arguments end
in one line before any model loads; `import resp` imports neither torch nor transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import resp
from resp.artifacts import dir_digest, manifest_path
from resp.evaluation import evaluate_masks
from resp.checkpoints import export_mask_file
from resp.models import load_model, model_identity
from resp.config import declared_method
from resp.recipe import make_traces as recipe_make_traces
from resp.recipe import prune as recipe_prune

ROOT = Path(__file__).resolve().parents[1]


def same_file(a: Path, b: Path, replace: tuple[str, str] | None = None) -> bool:
    """Equal bytes of a file and of its manifest (if any), after `replace` in the manifests."""
    if a.read_bytes() != b.read_bytes():
        return False
    if not manifest_path(a).is_file():
        return not manifest_path(b).is_file()
    ma, mb = manifest_path(a).read_text(), manifest_path(b).read_text()
    return (ma.replace(*replace) if replace else ma) == mb


def test_each_call_writes_what_the_library_writes(tiny_params, tmp_path):
    p, api, lib = tiny_params, tmp_path / "api", tmp_path / "lib"
    params_file = tmp_path / "params.yaml"  # a path plus overrides gives the same params as the loaded object
    params_file.write_text(yaml.safe_dump(p.model_copy(update={"generation": p.generation.model_copy(
        update={"seed": 5})}).model_dump()))

    traces = resp.make_traces(params_file, "arith", api / "dense.jsonl", overrides=["generation.seed=0"])
    assert traces == api / "dense.jsonl"
    recipe_make_traces(p, "arith", p.tasks["arith"].calibration_split, None, lib / "dense.jsonl")
    assert same_file(traces, lib / "dense.jsonl")
    heldout = resp.make_traces(p, "arith", api / "heldout.jsonl", split="test", limit=4)
    recipe_make_traces(p, "arith", "test", 4, lib / "heldout.jsonl")
    assert same_file(heldout, lib / "heldout.jsonl")

    masks = resp.prune(p, "arith", "resp", api / "run", dense_traces=traces)
    expected = recipe_prune(p, "arith", declared_method(p, "resp"), lib / "run", str(traces))
    assert masks == {0.1: api / "run/masks/sparsity-0.10.safetensors", 0.2: api / "run/masks/sparsity-0.20.safetensors"}
    for target in expected:   # manifests name their own run directory's regenerated traces
        assert same_file(masks[target], expected[target], replace=(str(api / "run"), str(lib / "run")))

    exported = resp.export(p, masks[0.2], "compact", api / "compact")
    assert exported == api / "compact"
    model, tokenizer = load_model(p.model.name_or_path)
    export_mask_file(model, tokenizer, model_identity(p.model.name_or_path), masks[0.2], "compact", lib / "compact",
                     p.export.channel_multiple, p.prune.attention_unit, p.prune.protected_layers)
    assert dir_digest(exported) == dir_digest(lib / "compact")
    assert json.loads((exported / "resp_manifest.json").read_text())["format"] == "compact"

    metrics = resp.evaluate(p, "arith", masks, api / "resp.json", dense=True, heldout=heldout)  # method from the masks
    assert metrics == api / "resp.json"
    evaluate_masks(p, "arith", "resp", masks, heldout, lib / "resp.json", include_dense=True)
    assert metrics.read_bytes() == (lib / "resp.json").read_bytes()
    assert list(json.loads(metrics.read_text())["results"]) == ["dense", "0.10", "0.20"]


def test_evaluate_takes_masks_as_returned_as_a_directory_or_as_a_run(tmp_path, tiny_params, monkeypatch):
    """What evaluate hands `evaluate_masks`: the same {target: path} from prune's dict, masks/, the run directory."""
    from resp.masks import Mask
    from resp.structures import structures_for

    model, _ = load_model(tiny_params.model.name_or_path)
    run = tmp_path / "run"
    written = {t: Mask.dense(structures_for(model, "query_head", None)).save(
        run / "masks" / f"sparsity-{t:.2f}.safetensors", {"method": "magnitude"}) for t in (0.1, 0.2)}
    calls = []
    monkeypatch.setattr("resp.evaluation.evaluate_masks", lambda p, task, method, paths, heldout, out, include_dense:
                        calls.append((method, paths, heldout, include_dense)) or Path(out))
    checked = []   # the held-out traces' lineage is checked before evaluation (the check itself: tests/bad_inputs.py)
    monkeypatch.setattr("resp.lineage.check_heldout_traces", lambda path, *how: checked.append(path))
    for masks in (written, {"0.10": written[0.1], "0.20": written[0.2]}, run / "masks", run, str(run)):
        assert resp.evaluate(tiny_params, "arith", masks, tmp_path / "m.json", heldout="h.jsonl") == tmp_path / "m.json"
    assert calls == [("magnitude", written, "h.jsonl", False)] * 5
    resp.evaluate(tiny_params, "arith", None, tmp_path / "d.json", dense=True, heldout="h.jsonl")
    assert calls[-1] == ("dense", {}, "h.jsonl", True) and checked == ["h.jsonl"] * 6


@pytest.fixture
def one_mask(tmp_path, tiny_params):
    from resp.masks import Mask
    from resp.structures import structures_for

    model, _ = load_model(tiny_params.model.name_or_path)
    path = tmp_path / "masks" / "sparsity-0.10.safetensors"
    return Mask.dense(structures_for(model, "query_head", None)).save(path, {"method": "resp"})


BAD = [
    (lambda p, d, m: resp.make_traces(3, "arith", d / "t.jsonl"),
     "params is a int: pass a Params (resp.load_params) or the path of a params.yaml"),
    (lambda p, d, m: resp.make_traces(p, "arith", d / "t.jsonl", overrides=["model.device=cpu"]),
     "overrides go with a params path: pass params='params.yaml' with them, or load once with "
     "resp.load_params(path, overrides) and pass that"),
    (lambda p, d, m: resp.make_traces(ROOT / "params.yaml", "nope", d / "t.jsonl", overrides=["model.device=cpu"]),
     "task 'nope' is not in params.yaml tasks; defined: ['arith', 'choice', 'gsm8k', 'mathqa', 'prose']"),
    (lambda p, d, m: resp.make_traces(p, "arith", d / "t.jsonl", limit=0),
     "limit 0 is not a number of prompts: give a positive int, or None for the default"),
    (lambda p, d, m: resp.make_traces(p, "arith", d),
     "out {d} is a directory, not a file: give a file path"),
    (lambda p, d, m: resp.make_traces(ROOT / "params.yaml", "arith", d / "t.jsonl", overrides=["model.device=tpu"]),
     f"{ROOT / 'params.yaml'} is invalid: model.device: Value error, 'tpu' is not a device: use cpu, cuda, cuda:N or mps"),
    (lambda p, d, m: resp.prune(p, "arith", "nope", d / "run"),
     "method 'nope' is not declared; declare it under `methods` in params.yaml (declared: {methods})"),
    (lambda p, d, m: resp.prune(p, "arith", "resp", d / "run"),
     "method resp calibrates on the dense model's own traces: pass dense_traces=resp.make_traces(params, 'arith', OUT)"),
    (lambda p, d, m: resp.export(p, {0.1: m}, "compact", d / "x"),
     "mask is a dict of masks: export one target at a time, e.g. mask=masks[0.3]"),
    (lambda p, d, m: resp.export(p, m, "tiny", d / "x"),
     "export format 'tiny' is not one of ['compact', 'masked', 'uniform']"),
    (lambda p, d, m: resp.evaluate(p, "arith", None, d / "m.json"),
     "nothing to evaluate: pass masks, and/or dense=True for the unpruned model"),
    (lambda p, d, m: resp.evaluate(p, "arith", 0.1, d / "m.json"),
     "masks is a float: pass what prune returned ({{target: path}}), a masks directory, or None for the dense model alone"),
    (lambda p, d, m: resp.evaluate(p, "arith", {0.1: m}, d / "m.json", method="gisp"),
     "the masks were made by resp, not gisp: pass the method that made them"),
    (lambda p, d, m: resp.evaluate(p, "arith", None, d / "m.json", method="resp", dense=True),
     "method 'resp' names who made the masks: pass masks too, or no method for the dense model alone"),
    (lambda p, d, m: resp.evaluate(p, "arith", d / "empty", d / "m.json"),
     "no masks (sparsity-*.safetensors) in {d}/empty: run `resp prune` first"),
]


@pytest.mark.parametrize("call,message", BAD, ids=range(len(BAD)))
def test_a_bad_argument_is_one_line_before_any_model_loads(call, message, tiny_params, one_mask, tmp_path, monkeypatch):
    monkeypatch.setattr("resp.models.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as raised:
        call(tiny_params, tmp_path, one_mask)
    assert str(raised.value) == message.format(d=tmp_path, methods=", ".join(tiny_params.methods))


def test_import_resp_is_light_and_the_api_names_are_functions():
    """`import resp` (flows and the CLI import it first) loads no torch; the API names load on use and
    are the functions of resp.api, whatever library modules were imported before."""
    light = ("import sys, resp\nfrom resp import load_params, make_traces, prune\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), make_traces.__module__)")
    assert subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout == "[] resp.api\n"
    import resp.api
    import resp.checkpoints  # noqa: F401  the library modules of the same jobs, imported first
    import resp.evaluation  # noqa: F401
    from resp import evaluate, export

    assert export is resp.api.export and evaluate is resp.api.evaluate and resp.evaluate is evaluate
    with pytest.raises(AttributeError, match="^module 'resp' has no attribute 'nope'$"):
        resp.nope
