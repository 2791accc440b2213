"""lm-eval interop: a local GSM8K-format task that lm-eval's `hf` model runs on an export, scored by
resp's own extractors, so its accuracy is comparable with `resp evaluate` / `resp benchmark`.

`write_task(data_file, out_dir)` writes `out_dir/<name>.yaml` plus a copy of this module
(`out_dir/resp_lm_eval.py`, which lm-eval loads for the YAML's `!function` entries). The task reads
`data_file` (GSM8K format: one `{"question", "answer": "... #### <number>"}` per line, as
`data/world/arith/test.jsonl`), asks each question as resp does (`resp.prompts.gsm8k_message`, 0-shot,
one user turn through the model's chat template with thinking on), decodes greedily up to
`max_gen_toks` tokens and reports `strict` and `flexible` accuracy with `resp.tasks.is_correct`.
From the shell (masked exports load as they are; compact ones need trust_remote_code):

    lm_eval --model hf --apply_chat_template --include_path <out_dir> --tasks resp_gsm8k \\
      --model_args pretrained=<export>,trust_remote_code=True,enable_thinking=True,think_end_token=<id of </think>>

lm-eval hands the task the text after the last `</think>` (think_end_token), decoded without special
tokens. That is what resp's extractors read too, with one difference: a completion cut inside its
thinking (no `</think>` within max_gen_toks) has no strict answer in resp, while lm-eval passes its
whole text on; `run_lm_eval` reports how many completions that concerns.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

TASK_NAME = "resp_gsm8k"
THINK_END = "</think>"
LM_EVAL_MISSING = "lm-eval is not installed: pip install 'resp[lmeval]' (or install requirements-test.lock)"


class LmEvalError(ValueError):
    pass


def write_task(data_file: str | Path, out_dir: str | Path, name: str = TASK_NAME, max_gen_toks: int = 256) -> Path:
    """The task directory `out_dir` (for lm-eval's --include_path) over the GSM8K-format `data_file`."""
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise LmEvalError(f"{data_file} not found: give a GSM8K-format .jsonl file (question, answer with '#### <n>')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, out / "resp_lm_eval.py")
    config = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test", "output_type": "generate_until", "num_fewshot": 0,
        "doc_to_target": "{{answer.split('####')[-1].strip()}}",
        # greedy; no stop string but the model's EOS (lm-eval's default "\n\n" would cut the thinking)
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("strict", "flexible")],
        "metadata": {"version": 1.0},
    }
    text = yaml.safe_dump(config, sort_keys=False) + ("doc_to_text: !function resp_lm_eval.doc_to_text\n"
                                                      "process_results: !function resp_lm_eval.process_results\n")
    path = out / f"{name}.yaml"
    path.write_text(text)
    return path


def doc_to_text(doc: dict) -> str:
    """The user turn resp asks for a GSM8K record (lm-eval applies the chat template)."""
    from resp.prompts import gsm8k_message

    return gsm8k_message(doc["question"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """resp's strict and flexible verdicts on lm-eval's response (the text after `</think>`)."""
    from resp.tasks import is_correct

    gold = doc["answer"].split("####")[-1].strip()
    return {e: float(is_correct("gsm8k", results[0], gold, extractor=e)) for e in ("strict", "flexible")}


def run_lm_eval(model_dir: str | Path, task_dir: str | Path, *, trust_remote_code: bool = False, limit: int | None = None,
                batch_size: int = 16, name: str = TASK_NAME) -> dict:
    """lm-eval's `hf` model on the export `model_dir` over the task of `task_dir`: {"strict", "flexible",
    "n", "responses"} (responses in the data file's order)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalError(LM_EVAL_MISSING) from None
    from transformers import AutoTokenizer

    think_end = AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids(THINK_END)
    out = lm_eval.simple_evaluate(
        model="hf", tasks=[name], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), limit=limit,
        model_args={"pretrained": str(model_dir), "trust_remote_code": trust_remote_code, "dtype": "float32",
                    "device": "cpu", "batch_size": batch_size, "enable_thinking": True, "think_end_token": think_end},
        apply_chat_template=True, log_samples=True, bootstrap_iters=0)
    metrics = out["results"][name]
    samples = sorted(out["samples"][name], key=lambda sample: sample["doc_id"])
    return {"strict": metrics["strict,none"], "flexible": metrics["flexible,none"], "n": len(samples),
            "responses": [sample["filtered_resps"][0] for sample in samples]}
