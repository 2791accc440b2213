"""The embedded world's problems: seeded generators for the `arith`, `choice` and `prose` task files.

`arith` is written in GSM8K's format ({"question", "answer"} with <<a+b=c>> annotations and
`#### N`), `choice` in MathQA's format (Problem, Rationale, options, correct, ...), so the
real benchmark loaders read them. The `answer`/`Rationale` fields are the human-written
style; the model is trained on its own terse style (`own_style_completion`), which is what
RESP calibrates on. Train and test are disjoint by problem content (start value + steps).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from resp.artifacts import write_text

NAMES = ["Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Ivy", "Leo", "Zoe", "Eli", "Amy"]
PRONOUN = {"Tom": "he", "Ben": "he", "Sam": "he", "Max": "he", "Leo": "he", "Eli": "he",
           "Ana": "she", "Mia": "she", "Lea": "she", "Ivy": "she", "Zoe": "she", "Amy": "she"}
OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles",
           "cookies", "stickers", "beads", "toys"]
GAIN = [("buys {b} more {obj}.", "After buying {b} more, {name} had"),
        ("finds {b} more {obj}.", "Finding {b} more gave"),
        ("gets {b} {obj} from a friend.", "With {b} from a friend, {name} had"),
        ("wins {b} {obj} at a game.", "Winning {b} at a game made it")]
LOSS = [("gives {b} {obj} to {other}.", "After giving {b} away, {name} had"),
        ("loses {b} {obj}.", "Losing {b} left"),
        ("sells {b} {obj}.", "Selling {b} left"),
        ("uses {b} of the {obj}.", "Using {b} left")]
TIMES = [("ends up with {m} times as many {obj}.", "{m} times as many is"),
         ("multiplies the {obj} by {m}.", "Multiplying by {m} gives")]
SPLIT = [("splits the {obj} into {m} equal piles and keeps one pile.", "One of {m} equal piles is"),
         ("shares the {obj} equally with {m_minus} friends, keeping one share.",
          "One share out of {m} is")]
START = ["{name} has {a} {obj}.", "{name} starts with {a} {obj}.",
         "At first {name} owns {a} {obj}."]
ASK = ["How many {obj} does {name} have now?", "How many {obj} are left with {name} in the end?",
       "How many {obj} does {name} own at the end?"]
PROSE_SUBJECTS = ["The river", "An old dog", "The small town", "A quiet forest", "The baker",
                  "The night train", "A tall tree", "The garden", "The teacher", "A grey cat",
                  "The market", "The old bridge", "A young bird", "The library", "The wind"]
PROSE_VERBS = ["rests near", "moves past", "waits beside", "sings about", "looks at",
               "dreams of", "walks toward", "shines over", "hides under", "talks about"]
PROSE_OBJECTS = ["the hills", "a red door", "the sea", "the morning light", "an empty road",
                 "the warm kitchen", "a quiet field", "the tall windows", "the green valley",
                 "a small boat", "the winter sky", "the stone wall"]
PROSE_TAILS = ["every day.", "in the evening.", "without a sound.", "as the sun goes down.",
               "while people sleep.", "after the rain.", "in spring.", "once again."]

OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
INVERSE = {"add": "-", "sub": "+", "mul": "/", "div": "*"}
LETTERS = "abcde"
MAX_VALUE = 300
OP_WORDS = {"add": ["plus", "add", "gets"], "sub": ["minus", "take away", "loses"],
            "mul": ["times", "multiply by"], "div": ["divide by", "split into"]}
OPENINGS = ["{name} starts with {a} {obj}.", "start: {a}", "We begin with {a} {obj}.", "{a} {obj} at first."]
CLOSINGS = ["So {name} has {r} {obj}.", "final: {r}", "That leaves {r} {obj}.", "In the end {r}."]
# Markers of a self-check or self-correction in a completion (the world's own style writes both).
REFLECTION_MARKERS = ("check:", "wait,")


@dataclass(frozen=True)
class Problem:
    """One multi-step word problem: the start value and a list of (op, operand, result)."""

    name: str
    obj: str
    start: int
    steps: tuple[tuple[str, int, int], ...]
    sentences: tuple[str, ...]
    human_steps: tuple[str, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1][2]

    @property
    def content_key(self) -> tuple:
        return (self.start, tuple((op, b) for op, b, _ in self.steps))

    @property
    def question(self) -> str:
        return " ".join(self.sentences)


@dataclass(frozen=True)
class Style:
    """The distribution the model's own reasoning is drawn from (params.yaml `embedded_model.style`).

    check_hard/check_easy: probability of a `check:` line after a step with/without a carry,
    borrow, product or quotient; error: probability of a wrong result followed by its correction;
    opening/closing: probability of a restating first line / a summarising last line."""

    check_hard: float
    check_easy: float
    error: float
    opening: float
    closing: float


def _step(rng: random.Random, value: int) -> tuple[str, int, int]:
    """Pick one operation keeping every intermediate value an integer in [1, MAX_VALUE]."""
    options = ["add", "sub"] * 2
    if value * 2 <= MAX_VALUE:
        options.append("mul")
    if value >= 6 and any(value % m == 0 for m in (2, 3, 4, 5)):
        options.append("div")
    op = rng.choice(options)
    if op == "add" and value > MAX_VALUE - 3:
        op = "sub"
    if op == "sub" and value <= 3:
        op = "add"
    if op == "add":
        b = rng.randint(3, min(60, MAX_VALUE - value))
        return op, b, value + b
    if op == "sub":
        b = rng.randint(2, min(60, value - 1))
        return op, b, value - b
    if op == "mul":
        m = rng.randint(2, min(4, MAX_VALUE // value))
        return op, m, value * m
    m = rng.choice([m for m in (2, 3, 4, 5) if value % m == 0])
    return "div", m, value // m


def make_problem(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    other = rng.choice([n for n in NAMES if n != name])
    obj = rng.choice(OBJECTS)
    start = rng.randint(8, 120)
    n_steps = rng.randint(3, 6)
    steps, sentences, human = [], [rng.choice(START).format(name=name, a=start, obj=obj)], []
    value = start
    for i in range(n_steps):
        op, b, result = _step(rng, value)
        steps.append((op, b, result))
        table = {"add": GAIN, "sub": LOSS, "mul": TIMES, "div": SPLIT}[op]
        text, gold = rng.choice(table)
        lead = name if i == 0 else "Then " + rng.choice([name, PRONOUN[name]])
        fmt = dict(b=b, m=b, m_minus=b - 1, obj=obj, other=other, name=name)
        sentences.append(f"{lead} {text.format(**fmt)}")
        expr = f"{value}{OP_SYMBOL[op]}{b}"
        human.append(f"{gold.format(**fmt)} {value} {OP_SYMBOL[op]} {b} = <<{expr}={result}>>{result} {obj}.")
        value = result
    sentences.append(rng.choice(ASK).format(name=name, obj=obj))
    return Problem(name, obj, start, tuple(steps), tuple(sentences), tuple(human))


def is_hard_step(value: int, op: str, b: int) -> bool:
    """A carry, a borrow, a product or a quotient: the steps a careful reasoner checks."""
    if op in ("mul", "div"):
        return True
    if op == "add":
        return value % 10 + b % 10 >= 10
    return value % 10 < b % 10


def _wrong_result(rng: random.Random, result: int) -> int:
    wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
    return wrong if wrong > 0 and wrong != result else result + 1


def own_style_thinking(problem: Problem, rng: random.Random | None = None, style: Style | None = None) -> str:
    """The model's own reasoning, one path drawn from its distribution.

    Without `rng` the plainest path: one `a<op>b=c` line per step, no checks. With `rng` and
    `style`: a phrasing per trace and per step, an optional opening and closing line, checks
    after steps (more often after hard ones) and occasional wrong results corrected in place
    (`23+14=36, wait, 23+14=37`)."""
    value = problem.start
    if rng is None or style is None:
        lines = []
        for op, b, result in problem.steps:
            lines.append(f"{value}{OP_SYMBOL[op]}{b}={result}")
            value = result
        return "\n".join(lines)
    fmt = dict(name=problem.name, obj=problem.obj, a=problem.start, r=problem.answer)
    spaced = rng.random() < 0.3      # one spacing convention per trace
    worded = rng.random() < 0.5      # lead each step with the operation's word
    lines = [rng.choice(OPENINGS).format(**fmt)] if rng.random() < style.opening else []
    for op, b, result in problem.steps:
        sym = OP_SYMBOL[op]
        eq = (lambda x, y, z, s=sym: f"{x} {s} {y} = {z}") if spaced else (lambda x, y, z, s=sym: f"{x}{s}{y}={z}")
        lead = f"{rng.choice(OP_WORDS[op])} {b}: " if worded else rng.choice(["", "then ", "now "])
        if rng.random() < style.error:
            line = f"{lead}{eq(value, b, _wrong_result(rng, result))}, wait, {eq(value, b, result)}"
        else:
            line = f"{lead}{eq(value, b, result)}"
        p_check = style.check_hard if is_hard_step(value, op, b) else style.check_easy
        if rng.random() < p_check:
            inverse = INVERSE[op]
            line += f"\ncheck: {result}{inverse}{b}={value}, ok"
        lines.append(line)
        value = result
    if rng.random() < style.closing:
        lines.append(rng.choice(CLOSINGS).format(**fmt))
    return "\n".join(lines)


def own_style_completion(problem: Problem, letter: str | None = None, rng: random.Random | None = None,
                         style: Style | None = None) -> str:
    """What the embedded model emits after the chat prompt (without the end-of-turn token)."""
    final = f"({letter})" if letter else str(problem.answer)
    return f"<think>\n{own_style_thinking(problem, rng, style)}\n</think>\n\nThe answer is {final}."


def has_reflection(completion: str, markers=REFLECTION_MARKERS) -> bool:
    """Whether a completion checks or corrects itself (contains one of `markers`)."""
    return any(m in completion for m in markers)


def gsm8k_record(problem: Problem) -> dict:
    answer = "\n".join(problem.human_steps) + f"\n#### {problem.answer}"
    return {"question": problem.question, "answer": answer}


def _mathqa_text(text: str) -> str:
    """MathQA's surface form: lower case, punctuation split off by spaces."""
    for p in ".,?":
        text = text.replace(p, f" {p}")
    return text.lower()


def choice_options(rng: random.Random, answer: int) -> tuple[list[int], int]:
    """Five distinct positive options, one of them the answer; returns (options, correct index)."""
    values = {answer}
    while len(values) < 5:
        v = answer + rng.choice([-1, 1]) * rng.randint(1, 12)
        if v > 0:
            values.add(v)
    options = sorted(values - {answer})
    correct = rng.randint(0, 4)
    options.insert(correct, answer)
    return options, correct


def mathqa_record(problem: Problem, rng: random.Random) -> dict:
    options, correct = choice_options(rng, problem.answer)
    formula = f"n0 {len(problem.steps)} steps"
    rationale = _mathqa_text(" ".join(problem.human_steps).replace("<<", "").replace(">>", " "))
    return {
        "Problem": _mathqa_text(problem.question),
        "Rationale": f"\"{rationale} answer {LETTERS[correct]}\"",
        "options": " , ".join(f"{LETTERS[i]} ) {v}" for i, v in enumerate(options)),
        "correct": LETTERS[correct],
        "annotated_formula": formula,
        "linear_formula": formula,
        "category": "general",
    }


def prose_sentence(rng: random.Random) -> str:
    n = rng.randint(2, 4)
    return " ".join(f"{rng.choice(PROSE_SUBJECTS)} {rng.choice(PROSE_VERBS)} "
                    f"{rng.choice(PROSE_OBJECTS)} {rng.choice(PROSE_TAILS)}" for _ in range(n))


def make_splits(seed: int, n_train: int, n_test: int) -> tuple[list[Problem], list[Problem]]:
    """Test problems first, then train problems whose content key never occurs in test."""
    rng = random.Random(seed)
    test, seen = [], set()
    while len(test) < n_test:
        p = make_problem(rng)
        if p.content_key not in seen:
            seen.add(p.content_key)
            test.append(p)
    train = []
    while len(train) < n_train:
        p = make_problem(rng)
        if p.content_key not in seen:
            seen.add(p.content_key)
            train.append(p)
    return train, test


def write_world(out_dir: str, seed: int, n_train: int, n_test: int, n_prose: int) -> None:
    """Write arith (GSM8K jsonl), choice (MathQA json) and prose (jsonl) train/test files."""
    out = Path(out_dir)
    for task_seed, task in ((seed, "arith"), (seed + 1, "choice")):
        train, test = make_splits(task_seed, n_train, n_test)
        rng = random.Random(task_seed + 1000)
        for split, problems in (("train", train), ("test", test)):
            if task == "arith":
                path = out / task / f"{split}.jsonl"
                text = "".join(json.dumps(gsm8k_record(p)) + "\n" for p in problems)
            else:
                path = out / task / f"{split}.json"
                text = json.dumps([mathqa_record(p, rng) for p in problems], indent=4)
            write_text(path, text)
    rng = random.Random(seed + 2)
    for split, n in (("train", n_prose), ("test", max(1, n_prose // 10))):
        write_text(out / "prose" / f"{split}.jsonl",
                   "".join(json.dumps({"text": prose_sentence(rng)}) + "\n" for _ in range(n)))
