"""User-turn formats of the benchmarks (method.md, evaluation protocol).

GSM8K: the question itself (optionally after few-shot exemplars, see `resp.tasks`).
MathQA: the paper's 0-shot prompt `Question: {Problem}\\nOptions: {options}\\nAnswer:`.
The embedded model is trained on exactly these strings, so they live in one place.
"""

from __future__ import annotations


def gsm8k_message(question: str) -> str:
    return question


def mathqa_message(problem: str, options: str) -> str:
    return f"Question: {problem}\nOptions: {options}\nAnswer:"
