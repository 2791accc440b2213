"""lm-eval interop: masked and compact exports of the embedded model, evaluated by lm-eval's `hf` model
on a local GSM8K-format task, give the accuracy (and the answers) resp's own evaluation gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from resp.baselines import magnitude_scores
from resp.checkpoints import export_model
from resp.config import TaskParams
from resp.evaluation import score_completions
from resp.generation import SamplingSpec, generate
from resp.lm_eval_task import LM_EVAL_MISSING, LmEvalError, run_lm_eval, write_task
from resp.masks import Mask, prune_step
from resp.models import load_model
from resp.structures import structures_for
from resp.tasks import final_text, load_items, render_prompt

ROOT = Path(__file__).resolve().parents[1]
ITEMS = 24
MAX_NEW_TOKENS = 256  # the evaluation's (params.yaml evaluation.max_new_tokens)


@pytest.fixture(scope="module")
def arith_items(tmp_path_factory):
    """The first ITEMS arith test items as a GSM8K-format file, and resp's Items for it."""
    data = tmp_path_factory.mktemp("arith") / "test.jsonl"
    lines = (ROOT / "data/world/arith/test.jsonl").read_text().splitlines()[:ITEMS]
    data.write_text("\n".join(lines) + "\n")
    task = TaskParams(format="gsm8k", source=str(data.parent), subset=None, few_shot=0, calibration_split="test",
                      eval_split="test")
    return data, load_items(task, "test")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The embedded model pruned to 15 % by weight magnitude, exported masked and compact."""
    model, tokenizer = load_model(str(ROOT / "data/models/tiny"))
    s = structures_for(model, "query_head")
    mask = prune_step(*magnitude_scores(model, s, "paper"), Mask.dense(s), s, 0.15)
    out = tmp_path_factory.mktemp("exports")
    return {fmt: export_model(model, tokenizer, mask, s, fmt, out / fmt, channel_multiple=1) for fmt in ("masked", "compact")}


@pytest.fixture(scope="module")
def own(exports, arith_items):
    """resp's own evaluation of the pruned model (greedy, as `resp evaluate`): completions and metrics."""
    _, items = arith_items
    model, tokenizer = load_model(str(exports["masked"]))
    spec = SamplingSpec(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW_TOKENS)
    completions = generate(model, tokenizer, [render_prompt(tokenizer, item.message) for item in items], spec,
                           batch_size=ITEMS, seed=0, desc="own")
    return completions, score_completions(items, completions, "gsm8k", markers=())


@pytest.mark.parametrize("fmt", ["masked", "compact"])
def test_lm_eval_scores_an_export_as_resp_does(fmt, exports, arith_items, own, tmp_path):
    data, _ = arith_items
    completions, own = own
    assert not any(c.truncated for c in completions)  # the one case where the two would read differently

    task_dir = write_task(data, tmp_path / "task", max_gen_toks=MAX_NEW_TOKENS).parent
    theirs = run_lm_eval(exports[fmt], task_dir, trust_remote_code=fmt == "compact", batch_size=8)

    assert theirs["n"] == ITEMS
    # the same answers, word for word: lm-eval's response is the text after </think>
    assert theirs["responses"] == [final_text(c.text).strip() for c in completions]
    assert (theirs["strict"], theirs["flexible"]) == (own["accuracy_strict"], own["accuracy_flexible"])
    assert 0 < own["accuracy_strict"] < 1  # a pruned model that answers some items and misses others


def test_the_task_file_names_the_data_and_resps_scorer(arith_items, tmp_path):
    data, _ = arith_items
    path = write_task(data, tmp_path / "task", name="arith_check", max_gen_toks=64)
    text = path.read_text()
    assert path.name == "arith_check.yaml" and (tmp_path / "task" / "resp_lm_eval.py").is_file()
    assert f"test: {data.resolve()}" in text and "max_gen_toks: 64" in text
    assert "process_results: !function resp_lm_eval.process_results" in text


def test_missing_data_file_is_one_line(tmp_path):
    with pytest.raises(LmEvalError, match=r"^\S+missing.jsonl not found: give a GSM8K-format .jsonl file"):
        write_task(tmp_path / "missing.jsonl", tmp_path / "task")


def test_lm_eval_not_installed_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(LmEvalError) as error:
        run_lm_eval(tmp_path, tmp_path)
    assert str(error.value) == LM_EVAL_MISSING == \
        "lm-eval is not installed: pip install 'resp[lmeval]' (or install requirements-test.lock)"
