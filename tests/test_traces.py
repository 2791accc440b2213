"""resp.traces: the reflection filter's exact survivors, gold and text traces token for token
with their decode-only labels, strict judging of self-generated traces, and regeneration that
samples from the pruned weights (the path `resp.recipe.prune`'s `regenerate` takes)."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import ScriptedLM, make_qwen3
from resp.generation import SamplingSpec
from resp.masks import Mask, prune_step
from resp.masks import MaskedModel
from resp.structures import structures_for
from resp.tasks import Item
from resp.traces import (IGNORE_INDEX, Trace, TraceError, TraceSet, decode_only_batches, filter_traces, gold_traces,
                         select_challenging, self_generated_traces, text_traces)

IM_END = "<|im_end|>"


def chat(message: str) -> str:
    """The tiny tokenizer's chat template for one user turn, written out."""
    return f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"


# ---- filter_traces (reflection option: answer-consistency filtering)

def judged(prompt_id, answer, correct) -> Trace:
    return Trace(prompt_id, [1], [2, 3], "", False, answer, correct)


TRACES = TraceSet([
    judged("train-0", "5", True),      # correct
    judged("train-1", "7", False),     # wrong, agrees with the dense model's "7"
    judged("train-2", None, False),    # no answer: agrees with nothing, not even a dense None
    judged("train-3", "3", None),      # not judged, disagrees with the dense "4"
    judged("train-4", "9", False),     # wrong, the dense model gave no trace for it
    judged("train-5", "8", True),      # correct and disagrees with the dense "6": kept anyway
], {"kind": "self_generated", "mask_digest": "abc"})
DENSE_ANSWERS = {"train-0": "5", "train-1": "7", "train-2": None, "train-3": "4", "train-5": "6"}


@pytest.mark.parametrize("rule,kept", [
    ("correct", ["train-0", "train-5"]),
    ("correct_or_agree", ["train-0", "train-1", "train-5"]),
])
def test_filter_keeps_exactly(rule, kept):
    out = filter_traces(TRACES, rule, DENSE_ANSWERS)
    assert [t.prompt_id for t in out.traces] == kept
    assert out.manifest == {"kind": "self_generated", "mask_digest": "abc", "filter": rule, "filtered_from": 6}
    assert TRACES.manifest == {"kind": "self_generated", "mask_digest": "abc"}  # the input is not changed


def test_filter_none_and_no_dense_answers():
    assert filter_traces(TRACES, "none", DENSE_ANSWERS) is TRACES
    assert [t.prompt_id for t in filter_traces(TRACES, "correct_or_agree", None).traces] == ["train-0", "train-5"]


def test_filter_that_removes_everything_says_how_to_fix():
    wrong = TraceSet([TRACES.traces[2], TRACES.traces[3], TRACES.traces[4]])
    with pytest.raises(TraceError, match="^" + re.escape(
            "trace filter 'correct_or_agree' removed all 3 traces; declare the method with trace_filter: none") + "$"):
        filter_traces(wrong, "correct_or_agree", DENSE_ANSWERS)


# ---- gold (GISP) and text (generic) traces, and their decode-only batches

ITEMS = [Item("train-0", "Tom has 3 apples. He buys 2 more.", "5", "He has 3 + 2 = 5 apples.", None),
         Item("train-1", "Ana has 10 pens.", "6", "10 - 4 = 6.", None)]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_gold_traces_exact(tiny_tokenizer):
    eos = tiny_tokenizer.convert_tokens_to_ids(IM_END)
    gold = gold_traces(tiny_tokenizer, ITEMS, {"task": "arith"})
    assert gold.manifest == {"task": "arith", "kind": "gold"}
    assert gold.traces == [Trace(i.id, ids(tiny_tokenizer, chat(i.message)), ids(tiny_tokenizer, i.rationale) + [eos],
                                 i.rationale, False, i.gold, True) for i in ITEMS]
    assert tiny_tokenizer.decode(gold.traces[0].completion_ids) == "He has 3 + 2 = 5 apples." + IM_END


def test_gold_batches_mask_the_prompt(tiny_tokenizer):
    gold = gold_traces(tiny_tokenizer, ITEMS, {})
    pad = tiny_tokenizer.pad_token_id
    [batch] = list(decode_only_batches(gold.traces, batch_size=2, pad_id=pad))
    # shortest first (bucketing): "Ana" (train-1) is row 0
    rows = sorted(gold.traces, key=lambda t: len(t.prompt_ids) + len(t.completion_ids))
    assert [t.prompt_id for t in rows] == ["train-1", "train-0"]
    width = max(len(t.prompt_ids) + len(t.completion_ids) for t in rows)
    for row, t in enumerate(rows):
        p, c = len(t.prompt_ids), len(t.completion_ids)
        padding = width - p - c
        assert batch["input_ids"][row].tolist() == t.prompt_ids + t.completion_ids + [pad] * padding
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * p + t.completion_ids + [IGNORE_INDEX] * padding
        assert batch["attention_mask"][row].tolist() == [1] * (p + c) + [0] * padding
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(len(t.completion_ids) for t in rows)


def test_text_traces_have_full_sequence_loss(tiny_tokenizer):
    prose = [Item("train-0", "The river rests near the hills.", "", "", None), Item("train-1", "Tom has 12.", "", "", None)]
    text = text_traces(tiny_tokenizer, prose, {"task": "prose"})
    assert text.manifest == {"task": "prose", "kind": "text"}
    assert text.traces == [Trace(i.id, [], ids(tiny_tokenizer, i.message), i.message, False) for i in prose]
    pad = tiny_tokenizer.pad_token_id
    [batch] = list(decode_only_batches(text.traces, batch_size=2, pad_id=pad))
    short, long = sorted(text.traces, key=lambda t: len(t.completion_ids))
    width = len(long.completion_ids)
    padding = width - len(short.completion_ids)
    assert batch["input_ids"].tolist() == [short.completion_ids + [pad] * padding, long.completion_ids]
    # every real token is a label (the loss's shift leaves only the first one unpredicted)
    assert batch["labels"].tolist() == [short.completion_ids + [IGNORE_INDEX] * padding, long.completion_ids]
    assert batch["attention_mask"].tolist() == [[1] * len(short.completion_ids) + [0] * padding, [1] * width]


# ---- self-generated traces are judged by the strict extractor

class Scripted(ScriptedLM):
    """A causal LM that replies with a fixed text per user message."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        eos = tokenizer.convert_tokens_to_ids(IM_END)
        super().__init__({tuple(ids(tokenizer, chat(m))): ids(tokenizer, r) + [eos] for m, r in replies.items()}, eos,
                         len(tokenizer))


def test_self_generated_traces_are_judged_strictly(tiny_tokenizer):
    """A trace cut inside its thinking after the right number is wrong (flexible would call it
    right), so answer_accuracy and the filters see only stated answers."""
    items = [Item("train-0", "Tom has 12 apples.", "15", "", None), Item("train-1", "He buys 3 more.", "15", "", None)]
    long = "<think>\n" + "12+3=15\n" * 30 + "</think>\n\nThe answer is 15."
    model = Scripted(tiny_tokenizer, {items[0].message: "<think>\n12+3=15\n</think>\n\nThe answer is 15.",
                                      items[1].message: long})
    # cut right after a whole "15" inside the thinking
    cut = max(k for k in range(1, 60) if tiny_tokenizer.decode(ids(tiny_tokenizer, long)[:k]).endswith("=15\n"))
    spec = SamplingSpec(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=cut)
    traces = self_generated_traces(model, tiny_tokenizer, items, "gsm8k", spec, 2, 0, {}, desc="t")
    assert [(t.truncated, t.answer, t.correct) for t in traces.traces] == [(False, "15", True), (True, None, False)]
    assert traces.traces[1].text.endswith("12+3=15\n") and "</think>" not in traces.traces[1].text
    assert traces.stats()["answer_accuracy"] == 0.5
    assert [t.prompt_id for t in filter_traces(traces, "correct").traces] == ["train-0"]


# ---- regeneration samples from the pruned weights

SAMPLED = SamplingSpec(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10)
PROMPTS = [Item(f"train-{i}", m, "15", "", None) for i, m in enumerate(
    ["Tom has 12 apples.", "He buys 3 more.", "How many apples does Tom have now?", "The river rests near the hills."])]


def regenerate(model, tokenizer, seed=3) -> TraceSet:
    """As `resp.recipe.prune`'s `regenerate` samples (after `MaskedModel.set`)."""
    return self_generated_traces(model, tokenizer, PROMPTS, "gsm8k", SAMPLED, 2, seed, {}, desc="regenerate")


def zero_explicitly(model, mask: Mask, s) -> None:
    """The pruned model written out by hand: rows/columns of pruned heads and channels, k/v rows of dead groups."""
    hd = s.head_dim
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for h in range(s.num_heads):
                if not mask.heads[i, h]:
                    attn.q_proj.weight[h * hd:(h + 1) * hd] = 0
                    attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            for g in range(s.num_kv_heads):
                if not mask.heads[i, g * s.n_rep:(g + 1) * s.n_rep].any():
                    attn.k_proj.weight[g * hd:(g + 1) * hd] = 0
                    attn.v_proj.weight[g * hd:(g + 1) * hd] = 0
            for c in range(s.intermediate_size):
                if not mask.channels[i, c]:
                    mlp.gate_proj.weight[c] = 0
                    mlp.up_proj.weight[c] = 0
                    mlp.down_proj.weight[:, c] = 0


def completions(traces: TraceSet) -> list[list[int]]:
    return [t.completion_ids for t in traces.traces]


def test_regeneration_samples_from_the_pruned_weights(tiny_tokenizer):
    dense_model = make_qwen3()
    s = structures_for(dense_model, "query_head", None)
    g = torch.Generator().manual_seed(0)
    mask = prune_step(torch.rand(s.num_layers, s.num_heads, generator=g),
                      torch.rand(s.num_layers, s.intermediate_size, generator=g), Mask.dense(s), s, 0.4)
    assert mask.sparsity(s) >= 0.4
    dense = regenerate(dense_model, tiny_tokenizer)

    model = make_qwen3()
    masked = MaskedModel(model, s, keep_dense=True)
    assert completions(regenerate(model, tiny_tokenizer)) == completions(dense)  # no mask set: the dense model
    masked.set(mask)
    pruned = regenerate(model, tiny_tokenizer)

    by_hand = make_qwen3()
    zero_explicitly(by_hand, mask, s)
    reference = regenerate(by_hand, tiny_tokenizer)
    assert completions(pruned) == completions(reference)
    assert [t.text for t in pruned.traces] == [t.text for t in reference.traces]
    assert completions(pruned) != completions(dense)  # the mask changes what the model writes
    assert [t.prompt_ids for t in pruned.traces] == [t.prompt_ids for t in dense.traces]

    masked.set(Mask.dense(s))  # back to the dense weights (keep_dense): the dense traces again
    assert completions(regenerate(model, tiny_tokenizer)) == completions(dense)


def test_select_challenging_prefers_uncertain_prompts_of_moderate_length():
    def trace(prompt, sample, answer, length):
        return Trace(prompt, [1], [5] * length, f"{prompt}/{sample}", False, answer, None)

    rows = [("p0", "1", 10), ("p0", "1", 10),          # sure, in range
            ("p1", "1", 2), ("p1", "2", 11),           # unsure; first sample too short, second in range
            ("p2", "3", 12), ("p2", "4", 12),          # unsure, in range
            ("p3", None, 30), ("p3", "5", 30),         # unsure but the longest: out of range
            ("p4", "7", 11), ("p4", "7", 9)]           # sure, in range
    candidates = TraceSet([trace(p, i % 2, a, n) for i, (p, a, n) in enumerate(rows)], {"kind": "self_generated"})
    chosen = select_challenging(candidates, samples=2, keep=3, length_quantiles=(0.2, 0.7))
    assert [t.text for t in chosen.traces] == ["p1/1", "p2/0", "p0/0"]
    assert chosen.manifest["selection"] == {"rule": "challenging_moderate_length", "candidates": 5, "samples": 2,
                                            "length_range": [9, 12], "difficulty": [0.5, 0.5, 0.0]}
    everything = select_challenging(candidates, samples=2, keep=5, length_quantiles=(0.2, 0.7))
    assert [t.prompt_id for t in everything.traces] == ["p1", "p2", "p0", "p4", "p3"]   # out of range last
    with pytest.raises(TraceError, match="mix prompts"):
        select_challenging(TraceSet(candidates.traces[1:9]), samples=2, keep=1, length_quantiles=(0.2, 0.7))
