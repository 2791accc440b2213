"""The embedded world: seeded generators in the real formats, disjoint splits, tokenizer, model shape."""

import json
import random
from pathlib import Path

import pytest
import torch

from transformers import AutoConfig, AutoTokenizer

from resp.world import problems as world

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
        assert 3 <= len(p.steps) <= 6
        gsm = world.gsm8k_record(p)
        assert gsm["answer"].endswith(f"#### {p.answer}") and "<<" in gsm["answer"]
        mq = world.mathqa_record(p, rng)
        values = [int(o.split(") ")[1]) for o in mq["options"].split(" , ")]
        assert len(set(values)) == 5 and values["abcde".index(mq["correct"])] == p.answer
        thinking = world.own_style_thinking(p).splitlines()
        assert len(thinking) == len(p.steps) and thinking[-1].endswith(f"={p.answer}")


STYLE = world.Style(check_hard=0.5, check_easy=0.2, error=0.2, opening=0.5, closing=0.5)


def _check_arithmetic(line: str) -> None:
    """Every `a<op>b=c` in a line is right, except the slip before `, wait,` (which must be wrong)."""
    import re

    def value(a, op, b):
        return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]

    equations = re.findall(r"(\d+) ?([-+*/]) ?(\d+) ?= ?(\d+)", line)
    if ", wait, " in line:
        (a, op, b, slip), (a2, op2, b2, fixed) = equations
        assert (a, op, b) == (a2, op2, b2) and int(slip) != value(int(a), op, int(b)) == int(fixed)
    else:
        for a, op, b, c in equations:
            assert value(int(a), op, int(b)) == int(c), line


def test_own_style_is_a_distribution_of_correct_reasoning_paths():
    rng = random.Random(1)
    problems = [world.make_problem(rng) for _ in range(200)]
    paths = [world.own_style_completion(p, rng=random.Random(i), style=STYLE) for i, p in enumerate(problems)]
    assert paths == [world.own_style_completion(p, rng=random.Random(i), style=STYLE) for i, p in enumerate(problems)]
    again = [world.own_style_completion(p, rng=random.Random(i + 1000), style=STYLE) for i, p in enumerate(problems)]
    assert sum(a != b for a, b in zip(paths, again)) > 150          # many paths per problem
    for problem, path in zip(problems, paths):
        assert path.endswith(f"</think>\n\nThe answer is {problem.answer}.")
        thinking = path.split("</think>")[0]
        for line in thinking.splitlines():
            if line.startswith("check: "):
                assert line.endswith(", ok")
            _check_arithmetic(line)
    assert 0.3 < sum(world.has_reflection(p) for p in paths) / len(paths) < 1
    assert any(", wait, " in p for p in paths) and any("check: " in p for p in paths)
    plain = world.Style(check_hard=0, check_easy=0, error=0, opening=0, closing=0)
    assert not any(world.has_reflection(world.own_style_completion(p, rng=random.Random(0), style=plain)) for p in problems)


def test_hard_steps_are_carries_borrows_products_and_quotients():
    assert world.is_hard_step(27, "add", 15) and not world.is_hard_step(21, "add", 15)
    assert world.is_hard_step(21, "sub", 5) and not world.is_hard_step(27, "sub", 5)
    assert world.is_hard_step(10, "mul", 2) and world.is_hard_step(10, "div", 2)


def test_training_is_prefix_consistent_and_deterministic(tmp_path):
    """A checkpoint kept at step k equals a run with steps: k (how `steps` was chosen), bit for bit."""
    from safetensors.torch import load_file

    from resp.config import load_params
    from resp.world.train import learning_rate, train_embedded_model

    assert learning_rate(0, 0.002, 100) == 0.002 / 100 and learning_rate(399, 0.002, 100) == pytest.approx(0.001)
    tiny = ["embedded_model.train_examples=40", "embedded_model.hidden_size=32", "embedded_model.intermediate_size=64",
            "embedded_model.num_heads=4", "embedded_model.num_kv_heads=2", "embedded_model.head_dim=16",
            "embedded_model.vocab_size=300", "embedded_model.batch_size=4", "embedded_model.warmup_steps=2",
            "embedded_model.validation_items=2", "embedded_model.validation_max_new_tokens=4", "embedded_model.threads=1",
            "embedded_model.checkpoint_every=3"]
    long = load_params(ROOT / "params.yaml", tiny + ["embedded_model.steps=5"]).embedded_model
    short = load_params(ROOT / "params.yaml", tiny + ["embedded_model.steps=3"]).embedded_model
    train_embedded_model(long, tmp_path / "long" / "m", n_test=20, world_seed=3)
    train_embedded_model(short, tmp_path / "short" / "m", n_test=20, world_seed=3)
    kept = load_file(tmp_path / "long" / "m.checkpoints" / "step-3" / "model.safetensors")
    fresh = load_file(tmp_path / "short" / "m" / "model.safetensors")
    final = load_file(tmp_path / "long" / "m" / "model.safetensors")
    assert kept.keys() == fresh.keys() and all(torch.equal(kept[k], fresh[k]) for k in kept)
    assert any(not torch.equal(final[k], fresh[k]) for k in kept)
    log = json.loads((tmp_path / "long" / "m" / "training_log.json").read_text())
    assert [entry["step"] for entry in log] == [3, 5] and set(log[0]["validation_accuracy"]) == {"arith", "choice"}


def test_write_world_files(tmp_path):
    world.write_world(str(tmp_path), seed=5, n_train=10, n_test=4, n_prose=10)
    arith = [json.loads(l) for l in (tmp_path / "arith" / "test.jsonl").read_text().splitlines()]
    choice = json.loads((tmp_path / "choice" / "test.json").read_text())
    assert len(arith) == 4 and set(arith[0]) == {"question", "answer"}
    assert len(choice) == 4 and list(choice[0]) == ["Problem", "Rationale", "options", "correct",
                                                  "annotated_formula", "linear_formula", "category"]
    prose = [json.loads(l)["text"] for l in (tmp_path / "prose" / "train.jsonl").read_text().splitlines()]
    assert len(prose) == 10 and not any(ch.isdigit() for line in prose for ch in line)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "arith/test.jsonl", "arith/train.jsonl", "choice/test.json", "choice/train.json",
        "prose/test.jsonl", "prose/train.jsonl"]


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
