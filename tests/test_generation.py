"""resp.generation: the decode loop against transformers' `generate` (greedy, token for token, with
left padding and rows that stop early) and its logits warpers (exactly); per-prompt seeding that
makes a sampled completion independent of batch size and batch mates; the cache layer that drops
finished rows; EOS cut and truncation flags, input order."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from resp.checkpoints.compact import compact_model
from resp.generation import (Completion, GenerationError, SamplingSpec, VllmEngine, _BufferedLayer, _cut, _rows_to_keep,
                             eos_token_ids, generate, generate_with_backend, next_tokens, processed_scores, require_vllm)
from resp.masks import Mask
from resp.models import load_model
from resp.structures import structures_for
from conftest import TINY, make_llama, make_qwen3

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


# ---- greedy decoding is transformers' greedy decoding, token for token


def make_mistral():
    """Every layer a sliding-window layer (window 4, shorter than the prompts): transformers' own cache layers."""
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=4)).eval()


def make_compact():
    """A compact export of Qwen3 with a layer without heads (its cache holds a placeholder) and uneven heads."""
    model = make_qwen3()
    s = structures_for(model, "query_head", [])
    mask = Mask.dense(s)
    mask.heads[1] = False
    mask.heads[2, 1] = False
    return compact_model(model, mask, s)[0].eval()


def hf_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' `generate` on the prompts as one left-padded batch, each row cut after its first EOS."""
    pad = tokenizer.pad_token_id
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    eos = eos_token_ids(model, tokenizer)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return [_cut(row[width:].tolist(), set(eos))[0] for row in output]


@pytest.mark.parametrize("make", [make_qwen3, make_llama], ids=["qwen3", "llama"])
def test_greedy_equals_hf_generate_with_rows_stopping_early(make, tiny_tokenizer):
    model = no_eos(make())
    free = hf_greedy(model, tiny_tokenizer, PROMPTS, 12)
    # two tokens greedy decoding emits mid-way become EOS: rows stop at different steps, others run on
    model.generation_config.eos_token_id = [free[1][5], free[3][8]]
    spec = SamplingSpec(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=12)
    want = hf_greedy(model, tiny_tokenizer, PROMPTS, 12)
    lengths = [len(ids) for ids in want]
    if len(set(lengths) - {12}) < 2 or 12 not in lengths:
        pytest.fail(f"fixture assumption broken: completion lengths {lengths} need two early stops and a full row")
    batched = generate(model, tiny_tokenizer, PROMPTS, spec, batch_size=len(PROMPTS), seed=0, desc="b")
    assert [c.completion_ids for c in batched] == want
    assert [c.truncated for c in batched] == [n == 12 and ids[-1] not in model.generation_config.eos_token_id
                                              for n, ids in zip(lengths, want)]
    single = generate(model, tiny_tokenizer, PROMPTS, spec, batch_size=1, seed=0, desc="s")
    assert [c.completion_ids for c in single] == [hf_greedy(model, tiny_tokenizer, [p], 12)[0] for p in PROMPTS]


def forward_inputs(model, run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(position_ids, attention_mask) of every forward call `run()` makes on `model`."""
    seen = []

    def spy(module, args, kwargs):
        seen.append((kwargs["position_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_positions_and_masks_are_those_of_hf_generate(tiny_tokenizer):
    """RoPE hides a constant position offset from greedy tokens, so compare the model inputs:
    left-padded positions count real tokens (padding at 0), masks grow by one column a step."""
    model = no_eos(make_qwen3())
    # generate sorts a batch longest prompt first: give transformers the same row order
    by_length = sorted(PROMPTS, key=lambda p: -len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]))
    ours = forward_inputs(model, lambda: generate(model, tiny_tokenizer, by_length, GREEDY, batch_size=5, seed=0,
                                                   desc="g"))
    theirs = forward_inputs(model, lambda: hf_greedy(model, tiny_tokenizer, by_length, GREEDY.max_new_tokens))
    assert len(ours) == len(theirs) == GREEDY.max_new_tokens
    for (position, mask), (want_position, want_mask) in zip(ours, theirs):
        assert torch.equal(position, want_position) and torch.equal(mask, want_mask)
    assert ours[0][0][-1].tolist()[:3] == [0, 0, 0] and ours[1][0][:, 0].tolist() == ours[0][0][:, -1].add(1).tolist()


@pytest.mark.parametrize("make", [make_mistral, make_compact], ids=["mistral_sliding_window", "compact_dead_layer"])
def test_greedy_equals_hf_generate_on_other_caches(make, tiny_tokenizer):
    model = no_eos(make())
    spec = SamplingSpec(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=10)
    got = generate(model, tiny_tokenizer, PROMPTS, spec, batch_size=len(PROMPTS), seed=0, desc="g")
    assert [c.completion_ids for c in got] == hf_greedy(model, tiny_tokenizer, PROMPTS, 10)


# ---- sampling: transformers' warpers, and one random stream per prompt

WARPED = [  # (temperature, top_p, top_k)
    (0.6, 0.95, 20), (1.0, 0.9, 0), (0.7, 1.0, 5), (1.3, 0.5, 50), (0.6, 0.95, 400), (2.0, 0.3, 1), (0.9, 1.0, 0),
    (1.0, 1e-9, 0)]  # top_p below float32 resolution: every token is within 1 - top_p, the most likely one is kept


@pytest.mark.parametrize("temperature,top_p,top_k", WARPED)
def test_processed_scores_equal_hf_warpers(temperature, top_p, top_k):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 300, generator=g) * 3
    logits[4] = (logits[4] * 2).round() / 2      # ties at the k-th value and across the top-p boundary
    logits[5, :10] = 9.0                         # one row whose top tokens all tie
    # the warpers transformers' generate applies for do_sample=True, in its order and conditions
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    want = warpers(torch.zeros(8, 1, dtype=torch.long), logits.clone())
    got = processed_scores(logits, SamplingSpec(temperature, top_p, top_k, 1))
    assert torch.equal(got, want)
    assert torch.isinf(got).any() == (top_k not in (0, 400) or top_p < 1.0)


def test_draw_inverts_the_cumulative_distribution():
    """probabilities 0.5, 0, 0.25, 0.25, 0: token = the first whose cumulative probability exceeds u."""
    probs = torch.tensor([0.5, 0.0, 0.25, 0.25, 0.0])
    uniforms = torch.tensor([0.0, 0.4999, 0.5, 0.7499, 0.75, 1 - 2 ** -24])
    logits = probs.log().expand(len(uniforms), -1)
    tokens = next_tokens(logits, SamplingSpec(1.0, 1.0, 0, 1), uniforms)
    assert tokens.tolist() == [0, 0, 2, 2, 3, 3]   # never a token of probability 0, even at u -> 1
    greedy = next_tokens(logits, SamplingSpec(0.0, 1.0, 0, 1), None)
    assert greedy.tolist() == [0] * len(uniforms)


def test_top_k_1_sampling_equals_greedy(tiny_tokenizer):
    model = no_eos(make_qwen3())
    sampled = generate(model, tiny_tokenizer, PROMPTS, SamplingSpec(0.7, 0.9, 1, 8), batch_size=2, seed=5, desc="s")
    greedy = generate(model, tiny_tokenizer, PROMPTS, GREEDY, batch_size=2, seed=5, desc="g")
    assert [c.completion_ids for c in sampled] == [c.completion_ids for c in greedy]


EVAL_SAMPLING = SamplingSpec(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=5)
OTHERS = ["<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n",
          "<|im_start|>user\nThe hills rest near the river, and Tom has 15 apples now.<|im_end|>\n<|im_start|>assistant\n"]


def test_a_sampled_completion_depends_only_on_its_prompt_index_and_seed(tiny_model_dir):
    """A model that often ends its turn early (<|im_end|> made likely), so rows leave the batch at
    different steps: completion i is the same in any batch size, next to any other prompts, and
    equals prompt i sampled alone with seed + i."""
    model, tokenizer = load_model(str(tiny_model_dir))
    full = generate(model, tokenizer, PROMPTS, EVAL_SAMPLING, batch_size=len(PROMPTS), seed=11, desc="f")
    lengths = [len(c.completion_ids) for c in full]
    if len(set(lengths)) < 3 or all(c.truncated for c in full) or not any(c.truncated for c in full):
        pytest.fail(f"fixture assumption broken: completion lengths {lengths} should vary, some ended, some cut")
    for batch_size in (1, 2, 3):
        assert generate(model, tokenizer, PROMPTS, EVAL_SAMPLING, batch_size=batch_size, seed=11, desc="b") == full
    mixed = [PROMPTS[0], OTHERS[0], PROMPTS[2], OTHERS[1], OTHERS[1]]
    again = generate(model, tokenizer, mixed, EVAL_SAMPLING, batch_size=len(mixed), seed=11, desc="m")
    assert (again[0], again[2]) == (full[0], full[2])
    assert generate(model, tokenizer, [PROMPTS[3]], EVAL_SAMPLING, batch_size=1, seed=14, desc="a") == [full[3]]
    # the same prompt at two indices: two streams (index 0 at seed 12 is prompt 1's stream above)
    twice = generate(model, tokenizer, [PROMPTS[1], PROMPTS[1]], EVAL_SAMPLING, batch_size=2, seed=12, desc="t")
    assert twice[0] == full[1] and twice[1].completion_ids != twice[0].completion_ids


# ---- the cache: finished rows leave it


def test_rows_to_keep_moves_one_row_per_finished_row():
    def order(running):
        return _rows_to_keep(torch.tensor(running)).tolist()

    assert order([False, True, True, False, True, True]) == [4, 1, 2, 5]
    assert order([True, True, False]) == [0, 1]
    assert order([False, True]) == [1]
    assert order([True, True, True]) == [0, 1, 2]


def test_buffered_layer_equals_dynamic_layer():
    """Same keys/values as transformers' DynamicLayer through prefill, steps and row selections,
    including one where a row's source is another row's destination."""
    g = torch.Generator().manual_seed(0)
    buffered, dynamic = _BufferedLayer(capacity=9), DynamicLayer()

    def step(rows: int, tokens: int):
        keys, values = torch.randn(2, rows, 2, tokens, 3, generator=g)
        got, want = buffered.update(keys, values), dynamic.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, want))

    def select(indices: list[int]):
        for layer in (buffered, dynamic):
            layer.batch_select_indices(torch.tensor(indices))
        assert torch.equal(buffered.keys, dynamic.keys) and torch.equal(buffered.values, dynamic.values)

    step(6, 5)
    step(6, 1)
    select([5, 1, 2, 0])      # row 0 <- 5 and row 3 <- 0: read before written
    step(4, 1)
    select([3, 0])
    step(2, 1)
    assert buffered.get_seq_length() == dynamic.get_seq_length() == 8



# ---- hf_static / hf_compiled: transformers' generate with a static cache draws the loop's tokens

WARPED_SAMPLING = SamplingSpec(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=10)


@pytest.mark.parametrize("spec", [GREEDY, SAMPLED, WARPED_SAMPLING], ids=["greedy", "sampled", "warped"])
@pytest.mark.parametrize("make", [make_qwen3, make_llama], ids=["qwen3", "llama"])
def test_static_cache_generate_equals_the_loop(make, spec, tiny_tokenizer):
    model = no_eos(make())
    loop = generate(model, tiny_tokenizer, PROMPTS, spec, batch_size=3, seed=5, desc="loop")
    for batch_size in (2, 5):
        static = generate(model, tiny_tokenizer, PROMPTS, spec, batch_size=batch_size, seed=5, desc="s", backend="hf_static")
        assert static == loop
    if spec.temperature:  # the seed moves every sampled completion's stream
        moved = generate(model, tiny_tokenizer, PROMPTS, spec, batch_size=5, seed=6, desc="s", backend="hf_static")
        assert [c.completion_ids for c in moved] != [c.completion_ids for c in loop]


def test_static_cache_rows_that_end_early_equal_the_loop(tiny_model_dir):
    """Rows end at different steps (EOS made likely): a static batch pads them; the cut completions,
    truncation flags and texts are the loop's, sampled and greedy."""
    model, tokenizer = load_model(str(tiny_model_dir))
    for spec in (EVAL_SAMPLING, SamplingSpec(0.0, 1.0, 0, 6)):
        loop = generate(model, tokenizer, PROMPTS + OTHERS, spec, batch_size=3, seed=11, desc="loop")
        static = generate(model, tokenizer, PROMPTS + OTHERS, spec, batch_size=4, seed=11, desc="s", backend="hf_static")
        assert static == loop
    lengths = [len(c.completion_ids) for c in generate(model, tokenizer, PROMPTS + OTHERS, EVAL_SAMPLING, 4, 11, "s")]
    if len(set(lengths)) < 3:
        pytest.fail(f"fixture assumption broken: completion lengths {lengths} should vary")


def test_static_cache_ignores_the_checkpoints_generation_config(tiny_tokenizer):
    """A checkpoint's own sampling settings and processors (repetition penalty, suppressed tokens) do
    not reach transformers' generate, as they do not reach the loop; the config is restored."""
    model = no_eos(make_qwen3())
    want = generate(model, tiny_tokenizer, PROMPTS, WARPED_SAMPLING, batch_size=5, seed=2, desc="loop")
    config = model.generation_config
    config.repetition_penalty, config.suppress_tokens = 1.8, [c.completion_ids[0] for c in want]
    config.do_sample, config.temperature, config.top_k = True, 1.7, 3
    got = generate(model, tiny_tokenizer, PROMPTS, WARPED_SAMPLING, batch_size=5, seed=2, desc="s", backend="hf_static")
    assert got == want
    assert model.generation_config is config and config.repetition_penalty == 1.8


def test_compiled_generate_equals_the_loop(tiny_tokenizer, monkeypatch):
    """hf_compiled runs the decoding forward through torch.compile (dynamo): the same tokens. The
    test compiles with dynamo's eager backend (inductor's C++ build takes minutes on CPU; the
    inductor path runs in benchmarks/gpu_check.py --smoke)."""
    import functools

    import resp.generation as generation
    from torch._dynamo.utils import counters

    monkeypatch.setattr(generation, "CompileConfig", functools.partial(generation.CompileConfig, backend="eager"))
    model = no_eos(make_qwen3())
    want = generate(model, tiny_tokenizer, PROMPTS, WARPED_SAMPLING, batch_size=5, seed=3, desc="loop")
    graphs = counters["stats"]["unique_graphs"]
    got = generate(model, tiny_tokenizer, PROMPTS, WARPED_SAMPLING, batch_size=5, seed=3, desc="c", backend="hf_compiled")
    assert got == want
    assert counters["stats"]["unique_graphs"] > graphs   # dynamo captured the decoding step


def test_backend_dispatch_and_unknown_backend(tiny_tokenizer):
    model = no_eos(make_qwen3())
    want = generate(model, tiny_tokenizer, PROMPTS[:2], GREEDY, batch_size=2, seed=0, desc="loop")
    assert generate_with_backend("hf_static", model, tiny_tokenizer, PROMPTS[:2], GREEDY, 2, 0, "s") == want
    with pytest.raises(GenerationError, match=r"generation backend 'loop' is not one of \['hf', 'hf_static', "
                                              r"'hf_compiled', 'vllm'\]"):
        generate_with_backend("loop", model, tiny_tokenizer, PROMPTS[:2], GREEDY, 2, 0, "s")


STAND_IN_VLLM = '''
"""A stand-in vllm for the worker tests: scripted token ids, no GPU."""
import json, os
from types import SimpleNamespace

SamplingParams = dict


class LLM:
    def __init__(self, **kwargs):
        print("stand-in vllm: loading", kwargs["model"])   # on stdout, as vLLM logs: must not reach the replies
        if os.environ.get("STAND_IN_FAIL"):
            raise RuntimeError(os.environ["STAND_IN_FAIL"])
        with open(os.environ["STAND_IN_RECORD"], "a") as record:
            record.write(json.dumps(kwargs, sort_keys=True) + "\\n")

    def generate(self, prompts, sampling):
        # the prompt's last 3 tokens, one token named by the seed, then the first stop token
        return [SimpleNamespace(outputs=[SimpleNamespace(
                    token_ids=p["prompt_token_ids"][-3:] + [5 + s["seed"] % 7] + s["stop_token_ids"][:1])])
                for p, s in zip(prompts, sampling)]
'''


@pytest.fixture
def vllm_environment(tmp_path, monkeypatch):
    """A separate "vLLM environment": a python that imports the stand-in vllm, named by RESP_VLLM_PYTHON."""
    import os
    import sys

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "vllm.py").write_text(STAND_IN_VLLM)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "site"}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("RESP_VLLM_PYTHON", str(python))
    monkeypatch.setenv("STAND_IN_RECORD", str(tmp_path / "llms.jsonl"))
    monkeypatch.setitem(sys.modules, "vllm", None)  # nothing here may import vllm: it is in the other environment
    assert not os.environ.get("STAND_IN_FAIL")
    return tmp_path


def test_vllm_runs_in_its_own_environment(vllm_environment, tiny_model_dir, tiny_tokenizer):
    """RESP_VLLM_PYTHON: resp/vllm_worker.py under that python serves the engine; resp tokenizes, cuts at
    EOS and decodes, as for an in-process vLLM."""
    import json

    spec = SamplingSpec(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=8)
    with VllmEngine(tiny_model_dir, 0.5) as engine:
        first = engine.generate(PROMPTS, spec, seed=10)
        second = engine.generate(PROMPTS[:2], GREEDY, seed=0)  # one engine, several passes
    [llm] = [json.loads(line) for line in (vllm_environment / "llms.jsonl").read_text().splitlines()]
    assert llm == {"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir), "revision": None,
                   "tokenizer_revision": None, "gpu_memory_utilization": 0.5}
    eos = engine.eos[0]
    for i, (prompt, completion) in enumerate(zip(PROMPTS, first)):
        ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert completion == Completion(ids, ids[-3:] + [5 + (10 + i) % 7, eos],
                                        tiny_tokenizer.decode(ids[-3:] + [5 + (10 + i) % 7], skip_special_tokens=False),
                                        truncated=False)
    assert [c.completion_ids[3] for c in second] == [5, 6]


def test_vllm_worker_failure_is_one_line(vllm_environment, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("STAND_IN_FAIL", "no CUDA device")
    with pytest.raises(GenerationError) as error:
        VllmEngine(tiny_model_dir, 0.5)
    assert str(error.value) == "the vLLM worker (RESP_VLLM_PYTHON) failed: RuntimeError: no CUDA device"


def test_vllm_python_that_is_not_a_program_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RESP_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(GenerationError) as error:
        require_vllm("evaluation.backend")
    assert str(error.value) == (f"RESP_VLLM_PYTHON={tmp_path / 'missing' / 'python'} is not an executable file: point "
                                "it at the python of the vLLM environment (e.g. /opt/vllm-env/bin/python)")
