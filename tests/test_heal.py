"""Healing (resp.healing): pruned units stay zero, the loss falls, runs are reproducible and resumable
after kill -9, healed models export compactly, and bad input ends in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resp.config import HealParams, ModelParams, ParamsError, declared_method, load_params
from resp.healing import HealError, completion_loss, heal, healed_mask, keep_tensors, load_healed
from resp.masks import Mask
from resp.models import load_model, model_identity
from resp.structures import structures_for
from resp.traces import Trace, TraceSet, decode_only_batches

ROOT = Path(__file__).resolve().parent.parent


def heal_params(**overrides) -> HealParams:
    values = dict(steps=6, lr=0.01, schedule="cosine", warmup_steps=1, batch_size=4, loss="kl", mode="full",
                  lora_rank=2, lora_alpha=4.0, weight_decay=0.0, max_grad_norm=1.0, num_prompts=8, seed=0,
                  checkpoint_every=2)
    return HealParams(**{**values, **overrides})


def model_params(model_dir) -> ModelParams:
    return ModelParams(name_or_path=str(model_dir), revision=None, dtype="float32", device="cpu")


def write_traces(path: Path, key: str, task: str = "arith", split: str = "train", n: int = 8, seed: int = 0) -> Path:
    """Dense-model traces as `resp traces` records them (random token ids stand in for text)."""
    g = torch.Generator().manual_seed(seed)
    traces = [Trace(f"{split}-{i}", torch.randint(5, 290, (6,), generator=g).tolist(),
                    torch.randint(5, 290, (10 + i,), generator=g).tolist(), "", False) for i in range(n)]
    TraceSet(traces, {"task": task, "split": split, "model": {"key": key}, "mask_digest": None}).save(path)
    return path


def write_mask(path: Path, model_dir, key: str, heads_kept: int = 2, channels_kept: int = 20) -> Path:
    """A mask of layers 1 and 2 (layer 3 is protected, layer 0 left whole) as `resp prune` writes one."""
    model, _ = load_model(str(model_dir), None, "float32", "cpu")
    s = structures_for(model, "query_head", None)
    mask = Mask.dense(s)
    for layer in (1, 2):
        mask.heads[layer, heads_kept:] = False
        mask.channels[layer, channels_kept:] = False
    mask.save(path, {"model": {"key": key}, "attention_unit": "query_head", "protected_layers": list(s.protected),
                     "method": "resp", "target": 0.3})
    return path


@pytest.fixture
def inputs(tmp_path, tiny_model_dir):
    key = model_identity(str(tiny_model_dir)).key
    return {"key": key, "mask": write_mask(tmp_path / "mask.safetensors", tiny_model_dir, key),
            "traces": write_traces(tmp_path / "heal.jsonl", key), "model": model_params(tiny_model_dir)}


def run_heal(inputs, out: Path, **overrides) -> Path:
    return heal(heal_params(**overrides), inputs["model"], "arith", "train", inputs["mask"], [inputs["traces"]], out,
                "query_head", None, {"step": "heal", "digest": "test"})


def mean_kl(student, teacher, traces, pad_id) -> float:
    batch = next(decode_only_batches(traces, len(traces), pad_id))
    with torch.no_grad():
        args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return float(completion_loss(student(**args).logits, batch["labels"], "kl", teacher(**args).logits))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_pruned_units_stay_zero_and_kl_falls(inputs, tmp_path, tiny_model_dir, mode):
    from resp.masks import apply_mask

    out = run_heal(inputs, tmp_path / "healed", mode=mode, steps=8, lr=3e-4 if mode == "full" else 3e-3)
    healed, tokenizer, mask_path, manifest = load_healed(out)
    mask, _ = Mask.load(mask_path)
    s = structures_for(healed, "query_head", None)
    teacher, _ = load_model(str(tiny_model_dir), None, "float32", "cpu")
    unhealed, _ = load_model(str(tiny_model_dir), None, "float32", "cpu")
    apply_mask(unhealed, mask, s)
    keep = keep_tensors(healed, mask, s)
    params = dict(healed.named_parameters())
    before = dict(unhealed.named_parameters())
    pruned = sum(int((~k).sum()) for k in keep.values())
    assert pruned > 0
    for name, k in keep.items():
        assert torch.equal(params[name][~k], torch.zeros(int((~k).sum()))), name
    changed = [n for n, k in keep.items() if not torch.equal(params[n][k], before[n][k])]
    assert changed, "healing changed no kept weight"
    traces = TraceSet.load(inputs["traces"]).traces
    assert mean_kl(healed, teacher, traces, tokenizer.pad_token_id) < mean_kl(unhealed, teacher, traces,
                                                                            tokenizer.pad_token_id)
    assert manifest["mask"]["digest"] == Mask.load(inputs["mask"])[0].digest()
    assert manifest["teacher"]["key"] == inputs["key"]
    assert manifest["traces"][0]["digest"] == TraceSet.load(inputs["traces"]).manifest["digest"]
    assert manifest["heal"]["mode"] == mode and manifest["code"] == {"step": "heal", "digest": "test"}
    assert not (tmp_path / "healed.checkpoints").exists()   # removed once the run is complete


def test_ce_loss_is_cross_entropy_on_completion_tokens_only():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[-100, -100, 3, 5]])
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([3, 5]))
    assert torch.allclose(completion_loss(logits, labels, "ce"), expected)
    assert float(completion_loss(logits, labels, "kl", logits.clone())) == pytest.approx(0.0, abs=1e-6)


def test_same_seed_same_bytes_other_seed_other_bytes(inputs, tmp_path):
    a = load_file(str(run_heal(inputs, tmp_path / "a") / "model.safetensors"))
    b = load_file(str(run_heal(inputs, tmp_path / "b") / "model.safetensors"))
    c = load_file(str(run_heal(inputs, tmp_path / "c", seed=1) / "model.safetensors"))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import resp.healing as h
    from test_heal import heal_params
    from resp.config import ModelParams
    calls = []
    original = h.completion_loss
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:   # mid-step 5: steps 1-4 are done and step 4's checkpoint is on disk
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    h.completion_loss = dying
    h.heal(heal_params(), ModelParams(name_or_path={model!r}, revision=None, dtype="float32", device="cpu"),
           "arith", "train", {mask!r}, [{traces!r}], {out!r}, "query_head", None, {{"step": "heal", "digest": "test"}})
""")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_kill_9_then_resume_equals_uninterrupted(inputs, tmp_path, mode):
    out = tmp_path / "resumed"
    script = KILLED_RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), model=inputs["model"].name_or_path,
                               mask=str(inputs["mask"]), traces=str(inputs["traces"]), out=str(out))
    if mode == "lora":
        script = script.replace("heal_params()", "heal_params(mode='lora')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not out.exists()
    assert [f.name for f in (tmp_path / "resumed.checkpoints").iterdir() if not f.name.startswith(".")] == ["step-4.pt"]
    run_heal(inputs, out, mode=mode)
    run_heal(inputs, tmp_path / "straight", mode=mode)
    for name in ("model.safetensors", "resp_heal.json"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_checkpoint_of_other_settings_is_not_resumed(inputs, tmp_path):
    import resp.healing as h

    directory = tmp_path / "healed.checkpoints"
    directory.mkdir()
    torch.save({"run_key": "another run", "step": 4, "trainable": {}, "optimizer": {}, "losses": []},
               directory / "step-4.pt")
    assert h._latest_checkpoint(directory, "this run") is None
    run_heal(inputs, tmp_path / "healed")
    assert (tmp_path / "healed" / "model.safetensors").is_file()


def test_healed_model_exports_and_evaluates_like_any_pruned_model(inputs, tmp_path, tiny_model_dir, tiny_world_dir,
                                                                   tiny_params):
    """The healed directory is a model with its own mask: `export` and `evaluate` read it unchanged."""
    from transformers import AutoModelForCausalLM

    from resp.api import evaluate, export

    healed_dir = run_heal(inputs, tmp_path / "healed")
    healed, _, mask_path, manifest = load_healed(healed_dir)
    assert mask_path == healed_dir / "mask" / "sparsity-0.30.safetensors"
    assert Mask.load(mask_path)[1]["model"]["key"] == model_identity(str(healed_dir)).key == manifest["healed_model"]["key"]
    unhealed = export(tiny_params, inputs["mask"], "compact", tmp_path / "unhealed-compact")
    compact = export(tiny_params, mask_path, "compact", tmp_path / "healed-compact", model=str(healed_dir))
    a = AutoModelForCausalLM.from_pretrained(unhealed, trust_remote_code=True)
    b = AutoModelForCausalLM.from_pretrained(compact, trust_remote_code=True)
    shapes = {n: tuple(p.shape) for n, p in a.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in b.named_parameters()}
    assert b.num_parameters() < healed.num_parameters()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    with torch.no_grad():
        assert torch.allclose(b(input_ids=ids).logits, healed(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)
    from conftest import tiny_overrides

    healed_params = load_params(ROOT / "params.yaml", [*tiny_overrides(tiny_model_dir, tiny_world_dir),
                                                       f"model.name_or_path={healed_dir}", "evaluation.nll_traces=0"])
    report = json.loads(evaluate(healed_params, "arith", healed_dir / "mask", tmp_path / "healed.json").read_text())
    assert report["method"] == "resp" and report["model"]["key"] == manifest["healed_model"]["key"]
    assert report["results"]["0.30"]["label"] == "resp + heal"


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_healed_flap_model_reloads_with_its_biases_in_the_mask(inputs, tmp_path, tiny_model_dir, tiny_params, mode):
    """A FLAP mask creates o_proj/down_proj biases the stock config cannot hold: the healed directory
    keeps stock weights (no bias keys), its mask carries the healed biases, and the compact export of
    the healed model has the unhealed compact export's shapes and computes the reloaded healed model."""
    from transformers import AutoModelForCausalLM

    from resp.api import export
    from resp.masks import apply_mask

    mask, meta = Mask.load(inputs["mask"])
    g = torch.Generator().manual_seed(1)
    layers, hidden = mask.heads.shape[0], 24   # tiny model: hidden_size 24
    mask.biases = {name: torch.randn(layers, hidden, generator=g) * 0.1 for name in ("o_proj", "down_proj")}
    flap_mask = mask.save(tmp_path / "flap" / "sparsity-0.30.safetensors", meta)
    healed_dir = run_heal({**inputs, "mask": flap_mask}, tmp_path / "healed", mode=mode)

    weights = load_file(healed_dir / "model.safetensors")
    assert not [k for k in weights if k.endswith("o_proj.bias") or k.endswith("down_proj.bias")]
    healed_mask_file = healed_mask(healed_dir)
    healed_biases = Mask.load(healed_mask_file)[0].biases
    assert sorted(healed_biases) == ["down_proj", "o_proj"]
    for name, value in healed_biases.items():
        assert value.shape == (layers, hidden)
        # LoRA trains no biases: the compensation comes back unchanged; full fine-tuning moved it
        assert torch.equal(value, mask.biases[name]) == (mode == "lora")

    healed, _, _, _ = load_healed(healed_dir)           # stock config: loads without unexpected keys
    s = structures_for(healed, "query_head", None)
    apply_mask(healed, Mask.load(healed_mask_file)[0], s)
    unhealed = export(tiny_params, flap_mask, "compact", tmp_path / "unhealed-compact")
    compact = export(tiny_params, healed_mask_file, "compact", tmp_path / "healed-compact", model=str(healed_dir))
    a = AutoModelForCausalLM.from_pretrained(unhealed, trust_remote_code=True)
    b = AutoModelForCausalLM.from_pretrained(compact, trust_remote_code=True)
    assert {n: tuple(p.shape) for n, p in a.named_parameters()} == {n: tuple(p.shape) for n, p in b.named_parameters()}
    assert any(n.endswith("o_proj.bias") for n, _ in b.named_parameters())
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    with torch.no_grad():
        assert torch.allclose(b(input_ids=ids).logits, healed(input_ids=ids).logits, atol=1e-5)


# ---------------------------------------------------------------- bad input

def test_mask_of_another_model_is_refused(inputs, tmp_path, tiny_model_dir):
    other = write_mask(tmp_path / "other.safetensors", tiny_model_dir, "f" * 64)
    with pytest.raises(HealError, match="mask was made for model ffffffffffffffff, not this model"):
        heal(heal_params(), inputs["model"], "arith", "train", other, [inputs["traces"]], tmp_path / "o",
             "query_head", None)
    assert not (tmp_path / "o").exists()


def test_mask_of_another_shape_is_refused(inputs, tmp_path, tiny_model_dir):
    mask = Mask(torch.ones(4, 8, dtype=torch.bool), torch.ones(4, 40, dtype=torch.bool))
    mask.save(tmp_path / "wide.safetensors", {"model": {"key": inputs["key"]}})
    with pytest.raises(HealError, match="do not fit this model .* made for a different model"):
        heal(heal_params(), inputs["model"], "arith", "train", tmp_path / "wide.safetensors", [inputs["traces"]],
             tmp_path / "o", "query_head", None)


@pytest.mark.parametrize("steps", [0, -3])
def test_heal_budget_must_be_positive(steps):
    with pytest.raises(ParamsError, match=f"heal.steps is {steps}: the healing budget must be a positive number"):
        load_params(ROOT / "params.yaml", [f"methods.resp_heal.heal.steps={steps}"])


def test_lora_rank_wider_than_a_pruned_layer_is_refused(inputs, tmp_path, tiny_model_dir):
    # layers 1 and 2 keep 20 channels and 2 heads (width 16): rank 17 exceeds the attention width
    with pytest.raises(HealError, match="heal.lora_rank 17 is larger than layer 1's attention after pruning "
                                        r"\(2 heads kept, width 16\): lower heal.lora_rank to at most 16"):
        run_heal(inputs, tmp_path / "o", mode="lora", lora_rank=17)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("task, split, what", [("choice", "train", "task 'choice' split 'train'"),
                                               ("arith", "test", "task 'arith' split 'test'")])
def test_healing_data_of_another_task_or_split_is_refused(inputs, tmp_path, task, split, what):
    traces = write_traces(tmp_path / "other.jsonl", inputs["key"], task=task, split=split)
    with pytest.raises(HealError, match=f"healing traces .* are of {what}, not task 'arith' split 'train'"):
        heal(heal_params(), inputs["model"], "arith", "train", inputs["mask"], [traces], tmp_path / "o",
             "query_head", None)


def test_healing_data_of_another_model_is_refused(inputs, tmp_path):
    traces = write_traces(tmp_path / "other.jsonl", "e" * 64)
    with pytest.raises(HealError, match="were generated by model eeeeeeeeeeeeeeee, not the dense teacher"):
        heal(heal_params(), inputs["model"], "arith", "train", inputs["mask"], [traces], tmp_path / "o",
             "query_head", None)


def test_resp_heal_command_heals_and_refuses_a_method_without_heal_settings(inputs, tmp_path, tiny_model_dir,
                                                                            tiny_world_dir):
    from conftest import tiny_overrides
    from typer.testing import CliRunner

    from resp.cli import app

    sets = [a for o in [*tiny_overrides(tiny_model_dir, tiny_world_dir), "methods.resp_heal.heal.steps=2",
                        "methods.resp_heal.heal.warmup_steps=1"] for a in ("--set", o)]
    args = ["heal", "--task", "arith", "--mask", str(inputs["mask"]), "--traces", str(inputs["traces"]),
            "--params", str(ROOT / "params.yaml"), *sets]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        "error: method 'resp' declares no heal settings: pass method= one that does (resp_heal) or add heal: {...} "
        "under methods.resp in params.yaml"]
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "healed"), "--method", "resp_heal"])
    assert done.exit_code == 0, done.output
    manifest = json.loads((tmp_path / "healed" / "resp_heal.json").read_text())
    assert manifest["method"] == "resp_heal" and manifest["heal"]["steps"] == 2
    assert f"--mask {tmp_path / 'healed' / 'mask' / 'sparsity-0.30.safetensors'}" in done.output


def test_registered_healed_version_has_the_pruned_parent_and_audits(tmp_path, tiny_model_dir, tiny_world_dir,
                                                                    mlflow_store):
    from conftest import tiny_overrides
    from typer.testing import CliRunner

    from resp import recipe, registry
    from resp.artifacts import file_digest
    from resp.cli import app

    # a private copy of the base (its directory names the registered models, so the session's other registry
    # tests see none of these versions) and calibration.seed=2 (trace digests no other test registers)
    import shutil as sh

    base = sh.copytree(tiny_model_dir, tmp_path / "healreg")
    params = load_params(ROOT / "params.yaml", [*tiny_overrides(base, tiny_world_dir), *mlflow_store,
                                                "calibration.seed=2", "methods.resp_heal.heal.steps=3",
                                                "methods.resp_heal.heal.warmup_steps=1"])
    dense = recipe.make_traces(params, "arith", "train", None, tmp_path / "dense.jsonl")
    masks = recipe.prune(params, "arith", declared_method(params, "resp"), tmp_path / "resp", str(dense))
    healed_dir = tmp_path / "healed"
    from resp.api import heal as api_heal

    with pytest.raises(registry.RegistryError, match="is not registered: register its run first"):
        registry.register_healed(params, api_heal(params, "arith", masks[0.2], dense, healed_dir, method="resp_heal"))
    import resp.healing

    assert (registry.HEAL_MANIFEST, registry.HEALED_MASK_DIR) == (resp.healing.MANIFEST, resp.healing.MASK_DIR)
    pruned = registry.register_method(params, "arith", "resp", tmp_path / "resp" / "masks")
    version = registry.register_healed(params, healed_dir)
    assert version["created"] and version["parent"] == f"{pruned[1]['name']}/{pruned[1]['version']}"
    assert registry.register_healed(params, healed_dir)["version"] == version["version"]   # idempotent
    report = registry.audit(params, version["name"], version["version"])
    assert report["problems"] == []
    lineage = report["lineage"]
    assert lineage["kind"] == "healed" and lineage["healed"]["steps"] == 3
    assert lineage["healed"]["teacher"]["key"] == model_identity(str(base)).key
    assert lineage["trace_sets"] == [{"tag": "heal", "path": str(dense), "digest": file_digest(dense),
                                      "n": 6, "sparsity": 0.0}]
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    # `resp register --healed`: the same version again (already registered), written like a pruning run's --out
    again = CliRunner().invoke(app, ["register", "--healed", str(healed_dir), "--params", str(params_file),
                                     "--out", str(tmp_path / "healed-versions.json")])
    assert again.exit_code == 0, again.output
    assert f"{version['name']} version {version['version']}: healed, target 0.20, parent {version['parent']} " \
           "(already registered)" in again.output
    assert json.loads((tmp_path / "healed-versions.json").read_text()) == {
        "task": "arith", "method": "resp_heal", "versions": [{"base_key": model_identity(str(base)).key,
                                                             "name": version["name"], "sparsity": version["sparsity"],
                                                             "target": "0.20"}]}
    both = CliRunner().invoke(app, ["register", "--healed", str(healed_dir), "--task", "arith", "--params",
                                    str(params_file)])
    assert both.exit_code == 2 and "drop --task, --method and --run-dir" in both.output
    shown = CliRunner().invoke(app, ["audit", "--model", version["name"], "--version", version["version"],
                                     "--params", str(params_file)])
    assert shown.exit_code == 0, shown.output
    assert any(line.split()[:1] == ["heal"] and f"  {dense}  sha256 {file_digest(dense)[:16]} [local ok, logged ok, "
               "manifest ok]" in line for line in shown.output.splitlines()), shown.output
    assert f"parent {version['parent']}" in shown.output
    assert (f"healed from mask {masks[0.2]} (digest {Mask.load(masks[0.2])[0].digest()[:16]}) by teacher "
            f"{base} ({model_identity(str(base)).key[:16]}): 3 steps, kl, full") in shown.output
    # healing data edited after registration: the audit names it
    dense.write_text(dense.read_text().replace('"truncated": false', '"truncated": true', 1))
    assert any("trace set" in p and str(dense) in p for p in registry.audit(params, version["name"],
                                                                            version["version"])["problems"])


def test_flow_heals_every_mask_of_a_healing_method_once(prefect_api, mlflow_store, tiny_model_dir, tiny_world_dir,
                                                        tmp_path, monkeypatch):
    import shutil as sh

    import resp.healing
    from test_flows import write_params

    from flows.pipeline import run_pipeline

    runs = []
    original = resp.healing.heal
    monkeypatch.setattr(resp.healing, "heal", lambda *a, **k: runs.append(a[4]) or original(*a, **k))
    base = tmp_path / "healbase"
    sh.copytree(tiny_model_dir, base)
    params = write_params(tmp_path / "run", base, tiny_world_dir, mlflow_store, "run.methods=[resp_heal]",
                          "methods.resp_heal.heal.steps=2", "methods.resp_heal.heal.warmup_steps=1",
                          "methods.resp_heal.heal.num_prompts=6")
    first = run_pipeline(params)
    assert sorted(first["healed"]) == ["arith/resp_heal/0.10", "arith/resp_heal/0.20"]
    for target, healed in first["healed"].items():
        manifest = json.loads((Path(healed) / "resp_heal.json").read_text())
        assert manifest["mask"]["path"] == first["masks"]["arith/resp_heal"][target.rsplit("/", 1)[1]]
        assert manifest["traces"][0]["path"].endswith("traces/heal-6.jsonl") and manifest["heal"]["steps"] == 2
    assert len(runs) == 2
    # every healed model exported and evaluated under the mask made for it, and registered under its pruned version
    pruned = {v["target"]: v for v in first["registered"] if "-dense/" in v["parent"]}
    healed_versions = {v["target"]: v for v in first["registered"] if "-dense/" not in v["parent"]}
    assert sorted(pruned) == sorted(healed_versions) == ["0.10", "0.20"]
    for key, healed in first["healed"].items():
        target = key.rsplit("/", 1)[1]
        digest = Mask.load(healed_mask(healed))[0].digest()
        export = Path(first["healed_exports"][key]["masked"])
        assert json.loads((export / "resp_manifest.json").read_text())["mask_digest"] == digest
        metrics = json.loads(Path(first["healed_metrics"][key]).read_text())
        assert list(metrics["results"]) == [target] and metrics["results"][target]["mask_digest"] == digest
        assert healed_versions[target]["parent"] == f"{pruned[target]['name']}/{pruned[target]['version']}"
    again = run_pipeline(params)
    assert again["healed"] == first["healed"] and len(runs) == 2   # cached: nothing healed again
    run_pipeline(params, ["methods.resp_heal.heal.steps=3"])         # a heal setting reruns healing
    assert len(runs) == 4


def test_lora_without_peft_is_one_line(inputs, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(HealError, match=r"heal.mode lora needs peft, which is not installed: pip install peft"):
        run_heal(inputs, tmp_path / "o", mode="lora")


def test_registering_a_model_healed_with_other_settings_is_refused(inputs, tmp_path, tiny_model_dir, tiny_world_dir,
                                                                  mlflow_store):
    from conftest import tiny_overrides

    from resp import registry

    healed = run_heal(inputs, tmp_path / "healed")   # heal_params(): not what params.yaml declares
    params = load_params(ROOT / "params.yaml", [*tiny_overrides(tiny_model_dir, tiny_world_dir), *mlflow_store])
    with pytest.raises(registry.RegistryError, match="was healed with other settings than methods.resp.heal"):
        registry.register_healed(params, healed)
