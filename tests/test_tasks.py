"""resp.tasks: loading in the real benchmark formats, few-shot messages (evaluation only:
calibration is 0-shot), seeded calibration selection, exact error messages, answer extraction
and checking with the strict and flexible extractors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from resp import prompts
from resp.config import TaskParams
from resp.tasks import (Item, TaskError, calibration_items, extract_answer, is_correct, load_items,
                        render_prompt)

WORLD = Path(__file__).resolve().parents[1] / "data" / "world"
GSM8K_TRAIN = [
    {"question": "Tom has 3 apples. He buys 2 more. How many apples does Tom have?",
     "answer": "He has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
    {"question": "Ana has 10 pens. She loses 4. How many pens are left?",
     "answer": "Losing 4 left 10 - 4 = <<10-4=6>>6 pens.\n#### 6"},
    {"question": "Ben has 7 cards. He doubles them. How many cards?",
     "answer": "Doubling gives 7 * 2 = <<7*2=14>>14 cards.\n#### 14"},
]
GSM8K_TEST = [{"question": "Mia has 1,200 coins and spends 200. How many are left?",
               "answer": "1200 - 200 = <<1200-200=1000>>1000\n#### 1,000"}]
MATHQA_TEST = [
    {"Problem": "tom has 3 apples . how many ?", "Rationale": "\"3 apples . answer b\"",
     "options": "a ) 2 , b ) 3 , c ) 4 , d ) 5 , e ) 6", "correct": "b",
     "annotated_formula": "n0", "linear_formula": "n0", "category": "general"},
    {"Problem": "ana has 9 pens . how many ?", "Rationale": "\"9 pens . answer e\"",
     "options": "a ) 5 , b ) 6 , c ) 7 , d ) 8 , e ) 9", "correct": "e",
     "annotated_formula": "n0", "linear_formula": "n0", "category": "general"},
]


def task(source, fmt="gsm8k", few_shot=0, subset=None) -> TaskParams:
    return TaskParams(format=fmt, source=str(source), subset=subset, few_shot=few_shot,
                      calibration_split="train", eval_split="test")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def gsm8k_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_TRAIN)
    write_jsonl(tmp_path / "test.jsonl", GSM8K_TEST)
    return tmp_path


def test_gsm8k_items_exact(gsm8k_dir):
    items = load_items(task(gsm8k_dir), "train")
    assert items[0] == Item("train-0", GSM8K_TRAIN[0]["question"], "5", "He has 3 + 2 = 5 apples.", None)
    assert [i.id for i in items] == ["train-0", "train-1", "train-2"]
    assert [i.gold for i in items] == ["5", "6", "14"]
    assert items[2].rationale == "Doubling gives 7 * 2 = 14 cards."
    assert load_items(task(gsm8k_dir), "test")[0].gold == "1,000"


def test_gsm8k_messages_are_the_frozen_prompt(gsm8k_dir):
    items = load_items(task(gsm8k_dir), "train")
    assert [i.message for i in items] == [prompts.gsm8k_message(r["question"]) for r in GSM8K_TRAIN]


def test_mathqa_items_exact(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps(MATHQA_TEST, indent=4))
    items = load_items(task(tmp_path, "mathqa"), "test")
    assert items == [
        Item("test-0", "Question: tom has 3 apples . how many ?\nOptions: a ) 2 , b ) 3 , c ) 4 , d ) 5 , e ) 6\nAnswer:",
             "b", "3 apples . answer b", "a ) 2 , b ) 3 , c ) 4 , d ) 5 , e ) 6"),
        Item("test-1", prompts.mathqa_message(MATHQA_TEST[1]["Problem"], MATHQA_TEST[1]["options"]),
             "e", "9 pens . answer e", MATHQA_TEST[1]["options"]),
    ]


def test_text_items_and_single_file_source(tmp_path):
    path = tmp_path / "prose.jsonl"
    write_jsonl(path, [{"text": "The river rests."}, {"text": "A grey cat sleeps."}])
    assert load_items(task(path, "text"), "test") == [Item("test-0", "The river rests.", "", "", None),
                                                     Item("test-1", "A grey cat sleeps.", "", "", None)]


TWO_SHOT_TEST_MESSAGE = (   # the first test item after the first two train items as exemplars
    "Question: Tom has 3 apples. He buys 2 more. How many apples does Tom have?\n"
    "Answer: He has 3 + 2 = 5 apples. The answer is 5.\n\n"
    "Question: Ana has 10 pens. She loses 4. How many pens are left?\n"
    "Answer: Losing 4 left 10 - 4 = 6 pens. The answer is 6.\n\n"
    "Question: Mia has 1,200 coins and spends 200. How many are left?\n"
    "Answer:")


def test_few_shot_message_exact(gsm8k_dir):
    items = load_items(task(gsm8k_dir, few_shot=2), "test")
    assert items[0].message == TWO_SHOT_TEST_MESSAGE
    assert (items[0].id, items[0].gold) == ("test-0", "1,000")


def test_few_shot_on_train_leaves_out_the_exemplars(gsm8k_dir):
    items = load_items(task(gsm8k_dir, few_shot=2), "train")
    assert [i.id for i in items] == ["train-2"]
    assert items[0].message.endswith("Question: Ben has 7 cards. He doubles them. How many cards?\nAnswer:")


def test_few_shot_needs_gsm8k(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps(MATHQA_TEST))
    with pytest.raises(TaskError, match=r"^few_shot=1 is only defined for gsm8k tasks \(this one is mathqa\); set few_shot: 0$"):
        load_items(task(tmp_path, "mathqa", few_shot=1), "test")


def test_calibration_selection_is_seeded(tmp_path):
    write_jsonl(tmp_path / "train.jsonl",
                [{"question": f"q{i}", "answer": f"r{i}\n#### {i}"} for i in range(20)])
    first = calibration_items(task(tmp_path), 5, seed=0)
    assert [i.id for i in first] == [i.id for i in calibration_items(task(tmp_path), 5, seed=0)]
    assert [i.id for i in first] != [i.id for i in calibration_items(task(tmp_path), 5, seed=1)]
    # the definition: the first 5 of random.Random(0)'s shuffle of indices 0..19
    order = list(range(20))
    random.Random(0).shuffle(order)
    assert [i.id for i in first] == [f"train-{k}" for k in order[:5]]
    with pytest.raises(TaskError, match=r"^calibration needs 21 prompts but split 'train' of .* has 20; lower calibration.num_prompts$"):
        calibration_items(task(tmp_path), 21, seed=0)


def test_calibration_is_zero_shot_while_evaluation_keeps_few_shot(gsm8k_dir):
    """few_shot: 2 puts exemplars in front of evaluation prompts only; calibration prompts
    (self-generated traces, regeneration, gold traces) are the bare question."""
    fs = task(gsm8k_dir, few_shot=2)
    calibration = calibration_items(fs, 3, seed=0)
    order = list(range(3))
    random.Random(0).shuffle(order)
    # all three train items are candidates (the exemplars are not left out of 0-shot calibration)
    assert [i.id for i in calibration] == [f"train-{k}" for k in order]
    assert [i.message for i in calibration] == [GSM8K_TRAIN[k]["question"] for k in order]
    zero_shot = load_items(task(gsm8k_dir), "train")
    assert calibration == [zero_shot[k] for k in order]
    [evaluation] = load_items(fs, "test")
    assert evaluation.message == TWO_SHOT_TEST_MESSAGE
    assert fs.few_shot == 2  # the task params are not changed by calibration_items


def test_render_prompt_uses_chat_template(tiny_tokenizer):
    assert render_prompt(tiny_tokenizer, "2+2?") == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tiny_tokenizer, "2+2?", enable_thinking=False).endswith("assistant\n<think>\n\n</think>\n\n")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(GSM8K_TRAIN[0]) + "\n{not json\n")
    with pytest.raises(TaskError, match=rf"^{path}:2: not valid JSON \(Expecting property name enclosed in double quotes\); fix or regenerate the file$"):
        load_items(task(tmp_path), "test")


def test_missing_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "test.jsonl"
    write_jsonl(path, [GSM8K_TRAIN[0], {"question": "no answer here"}])
    with pytest.raises(TaskError, match=rf"^{path}:2: missing key 'answer' \(gsm8k records need question, answer\)$"):
        load_items(task(tmp_path), "test")


def test_missing_final_answer_line(tmp_path):
    path = tmp_path / "test.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "no final line"}])
    with pytest.raises(TaskError, match=rf"^{path}:1: 'answer' has no '#### <number>' final answer line$"):
        load_items(task(tmp_path), "test")


def test_json_array_missing_key_names_record_index(tmp_path):
    path = tmp_path / "test.json"
    broken = [MATHQA_TEST[0], {k: v for k, v in MATHQA_TEST[1].items() if k != "correct"}]
    path.write_text(json.dumps(broken, indent=4))
    with pytest.raises(TaskError, match=rf"^{path} record 1: missing key 'correct' \(mathqa records need Problem, Rationale, options, correct\)$"):
        load_items(task(tmp_path, "mathqa"), "test")


def test_missing_split_file_and_missing_source(tmp_path):
    with pytest.raises(TaskError, match=rf"^{tmp_path}/test.json not found: a mathqa task directory holds one .json file per split \(e.g. train.json, test.json\)$"):
        load_items(task(tmp_path, "mathqa"), "test")
    missing = tmp_path / "nowhere"
    with pytest.raises(TaskError, match=rf"^task source {missing} not found: give a directory holding \{{split\}}.jsonl files, a .jsonl/.json file, or a hub dataset id$"):
        load_items(task(missing), "test")


def test_hub_source_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(source, subset, split):
        calls.append((source, subset, split))
        return GSM8K_TRAIN[:2]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = load_items(task("openai/gsm8k", subset="main"), "train")
    assert calls == [("openai/gsm8k", "main", "train")]
    assert [(i.id, i.gold, i.message) for i in items] == [("train-0", "5", GSM8K_TRAIN[0]["question"]),
                                                          ("train-1", "6", GSM8K_TRAIN[1]["question"])]


def test_world_files_load_through_the_same_path():
    """The committed embedded-world files read as GSM8K / MathQA."""
    arith = load_items(task(WORLD / "arith"), "test")
    choice = load_items(task(WORLD / "choice", "mathqa"), "test")
    assert len(arith) >= 500 and len(choice) >= 500
    assert all(i.gold.isdigit() and "<<" not in i.rationale for i in arith)
    assert all(i.gold in "abcde" and i.message.startswith("Question: ") for i in choice)


# (completion, strict answer, flexible answer)
GSM8K_CASES = [
    ("<think>\n23+14=37\n37-9=28\n</think>\n\nThe answer is 28.", "28", "28"),
    ("<think>\nThe answer is 3\n</think>\n\nI get 4 in the end", None, "4"),    # only after the last </think>
    ("<think>\n23+14=37\n37-9=28", None, "28"),           # cut inside its thinking: strict wrong, flexible right
    ("23+14=37\n37-9=28", None, "28"),                     # no think block, nothing stated: flexible only
    ("23+14=37\nThe answer is 28.", "28", "28"),            # no think block (no thinking mode): read whole
    ("<think>\nx\n</think>\nThe answer is $1,250.50 in total.", "1250.50", "1250.50"),
    ("<think>\nx\n</think>\nThe answer is -7. Then 9 more.", "-7", "-7"),   # stated answer beats last number
    ("<think>\nx\n</think>\nso the balance is -5", None, "-5"),           # nothing stated: flexible only
    ("<think>\nx\n</think>\n37-9", None, "9"),             # a minus between operands is no sign
    ("<think>\nx\n</think>\nThe answer is 1,000,000", "1000000", "1000000"),
    ("<think>\nx\n</think>\nFinal answer: 42", "42", "42"),
    ("<think>\nx\n</think>\nSo we get $\\boxed{1,234}$.", "1234", "1234"),
    ("<think>\nx\n</think>\nThe answer is \\boxed{18}.", "18", "18"),
    ("<think>\nx\n</think>\nThe answer is unclear.\nMaybe 12", None, "12"),  # strict reads the stated line only
    ("<think>\nThe answer is 5\n</think>\n", None, None),
    ("no number here", None, None),
]
MATHQA_CASES = [
    ("<think>\n4+2=6\n</think>\n\nThe answer is (b).", "b", "b"),
    ("<think>\nx\n</think>\nThe answer is (B)", "b", "b"),
    ("<think>\nx\n</think>\nAnswer: e", "e", "e"),
    ("<think>\nx\n</think>\nanswer c", None, "c"),       # no "is"/":": not stated for strict
    ("<think>\nx\n</think>\n(a) looks wrong, so (d)", None, "d"),
    ("The answer is (b).", "b", "b"),                        # no thinking block at all: read whole
    ("<think>\nThe answer is (a)", None, "a"),               # cut inside its thinking
    ("<think>\nx\n</think>\nThe answer is because of the rules", None, None),
    ("<think>\nThe answer is (a)\n</think>\n\nnone", None, None),
]


@pytest.mark.parametrize("text,strict,flexible", GSM8K_CASES)
def test_extract_gsm8k(text, strict, flexible):
    assert extract_answer("gsm8k", text, extractor="strict") == strict
    assert extract_answer("gsm8k", text, extractor="flexible") == flexible


@pytest.mark.parametrize("text,strict,flexible", MATHQA_CASES)
def test_extract_mathqa(text, strict, flexible):
    assert extract_answer("mathqa", text, extractor="strict") == strict
    assert extract_answer("mathqa", text, extractor="flexible") == flexible


def test_cut_off_thinking_strict_wrong_flexible_right():
    cut = "<think>\nTom has 23. 23+14=37\n37-9=28"                 # max_new_tokens hit mid-thinking
    assert not is_correct("gsm8k", cut, "28", extractor="strict")
    assert is_correct("gsm8k", cut, "28", extractor="flexible")
    done = cut + "\n</think>\n\nThe answer is 28."
    assert is_correct("gsm8k", done, "28", extractor="strict") and is_correct("gsm8k", done, "28", extractor="flexible")
    options = "a ) 12 , b ) 28 , c ) 37 , d ) 9 , e ) 5"
    assert not is_correct("mathqa", cut, "b", options, extractor="strict")
    assert is_correct("mathqa", cut, "b", options, extractor="flexible")   # its last number 28 is option b
    assert is_correct("mathqa", done, "b", options, extractor="strict")


def test_unknown_extractor():
    with pytest.raises(TaskError, match=r"^extractor 'lenient' is unknown; use strict or flexible$"):
        extract_answer("gsm8k", "The answer is 1.", extractor="lenient")


@pytest.mark.parametrize("extractor", ["strict", "flexible"])
def test_is_correct(extractor):
    def ok(fmt, answer, gold):
        return is_correct(fmt, "<think>\nx\n</think>\n\n" + answer, gold, extractor=extractor)

    assert ok("gsm8k", "The answer is 1000.", "1,000")
    assert ok("gsm8k", "The answer is 28.0", "28")
    assert ok("gsm8k", "The answer is $18.", "18")
    assert ok("gsm8k", "The answer is 0.50", ".5")              # numeric equivalence (math-verify)
    assert not ok("gsm8k", "The answer is 27.", "28")
    assert not ok("gsm8k", "no number", "28")
    assert ok("mathqa", "The answer is (B).", "b")
    assert not ok("mathqa", "The answer is (c).", "b")
    with pytest.raises(TaskError, match=r"^format 'text' has no answers to check; use gsm8k or mathqa$"):
        is_correct("text", "anything", "", extractor=extractor)


@pytest.mark.parametrize("extractor", ["strict", "flexible"])
def test_embedded_model_style_is_scored_right(extractor):
    """The embedded model's own completions (resp.world) are judged correct against the gold
    the loader reads from the same problem's GSM8K / MathQA record, and wrong against another,
    by both extractors."""
    from resp.world import problems as world

    rng = random.Random(0)
    for _ in range(200):
        problem = world.make_problem(rng)
        record = world.mathqa_record(problem, rng)
        gold = world.gsm8k_record(problem)["answer"].rsplit("#### ", 1)[1]
        assert is_correct("gsm8k", world.own_style_completion(problem), gold, extractor=extractor)
        assert not is_correct("gsm8k", world.own_style_completion(problem), str(problem.answer + 1), extractor=extractor)
        assert is_correct("mathqa", world.own_style_completion(problem, record["correct"]), record["correct"],
                          extractor=extractor)
        wrong = "abcde"[("abcde".index(record["correct"]) + 1) % 5]
        assert not is_correct("mathqa", world.own_style_completion(problem, wrong), record["correct"], extractor=extractor)


@pytest.mark.parametrize("extractor", ["strict", "flexible"])
def test_mathqa_value_answer_selects_the_option_holding_it(extractor):
    """A stated final number (the embedded model's value-style choice answer) selects the
    option with that value; a letter, when stated, wins; ambiguity or no match gives None."""
    options = "a ) 12 , b ) 28 , c ) 1,200 , d ) 28 , e ) 7"
    think = "<think>\n3*4=12\n</think>\n\n"

    def extract(answer, opts=options):
        return extract_answer("mathqa", think + answer, opts, extractor=extractor)

    assert extract("The answer is 12.") == "a"
    assert extract("The answer is 1200.") == "c"
    assert extract("The answer is 28.") is None        # two options hold 28
    assert extract("The answer is 99.") is None
    assert extract("The answer is (e), i.e. 12.") == "e"
    assert extract("The answer is 12.", None) is None   # no options: no mapping
    assert is_correct("mathqa", think + "The answer is 7.", "e", options, extractor=extractor)
    assert not is_correct("mathqa", think + "The answer is 7.", "a", options, extractor=extractor)


def test_mathqa_value_counts_for_strict_unless_thinking_was_cut():
    options = "a ) 12 , b ) 45 , c ) 1,200 , d ) 28 , e ) 7"
    assert extract_answer("mathqa", "The answer is 45.", options, extractor="flexible") == "b"
    assert extract_answer("mathqa", "The answer is 45.", options, extractor="strict") == "b"   # a model that never thinks
    assert extract_answer("mathqa", "<think>\n40+5=45\nThe answer is 45.", options, extractor="strict") is None
    assert extract_answer("mathqa", "<think>\n40+5=45\n</think>\n\nThe answer is 45.", options, extractor="strict") == "b"


def test_value_style_choice_completions_are_correct():
    from resp.world import problems as world

    rng = random.Random(1)
    for _ in range(200):
        problem = world.make_problem(rng)
        record = world.mathqa_record(problem, rng)
        for extractor in ("strict", "flexible"):
            assert is_correct("mathqa", world.own_style_completion(problem), record["correct"], record["options"],
                              extractor=extractor)
