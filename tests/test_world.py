"""The embedded world: seeded generators in the real formats, disjoint splits, tokenizer, model shape."""

import json
import random
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from resp.world import tasks as world

ROOT = Path(__file__).resolve().parent.parent


def test_generators_are_seeded_and_splits_disjoint():
    a_train, a_test = world.make_splits(3, 200, 50)
    b_train, b_test = world.make_splits(3, 200, 50)
    assert [p.question for p in a_train] == [p.question for p in b_train]
    assert {p.content_key for p in a_train}.isdisjoint({p.content_key for p in a_test})
    assert len({p.content_key for p in a_test}) == 50


def test_problem_arithmetic_and_formats():
    rng = random.Random(0)
    for _ in range(300):
        p = world.make_problem(rng)
        value = p.start
        for op, b, result in p.steps:
            value = {"add": value + b, "sub": value - b, "mul": value * b, "div": value // b}[op]
            assert value == result and 1 <= value <= world.MAX_VALUE
        assert 2 <= len(p.steps) <= 5
        gsm = world.gsm8k_record(p)
        assert gsm["answer"].endswith(f"#### {p.answer}") and "<<" in gsm["answer"]
        mq = world.mathqa_record(p, rng)
        values = [int(o.split(") ")[1]) for o in mq["options"].split(" , ")]
        assert len(set(values)) == 5 and values["abcde".index(mq["correct"])] == p.answer
        thinking = world.own_style_thinking(p).splitlines()
        assert len(thinking) == len(p.steps) and thinking[-1].endswith(f"={p.answer}")


def test_write_world_files(tmp_path):
    world.write_world(str(tmp_path), seed=5, n_train=10, n_test=4, n_prose=10)
    arith = [json.loads(l) for l in (tmp_path / "arith" / "test.jsonl").read_text().splitlines()]
    choice = json.loads((tmp_path / "choice" / "test.json").read_text())
    assert len(arith) == 4 and set(arith[0]) == {"question", "answer"}
    assert len(choice) == 4 and list(choice[0]) == ["Problem", "Rationale", "options", "correct",
                                                  "annotated_formula", "linear_formula", "category"]
    prose = [json.loads(l)["text"] for l in (tmp_path / "prose" / "train.jsonl").read_text().splitlines()]
    assert len(prose) == 10 and not any(ch.isdigit() for line in prose for ch in line)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_committed_tokenizer_and_model_shape():
    path = ROOT / "data" / "models" / "tiny"
    tok = AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "Tom has 12 apples."}]
    on = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True, tokenize=False)
    off = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert on == "<|im_start|>user\nTom has 12 apples.<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    assert tok.tokenize("123") == ["1", "2", "3"]                   # one token per digit
    assert tok.decode(tok("Janet’s ducks lay 16 eggs")["input_ids"]) == "Janet’s ducks lay 16 eggs"  # byte-level
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen3" and config.num_hidden_layers >= 6
    assert config.num_attention_heads // config.num_key_value_heads >= 2
    assert config.head_dim * config.num_attention_heads != config.hidden_size
