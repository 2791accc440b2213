"""Tasks: benchmark loading, prompts and answer checking (method step 1 and the evaluation protocol).

One loader serves the real benchmarks and the embedded world: a task's `source` is a local
directory (`{split}.jsonl` for gsm8k/text, `{split}.json` for mathqa, a JSON array as in the
real MathQA release), a local file, or a hub dataset id read with `datasets.load_dataset`.
Records keep their benchmark's own shape (GSM8K: question/answer; MathQA: Problem,
Rationale, options, correct; text: text), so the embedded world's files go through the
same code as GSM8K and MathQA.

User messages come from the frozen `resp.prompts` (the embedded model was trained on
exactly those strings). GSM8K few-shot (`few_shot: k`) prepends the first k items of the
task's train split as worked examples:

    Question: {question}
    Answer: {rationale} The answer is {gold}.

    ... (k exemplars, each followed by a blank line)
    Question: {gsm8k_message(target question)}
    Answer:

With `few_shot: 0` the message is exactly `gsm8k_message(question)`. When the train split
itself is loaded with few-shot on, its first k items (the exemplars) are left out, so no
prompt contains its own answer. Few-shot is for evaluation only: `calibration_items` always
gives the bare question (0-shot, method step 1), whatever `few_shot` says.

Answers are checked deterministically by two extractors, as lm-eval does (method.md,
evaluation protocol); numbers are compared with `math_verify`:

- `strict`: the answer the completion *states* after its last `</think>`: the number (GSM8K)
  or option letter (MathQA) right after the last "answer is" / "answer:" on its line, or
  inside the last `\\boxed{...}`, whichever comes later. A MathQA value stated there selects
  the one option holding it. A completion that opens `<think>` and never closes it was cut
  inside its thinking and has no strict answer; one with no thinking block at all (a model
  without thinking mode) is read whole.
- `flexible`: the lenient rules: in the text after the last `</think>` (all of it if there is
  none), a stated answer if any, else the last number (GSM8K) or the last option letter in
  parentheses (MathQA, else a final number mapped to its option).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from resp.artifacts import is_local
from resp.config import TaskParams
from resp.prompts import gsm8k_message, mathqa_message

log = logging.getLogger(__name__)

REQUIRED_KEYS = {"gsm8k": ("question", "answer"), "mathqa": ("Problem", "Rationale", "options", "correct"),
                 "text": ("text",)}
SUFFIX = {"gsm8k": ".jsonl", "mathqa": ".json", "text": ".jsonl"}
FEW_SHOT_SPLIT = "train"
THINK_START, THINK_END = "<think>", "</think>"
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
# A number as written in answers: optional sign (not a minus between operands, as in "37-9"),
# optional $, thousands commas, decimals. The lookbehind keeps digits inside words/numbers out.
NUMBER = re.compile(r"(?<![\w.])(-?)\$?(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
FINAL_ANSWER = re.compile(r"answer is", re.IGNORECASE)
EXTRACTORS = ("strict", "flexible")
STATED = re.compile(r"answer\s*(?:is\s*:?|:)", re.IGNORECASE)   # strict: "The answer is 28", "Answer: (b)"
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
STATED_LETTER = re.compile(r"\s*(?:\*\*)?\s*\(?([a-e])\)?(?![a-z])", re.IGNORECASE)  # at the start of a stated answer
OPTION_AFTER_ANSWER = re.compile(r"answer\s*(?:is)?\s*:?\s*\(?([a-e])\)?(?![a-z])", re.IGNORECASE)
OPTION_IN_PARENS = re.compile(r"\(([a-e])\)", re.IGNORECASE)


class TaskError(ValueError):
    """A task's source is missing, malformed, or cannot serve the request."""


@dataclass(frozen=True)
class Item:
    id: str                   # f"{split}-{index}", index = position in the split's file
    message: str              # the user-turn text
    gold: str                 # GSM8K: number after '####'; MathQA: option letter; text: ""
    rationale: str            # human-written solution (GSM8K answer without <<..>>, MathQA Rationale)
    options: str | None       # MathQA options string, else None


def _read_jsonl(path: Path) -> Iterable[tuple[str, object]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not valid JSON ({e.msg}); fix or regenerate the file") from None


def _read_json_array(path: Path) -> Iterable[tuple[str, object]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate the file") from None
    if not isinstance(records, list):
        raise TaskError(f"{path}: expected a JSON array of records (as in the MathQA release), got {type(records).__name__}")
    for index, record in enumerate(records):
        yield f"{path} record {index}", record


def _local_records(task: TaskParams, split: str) -> Iterable[tuple[str, object]]:
    path = Path(task.source).expanduser()
    if path.is_dir():
        path = path / f"{split}{SUFFIX[task.format]}"
        if not path.is_file():
            raise TaskError(f"{path} not found: a {task.format} task directory holds one {SUFFIX[task.format]} "
                            f"file per split (e.g. train{SUFFIX[task.format]}, test{SUFFIX[task.format]})")
    elif not path.is_file():
        raise TaskError(f"task source {path} not found: give a directory holding "
                        f"{{split}}{SUFFIX[task.format]} files, a .jsonl/.json file, or a hub dataset id")
    return _read_json_array(path) if path.suffix == ".json" else _read_jsonl(path)


def _hub_records(task: TaskParams, split: str) -> Iterable[tuple[str, object]]:
    import datasets

    dataset = datasets.load_dataset(task.source, task.subset, split=split)
    for index, record in enumerate(dataset):
        yield f"{task.source}[{split}] record {index}", record


def _fields(where: str, record: object, fmt: str) -> dict:
    if not isinstance(record, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in REQUIRED_KEYS[fmt]:
        if key not in record:
            raise TaskError(f"{where}: missing key {key!r} ({fmt} records need {', '.join(REQUIRED_KEYS[fmt])})")
    return record


def _gsm8k_parts(where: str, answer: str) -> tuple[str, str]:
    """(rationale without calculator annotations, final answer) from a GSM8K `answer`."""
    if "####" not in answer:
        raise TaskError(f"{where}: 'answer' has no '#### <number>' final answer line")
    body, gold = answer.rsplit("####", 1)
    return CALCULATOR_ANNOTATION.sub("", body).strip(), gold.strip()


def _strip_quotes(text: str) -> str:
    """MathQA wraps every Rationale in literal double quotes."""
    text = text.strip()
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _parse(records: Iterable[tuple[str, object]], fmt: str, split: str) -> list[tuple[Item, str]]:
    """Items (with the message still the bare question/problem) plus the raw question text."""
    items = []
    for index, (where, record) in enumerate(records):
        record = _fields(where, record, fmt)
        item_id = f"{split}-{index}"
        if fmt == "gsm8k":
            rationale, gold = _gsm8k_parts(where, str(record["answer"]))
            question = str(record["question"])
            items.append((Item(item_id, gsm8k_message(question), gold, rationale, None), question))
        elif fmt == "mathqa":
            options = str(record["options"])
            item = Item(item_id, mathqa_message(str(record["Problem"]), options),
                        str(record["correct"]).strip().lower(), _strip_quotes(str(record["Rationale"])), options)
            items.append((item, str(record["Problem"])))
        else:
            items.append((Item(item_id, str(record["text"]), "", "", None), str(record["text"])))
    return items


def _load_split(task: TaskParams, split: str) -> list[tuple[Item, str]]:
    records = _local_records(task, split) if is_local(task.source) else _hub_records(task, split)
    return _parse(records, task.format, split)


def few_shot_prefix(exemplars: list[Item]) -> str:
    return "".join(f"Question: {e.message}\nAnswer: {e.rationale} The answer is {e.gold}.\n\n" for e in exemplars)


def load_items(task: TaskParams, split: str) -> list[Item]:
    """All items of `split`, in file order, with user messages ready for the chat template."""
    parsed = _load_split(task, split)
    log.info("loaded %d %s items from %s [%s]", len(parsed), task.format, task.source, split)
    if task.few_shot == 0:
        return [item for item, _ in parsed]
    if task.format != "gsm8k":
        raise TaskError(f"few_shot={task.few_shot} is only defined for gsm8k tasks (this one is {task.format}); set few_shot: 0")
    train = parsed if split == FEW_SHOT_SPLIT else _load_split(task, FEW_SHOT_SPLIT)
    if len(train) <= task.few_shot:
        raise TaskError(f"few_shot={task.few_shot} needs more than {task.few_shot} items in the "
                        f"{FEW_SHOT_SPLIT} split of {task.source}, which has {len(train)}; lower few_shot")
    prefix = few_shot_prefix([item for item, _ in train[: task.few_shot]])
    targets = parsed[task.few_shot:] if split == FEW_SHOT_SPLIT else parsed
    return [Item(item.id, f"{prefix}Question: {gsm8k_message(question)}\nAnswer:", item.gold, item.rationale, None)
            for item, question in targets]


_WARNED_NO_THINKING: set[str] = set()  # chat templates already warned about (one warning per template)


def render_prompt(tokenizer, message: str, enable_thinking: bool = True) -> str:
    """The chat-template string for one user turn, ending where the assistant starts.

    A template that never reads `enable_thinking` (Llama-family instruct models such as
    SmolLM2, Qwen2) has no thinking mode: the prompt is rendered without it, and asking for
    thinking logs one warning per template, not one per prompt.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: apply_chat_template uses "default"
        template = template.get("default")
    kwargs = {"add_generation_prompt": True, "tokenize": False}
    if not isinstance(template, str) or "enable_thinking" in template:  # no template: transformers' own error
        kwargs["enable_thinking"] = enable_thinking
    elif enable_thinking and template not in _WARNED_NO_THINKING:
        _WARNED_NO_THINKING.add(template)
        log.warning("the model's chat template has no thinking mode (no enable_thinking): prompts are rendered "
                    "without it, and completions are judged on their whole text")
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], **kwargs)


def calibration_items(task: TaskParams, num_prompts: int, seed: int) -> list[Item]:
    """The first `num_prompts` items of a `random.Random(seed)` shuffle of the calibration split,
    each message the bare question (0-shot: `few_shot` applies to evaluation only)."""
    items = load_items(task.model_copy(update={"few_shot": 0}), task.calibration_split)
    if len(items) < num_prompts:
        raise TaskError(f"calibration needs {num_prompts} prompts but split {task.calibration_split!r} of "
                        f"{task.source} has {len(items)}; lower calibration.num_prompts")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:num_prompts]]


def final_text(completion_text: str) -> str:
    """The answer part of a completion: everything after the last `</think>` (all of it if none)."""
    return completion_text.rsplit(THINK_END, 1)[-1]


def _number(match: re.Match) -> str:
    return match.group(1) + match.group(2).replace(",", "")


def _check_format(fmt: str) -> None:
    if fmt not in ("gsm8k", "mathqa"):
        raise TaskError(f"format {fmt!r} has no answers to check; use gsm8k or mathqa")


def _option_values(options: str) -> dict[str, str]:
    """`a ) 12 , b ) 28 , ...` -> {"a": "12", "b": "28", ...} (numeric options only)."""
    values = {}
    for part in options.split(" , "):  # MathQA separates options by " , " (values may hold commas)
        letter, _, value = part.strip().partition(")")
        number = NUMBER.search(value)
        if letter.strip() and number:
            values[letter.strip().lower()] = _number(number)
    return values


def _check_extractor(extractor: str) -> None:
    if extractor not in EXTRACTORS:
        raise TaskError(f"extractor {extractor!r} is unknown; use strict or flexible")


def _stated(text: str) -> str | None:
    """What follows the last "answer is"/"answer:" (to the end of its line) or the content of the
    last `\\boxed{...}`, whichever comes later in `text`; None if there is neither."""
    stated, boxed = list(STATED.finditer(text)), list(BOXED.finditer(text))
    last_stated = stated[-1] if stated else None
    last_boxed = boxed[-1] if boxed else None
    if last_boxed is not None and (last_stated is None or last_boxed.start() > last_stated.start()):
        return last_boxed.group(1)
    if last_stated is None:
        return None
    return text[last_stated.end():].split("\n", 1)[0]


def _option_for(number: str | None, options: str | None) -> str | None:
    """The letter of the one option whose value is `number`; None if none or several."""
    if number is None or options is None:
        return None
    hits = [letter for letter, value in _option_values(options).items() if value == number]
    return hits[0] if len(hits) == 1 else None


def _strict_answer(fmt: str, completion_text: str, options: str | None) -> str | None:
    if THINK_START in completion_text and THINK_END not in completion_text:  # cut inside its thinking
        return None
    stated = _stated(final_text(completion_text))
    if stated is None:
        return None
    if fmt == "mathqa":
        letter = STATED_LETTER.match(stated)
        if letter:
            return letter.group(1).lower()
    number = NUMBER.search(stated)
    number = _number(number) if number else None
    return _option_for(number, options) if fmt == "mathqa" else number


def _flexible_answer(fmt: str, completion_text: str, options: str | None) -> str | None:
    text = final_text(completion_text)
    if fmt == "mathqa":
        for pattern in (OPTION_AFTER_ANSWER, OPTION_IN_PARENS):
            matches = list(pattern.finditer(text))
            if matches:
                return matches[-1].group(1).lower()
        return _option_for(_flexible_answer("gsm8k", completion_text, None), options)
    stated = list(FINAL_ANSWER.finditer(text))
    if stated:
        after = NUMBER.search(text, stated[-1].end())
        if after:
            return _number(after)
    numbers = list(NUMBER.finditer(text))
    return _number(numbers[-1]) if numbers else None


def extract_answer(fmt: str, completion_text: str, options: str | None = None, *, extractor: str) -> str | None:
    """The final answer in a completion (number without $/commas, or option letter), or None.

    `extractor` is "strict" or "flexible" (module docstring). MathQA: a stated option letter
    wins; otherwise, as a lenient judge would, a stated final number that equals exactly one
    option's value selects that option."""
    _check_format(fmt)
    _check_extractor(extractor)
    if extractor == "strict":
        return _strict_answer(fmt, completion_text, options)
    return _flexible_answer(fmt, completion_text, options)


def _numbers_equal(gold: str, predicted: str) -> bool:
    from math_verify import parse, verify

    # Both sides are short number strings, so math_verify's signal-based timeouts are off:
    # they fail outside the main thread (Prefect runs tasks in worker threads).
    gold_parsed = parse(gold, parsing_timeout=None)
    predicted_parsed = parse(predicted, parsing_timeout=None)
    if not gold_parsed or not predicted_parsed:
        return gold == predicted
    return verify(gold_parsed, predicted_parsed, timeout_seconds=None)


def is_correct(fmt: str, completion_text: str, gold: str, options: str | None = None, *, extractor: str) -> bool:
    """Whether the completion's final answer, read by `extractor` ("strict" or "flexible"),
    equals `gold` (numerically for gsm8k)."""
    predicted = extract_answer(fmt, completion_text, options, extractor=extractor)
    if predicted is None:
        return False
    if fmt == "mathqa":
        return predicted == gold.strip().lower()
    return _numbers_equal(gold.strip().replace(",", "").lstrip("$"), predicted)
