"""resp.evaluate: metrics from scripted completions (exact arithmetic), agreement with
`generate` on a real tiny model, atomic JSON writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_qwen3
from transformers import GenerationConfig

from resp.evaluate import EvaluationError, evaluate_task, write_json
from resp.generation import SamplingSpec, generate
from resp.tasks import Item, render_prompt

IM_END = "<|im_end|>"


class ScriptedModel:
    """Stands in for a causal LM: `generate` appends a fixed reply per prompt, as HF does
    (finished rows padded), so evaluation arithmetic can be checked exactly."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        self.tokenizer = tokenizer
        self.device = torch.device("cpu")
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(IM_END))
        end = [tokenizer.convert_tokens_to_ids(IM_END)]
        self.replies = {
            tuple(tokenizer(render_prompt(tokenizer, message), add_special_tokens=False)["input_ids"]):
                tokenizer(reply, add_special_tokens=False)["input_ids"] + end
            for message, reply in replies.items()
        }

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **sampling):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            reply = self.replies[tuple(ids[mask.bool()].tolist())][:max_new_tokens]
            rows.append(reply + [pad_token_id] * (max_new_tokens - len(reply)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


ARITH = [Item("test-0", "Tom has 23 apples. He buys 14 more. He gives 9 away. How many?", "28", "", None),
         Item("test-1", "Ana has 5 pens. She buys 2 more. How many?", "7", "", None),
         Item("test-2", "Ben has 3 cards. He buys 1 more. How many?", "4", "", None)]
REPLIES = {ARITH[0].message: "<think>\n23+14=37\n37-9=28\n</think>\n\nThe answer is 28.",
           ARITH[1].message: "<think>\n5+2=8\n</think>\n\nThe answer is 8.",
           ARITH[2].message: "<think>\n" + "Tom has apples and Ben has cards.\n" * 20 + "</think>\n\nThe answer is 4."}
SPEC = SamplingSpec(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=60)


def test_metrics_from_scripted_completions(tiny_tokenizer):
    model = ScriptedModel(tiny_tokenizer, REPLIES)
    result = evaluate_task(model, tiny_tokenizer, ARITH, "gsm8k", SPEC, batch_size=2, seed=0)
    lengths = [len(tiny_tokenizer(REPLIES[i.message], add_special_tokens=False)["input_ids"]) + 1 for i in ARITH[:2]]
    assert result["records"] == [
        {"id": "test-0", "gold": "28", "answer": "28", "correct": True, "completion_tokens": lengths[0], "truncated": False},
        {"id": "test-1", "gold": "7", "answer": "8", "correct": False, "completion_tokens": lengths[1], "truncated": False},
        # cut after 60 tokens inside a thinking without numbers: no answer
        {"id": "test-2", "gold": "4", "answer": None, "correct": False, "completion_tokens": 60, "truncated": True},
    ]
    assert result["n"] == 3
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["mean_completion_tokens"] == pytest.approx((lengths[0] + lengths[1] + 60) / 3)
    assert result["truncation_rate"] == pytest.approx(1 / 3)


def test_mathqa_letters(tiny_tokenizer):
    items = [Item("test-0", "Question: q\nOptions: a ) 1 , b ) 2\nAnswer:", "b", "", "a ) 1 , b ) 2"),
             Item("test-1", "Question: r\nOptions: a ) 1 , b ) 2\nAnswer:", "a", "", "a ) 1 , b ) 2")]
    model = ScriptedModel(tiny_tokenizer, {items[0].message: "<think>\n1+1=2\n</think>\n\nThe answer is (b).",
                                           items[1].message: "<think>\n1+1=2\n</think>\n\nThe answer is (b)."})
    result = evaluate_task(model, tiny_tokenizer, items, "mathqa", SPEC, batch_size=4, seed=0)
    assert [(r["answer"], r["correct"]) for r in result["records"]] == [("b", True), ("b", False)]
    assert result["accuracy"] == 0.5


def test_agrees_with_generate_on_a_tiny_model(tiny_tokenizer):
    model = make_qwen3()
    spec = SamplingSpec(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=6)
    result = evaluate_task(model, tiny_tokenizer, ARITH, "gsm8k", spec, batch_size=2, seed=3)
    prompts = [render_prompt(tiny_tokenizer, i.message) for i in ARITH]
    completions = generate(model, tiny_tokenizer, prompts, spec, batch_size=2, seed=3, desc="g")
    assert [r["completion_tokens"] for r in result["records"]] == [len(c.completion_ids) for c in completions]
    assert [r["truncated"] for r in result["records"]] == [c.truncated for c in completions]


def test_no_items():
    with pytest.raises(EvaluationError, match=r"^no items to evaluate: check the task's split and --limit$"):
        evaluate_task(None, None, [], "gsm8k", SPEC, batch_size=1, seed=0)


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "metrics" / "eval.json"
    write_json(path, {"accuracy": 0.5, "records": [{"id": "test-0"}]})
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "records": [{"id": "test-0"}]}
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    # a failed write leaves the previous file intact and no temp file behind
    assert json.loads(path.read_text())["accuracy"] == 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]
