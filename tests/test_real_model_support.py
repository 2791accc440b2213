"""What a real Llama-family instruct model (SmolLM2-135M-Instruct, `benchmarks/real_model.py`) needs from the
library, on a tiny random model of that shape: tied input/output embeddings, 3 query heads per KV head, a ChatML
chat template without thinking mode, a directory converted from GGUF. Nothing is downloaded."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import GenerationConfig

from conftest import make_llama
from resp import tasks
from resp.artifacts import masks_in_dir
from resp.config import declared_method, load_params
from resp.evaluation import evaluate_masks
from resp.checkpoints import export_model
from resp.masks import Mask
from resp.models import ModelLoadError, load_model
from resp.recipe import make_traces, prune
from resp.structures import structures_for
from resp.tasks import render_prompt

# SmolLM2-135M-Instruct's chat template, verbatim: ChatML, a default system turn, no enable_thinking.
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
SMOL_SHAPE = dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)  # 3 query heads per KV head


@pytest.fixture
def smol_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = SMOL_TEMPLATE
    return tokenizer


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(tasks, "_WARNED_NO_THINKING", set())


@pytest.fixture
def smol_dir(tmp_path, smol_tokenizer):
    """A tiny random Llama with tied embeddings and the SmolLM2 chat template, saved like `prepare` saves one."""
    path = tmp_path / "smol"
    model = make_llama(**SMOL_SHAPE)
    eos = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = model.config.pad_token_id = eos
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad():  # tied: this scales the <|im_end|> input embedding too; ends some traces early
        model.lm_head.weight[eos] *= 30
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def warnings_from_tasks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "resp.tasks" and r.levelno == logging.WARNING]


def test_template_without_thinking_mode_warns_once_and_renders(smol_tokenizer, caplog):
    caplog.set_level(logging.WARNING)
    prompts = [render_prompt(smol_tokenizer, f"What is {n} + 1?") for n in range(3)]
    assert prompts[0] == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                          "<|im_end|>\n<|im_start|>user\nWhat is 0 + 1?<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[2].endswith("What is 2 + 1?<|im_end|>\n<|im_start|>assistant\n")
    (warning,) = warnings_from_tasks(caplog)  # exactly one over three calls
    assert warning.startswith("the model's chat template has no thinking mode (no enable_thinking)")
    assert render_prompt(smol_tokenizer, "x", enable_thinking=False).endswith("x<|im_end|>\n<|im_start|>assistant\n")
    assert len(warnings_from_tasks(caplog)) == 1


def test_template_with_thinking_mode_is_passed_the_switch(tiny_tokenizer, caplog):
    caplog.set_level(logging.WARNING)
    on, off = (render_prompt(tiny_tokenizer, "Tom", enable_thinking=flag) for flag in (True, False))
    assert on != off and "<think>" in off  # the Qwen3-style template writes an empty think block when off
    assert warnings_from_tasks(caplog) == []


def test_tied_llama_loads_with_its_structures(smol_dir):
    model, tokenizer = load_model(str(smol_dir))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    s = structures_for(model, "query_head", None)
    assert (s.num_heads, s.num_kv_heads, s.n_rep, s.head_dim) == (6, 2, 3, 8)
    # decoder parameters only: the tied embedding matrix is neither counted nor pruned
    assert s.decoder_params == sum(p.numel() for p in model.model.layers.parameters())


def test_recipe_on_tied_llama_without_thinking_mode(smol_dir, smol_tokenizer, tiny_world_dir, tmp_path, caplog):
    """Traces, RESP and a one-shot baseline, evaluation and exports: the pipeline's own functions."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    params = load_params(root / "params.yaml", [
        f"model.name_or_path={smol_dir}", f"tasks.arith.source={tiny_world_dir / 'arith'}",
        f"tasks.prose.source={tiny_world_dir / 'prose'}", "calibration.num_prompts=6", "generation.max_new_tokens=12",
        "generation.batch_size=4", "importance.batch_size=4", "prune.steps=3", "prune.targets=[0.1,0.2]",
        "prune.milestones=[0.1]", "evaluation.num_items=4", "evaluation.max_new_tokens=8", "evaluation.nll_traces=4"])
    caplog.set_level(logging.WARNING)
    dense = make_traces(params, "arith", "train", None, tmp_path / "dense.jsonl")
    heldout = make_traces(params, "arith", "test", 4, tmp_path / "heldout.jsonl")
    masks = {m: prune(params, "arith", declared_method(params, m), tmp_path / m, str(dense))
             for m in ("resp", "wanda_sp")}
    # RESP regenerated at 0.1 through the same template: still one warning for the whole run
    assert (tmp_path / "resp" / "traces" / "milestone-0.10.jsonl").is_file()
    assert len(warnings_from_tasks(caplog)) == 1
    out = evaluate_masks(params, "arith", "resp", masks_in_dir(tmp_path / "resp" / "masks"), heldout,
                         tmp_path / "resp.json", include_dense=True)
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["0.10", "0.20", "dense"]
    assert results["0.20"]["sparsity"] >= 0.2 and results["dense"]["nll"]["n_tokens"] > 0
    assert results["0.20"]["nll"]["nll"] != results["dense"]["nll"]["nll"]

    model, tokenizer = load_model(str(smol_dir))
    s = structures_for(model, "query_head", None)
    mask, _ = Mask.load(masks["resp"][0.2])
    ids = torch.tensor([[1, 5, 9, 11, 40]])
    exported = {fmt: export_model(model, tokenizer, mask, s, fmt, tmp_path / fmt, 8) for fmt in ("masked", "compact")}
    reloaded = {fmt: load_model(str(path))[0] for fmt, path in exported.items()}
    with torch.no_grad():
        torch.testing.assert_close(reloaded["compact"](ids).logits, reloaded["masked"](ids).logits, atol=1e-5, rtol=1e-5)
    for m in reloaded.values():  # the export keeps the head tied to the (unpruned) embedding
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(m.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_converted_dir_without_tokenizer_is_one_clear_line(tmp_path):
    """A directory saved from a GGUF file with the model's save_pretrained only."""
    path = tmp_path / "from-gguf"
    make_llama(**SMOL_SHAPE).save_pretrained(path)
    with pytest.raises(ModelLoadError) as error:
        load_model(str(path))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path} has no tokenizer: none of tokenizer.json, tokenizer_config.json, "
                              "tokenizer.model, vocab.json; save it beside the weights")
    assert f"gguf_file=name).save_pretrained('{path}')" in message


def _real_model_benchmark():
    """benchmarks/real_model.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "real_model.py"
    spec = importlib.util.spec_from_file_location("real_model_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_model_benchmark_heals_resp_and_reports_it(smol_dir, tiny_world_dir, tmp_path):
    """`run` on a tiny model of SmolLM2's shape: RESP, then its masks healed (issue 23) and the healed model
    evaluated and scored on the dense model's NLL sets; the results pair healed with unhealed; a rerun redoes
    nothing; a healed model's NLL on sets of another model is refused."""
    from resp.healing import MANIFEST, healed_mask
    from resp.masks import check_mask_fits
    from resp.models import model_identity

    bench = _real_model_benchmark()
    sizes = {"task": {"steps": 1, "max_operand": 10, "n_train": 6, "n_test": 4, "seed": 0},
             "params": {**bench.DRY["params"], "calibration.num_prompts": 4, "generation.max_new_tokens": 10,
                        "generation.batch_size": 4, "prune.steps": 2, "prune.targets": [0.1, 0.2],
                        "prune.milestones": [0.1], "evaluation.num_items": 4, "evaluation.max_new_tokens": 6,
                        "evaluation.batch_size": 4, "methods.resp_heal.heal.num_prompts": 6,
                        "methods.resp_heal.heal.steps": 3, "methods.resp_heal.heal.checkpoint_every": 0},
             "nll_traces": 2, "heal": {"method": "resp", "target": 0.2, "settings": "resp_heal"}}
    work, results = tmp_path / "work", tmp_path / "results.md"
    extra = [f"tasks.prose.source={tiny_world_dir / 'prose'}"]
    bench.run(work, sizes, ["resp"], [0], extra, smol_dir, results, "test")
    assert not json.loads((work / "failures.json").read_text())
    times = json.loads((work / "times.json").read_text())
    heal_phases = ["healing traces seed 0", "heal resp 20% seed 0", "evaluate healed resp 20% seed 0",
                   "NLL healed resp 20% seed 0"]
    assert all(name in times for name in heal_phases)

    cell = work / "heal" / "resp-0.20" / "seed-0"
    manifest = json.loads((cell / "model" / MANIFEST).read_text())
    assert manifest["heal"]["steps"] == 3 and manifest["traces"][0]["n"] == 6   # the benchmark's overrides ran
    assert manifest["mask"]["digest"] == Mask.load(work / "runs" / "resp" / "seed-0" / "masks" / "sparsity-0.20.safetensors")[0].digest()
    healed_model, _ = load_model(str(cell / "model"))
    mask, meta = Mask.load(healed_mask(cell / "model"))
    s = structures_for(healed_model, "query_head", None)
    check_mask_fits(mask, s, meta, model_identity(str(cell / "model")).key)
    layer = next(i for i in s.prunable_layers if not mask.channels[i].all())
    pruned = ~mask.channels[layer]
    assert healed_model.model.layers[layer].mlp.up_proj.weight[pruned].abs().sum() == 0   # pruned units stay pruned

    accuracy = json.loads((cell / "accuracy.json").read_text())
    assert accuracy["model"]["key"] == meta["model"]["key"] and list(accuracy["results"]) == ["0.20"]
    nll = json.loads((cell / "nll.json").read_text())["results"]["0.20"]
    unhealed = json.loads((work / "runs" / "resp" / "seed-0" / "nll.json").read_text())["results"]["0.20"]
    assert sorted(nll) == ["gold", "prose", "self"] and nll["self"]["n_tokens"] == unhealed["self"]["n_tokens"]
    assert nll["self"]["nll"] != unhealed["self"]["nll"]   # the healed weights are scored, not the base ones

    # the report: healed - unhealed is the mean of the per-item differences of the two cells
    text = results.read_text()
    assert "## Healing resp 20% (`resp.healing`, issue 23)" in text
    row = next(line for line in text.splitlines() if line.startswith("| heal - unhealed | 0 |"))
    healed_values = bench.metrics(accuracy["results"]["0.20"], nll)
    before = bench.metrics(json.loads((work / "runs" / "resp" / "seed-0" / "accuracy.json").read_text())["results"]["0.20"],
                           unhealed)
    column = list(bench.HEAL_COLUMNS).index("nll_self")
    expected = sum(healed_values["nll_self"]) / 2 - sum(before["nll_self"]) / 2
    assert row.split(" | ")[2 + column].split(" [")[0] == f"{expected:+.3f}"
    cost = next(line for line in text.splitlines() if line.startswith("| 0 | 6 |"))
    assert f"| {manifest['completion_tokens']} | {manifest['trained_tokens']} |" in cost

    # resumed: every phase is skipped, the results are the same bytes
    bench.run(work, sizes, ["resp"], [0], extra, smol_dir, results, "test")
    assert json.loads((work / "times.json").read_text()) == times and results.read_text() == text

    # the dense model's sets are the healed model's only with their key named
    params = load_params(bench.ROOT / "params.yaml", bench.overrides(sizes, cell / "model", work / "task") + extra)
    sets = {name: work / "heldout" / f"{name}.jsonl" for name in bench.NLL_SETS}
    with pytest.raises(SystemExit, match="was made for another model"):
        bench.trace_nlls(params, {0.2: healed_mask(cell / "model")}, sets, tmp_path / "nll.json", include_dense=False)
    assert not (tmp_path / "nll.json").exists()


def test_real_model_benchmark_refuses_a_heal_target_it_does_not_prune(smol_dir, tmp_path):
    bench = _real_model_benchmark()
    sizes = {**bench.DRY, "heal": {**bench.DRY["heal"], "target": 0.25}}
    with pytest.raises(SystemExit) as error:
        bench.run(tmp_path / "work", sizes, ["resp"], [0], [], smol_dir, tmp_path / "results.md", "test")
    assert str(error.value) == "heal target 0.25 is not one of prune.targets [0.2, 0.3]: heal a target the run prunes"
    assert not (tmp_path / "work" / "times.json").exists() and not (tmp_path / "results.md").exists()
