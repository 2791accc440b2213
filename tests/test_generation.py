"""resp.generation: batched greedy equals one-by-one greedy, seeded sampling, EOS cut and
truncation flags, input order."""

from __future__ import annotations

import pytest
import torch

from resp.generation import Completion, GenerationError, SamplingSpec, eos_token_ids, generate
from conftest import make_llama, make_qwen3

PROMPTS = [  # different lengths, so batches need left padding
    "<|im_start|>user\nTom has 12 apples.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHe buys 3 more. How many apples does Tom have now?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n12+3<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nThe river rests near the hills.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nTom<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY = SamplingSpec(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=8)
SAMPLED = SamplingSpec(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)


def no_eos(model):
    """A random tiny model almost never emits <|im_end|>; make sure no other id ends it either."""
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("make", [make_qwen3, make_llama], ids=["qwen3", "llama"])
def test_batched_greedy_equals_one_by_one(make, tiny_tokenizer):
    model = no_eos(make())
    batched = generate(model, tiny_tokenizer, PROMPTS, GREEDY, batch_size=3, seed=0, desc="batched")
    single = [generate(model, tiny_tokenizer, [p], GREEDY, batch_size=1, seed=0, desc="single")[0] for p in PROMPTS]
    assert batched == single
    # results are in input order: prompt_ids are each prompt's own tokens
    assert [c.prompt_ids for c in batched] == [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_greedy_equals_manual_argmax(tiny_tokenizer):
    """The first greedy tokens are the argmax of a plain forward pass (no padding involved)."""
    model = no_eos(make_qwen3())
    completion = generate(model, tiny_tokenizer, PROMPTS[:1], GREEDY, batch_size=1, seed=0, desc="g")[0]
    ids = list(completion.prompt_ids)
    with torch.no_grad():
        for _ in range(GREEDY.max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert completion.completion_ids == ids[len(completion.prompt_ids):]
    assert completion.truncated


def test_sampling_is_seeded(tiny_tokenizer):
    model = no_eos(make_qwen3())
    first = generate(model, tiny_tokenizer, PROMPTS, SAMPLED, batch_size=2, seed=7, desc="s")
    torch.rand(100)  # global RNG use in between must not matter
    again = generate(model, tiny_tokenizer, PROMPTS, SAMPLED, batch_size=2, seed=7, desc="s")
    other = generate(model, tiny_tokenizer, PROMPTS, SAMPLED, batch_size=2, seed=8, desc="s")
    greedy = generate(model, tiny_tokenizer, PROMPTS, GREEDY, batch_size=2, seed=7, desc="g")
    assert first == again
    assert [c.completion_ids for c in first] != [c.completion_ids for c in other]
    assert [c.completion_ids for c in first] != [c.completion_ids for c in greedy]


def test_eos_cut_and_truncation_flags(tiny_tokenizer):
    """Make the token greedy decoding emits at step 3 of prompt 0 an EOS: the completion ends there."""
    model = no_eos(make_qwen3())
    reference = generate(model, tiny_tokenizer, PROMPTS, GREEDY, batch_size=5, seed=0, desc="r")
    assert all(c.truncated and len(c.completion_ids) == GREEDY.max_new_tokens for c in reference)
    stop = reference[0].completion_ids[3]
    model.generation_config.eos_token_id = [stop]
    cut = generate(model, tiny_tokenizer, PROMPTS, GREEDY, batch_size=5, seed=0, desc="c")
    for before, after in zip(reference, cut):
        ids = before.completion_ids
        if stop in ids:
            expected = ids[: ids.index(stop) + 1]
            assert after == Completion(before.prompt_ids, expected,
                                       tiny_tokenizer.decode(expected[:-1], skip_special_tokens=False), False)
        else:
            assert after == before
    assert len(cut[0].completion_ids) <= 4 and not cut[0].truncated


def test_eos_at_the_last_allowed_token_is_not_truncated(tiny_tokenizer):
    model = no_eos(make_qwen3())
    reference = generate(model, tiny_tokenizer, PROMPTS[:1], GREEDY, batch_size=1, seed=0, desc="r")[0]
    last = reference.completion_ids[-1]
    if last in reference.completion_ids[:-1]:
        pytest.fail("fixture assumption broken: pick a prompt whose last greedy token is new")
    model.generation_config.eos_token_id = last
    ended = generate(model, tiny_tokenizer, PROMPTS[:1], GREEDY, batch_size=1, seed=0, desc="e")[0]
    assert ended.completion_ids == reference.completion_ids and not ended.truncated
    short = SamplingSpec(0.0, 1.0, 0, GREEDY.max_new_tokens - 1)
    clipped = generate(model, tiny_tokenizer, PROMPTS[:1], short, batch_size=1, seed=0, desc="t")[0]
    assert clipped.completion_ids == reference.completion_ids[:-1] and clipped.truncated


def test_text_keeps_special_tokens(tiny_tokenizer):
    """Point the lm_head row of </think> at the last prompt state so greedy emits it first:
    the text must keep it (answer extraction splits on it) though the tokenizer marks it special."""
    model = no_eos(make_qwen3())
    think_end = tiny_tokenizer.convert_tokens_to_ids("</think>")
    ids = tiny_tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        state = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        model.lm_head.weight[think_end] = 100 * state / state.norm()
    completion = generate(model, tiny_tokenizer, PROMPTS[:1], GREEDY, batch_size=1, seed=0, desc="x")[0]
    assert completion.completion_ids[0] == think_end
    assert completion.text == tiny_tokenizer.decode(completion.completion_ids, skip_special_tokens=False)
    assert completion.text.startswith("</think>")


def test_eos_token_ids_union(tiny_tokenizer):
    model = make_qwen3()
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [5, im_end]
    assert eos_token_ids(model, tiny_tokenizer) == sorted({5, im_end})
    model.generation_config.eos_token_id = 7
    assert eos_token_ids(model, tiny_tokenizer) == sorted({7, im_end})


def test_bad_batch_size(tiny_tokenizer):
    with pytest.raises(GenerationError, match=r"^batch_size 0 must be positive$"):
        generate(make_qwen3(), tiny_tokenizer, PROMPTS, GREEDY, batch_size=0, seed=0, desc="x")
