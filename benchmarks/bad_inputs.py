"""Re-run the bad-input campaign (tests/bad_inputs.py) through the real CLI and print it as a
table: kind, command, before (what the campaign saw before issue 13), after (what the command
prints now, measured), and the counts. CPU only, no downloads, about a minute.

    python benchmarks/bad_inputs.py [--out benchmarks/results/bad_inputs.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)   # the CLI's INFO logs would mix into the measured output

    import torch
    from conftest import make_qwen3
    from transformers import GenerationConfig

    from bad_inputs import CASES, build_project, expected, run_case
    from resp.world.problems import write_world
    from resp.world.tokenizer import build_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="resp-campaign-") as tmp:
        tmp = Path(tmp)
        corpus = ["Tom has 12 apples. He buys 3 more. How many apples does Tom have now?",
                  "<think>\n12+3=15\n</think>\n\nThe answer is 15.", "The river rests near the hills."] * 20
        tokenizer = build_tokenizer(corpus, vocab_size=300)
        model = make_qwen3()
        eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
        model.config.eos_token_id, model.config.pad_token_id = [eos, pad], pad
        model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
        with torch.no_grad():  # as tests/conftest.py: make <|im_end|> likely so traces end
            model.lm_head.weight[eos] *= 30
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        write_world(str(tmp / "world"), seed=7, n_train=24, n_test=8, n_prose=24)
        store = [f"registry.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", f"registry.artifact_location={tmp / 'artifacts'}"]
        project = build_project(tmp / "project", tmp / "model", tmp / "world", store)

        rows, outcome = [], Counter()
        for case in CASES:
            started = time.perf_counter()
            result, lines = run_case(case, project)
            seconds = time.perf_counter() - started
            one_line = (result.exit_code == case.code and len(lines) == 1 and lines[0].startswith("error: ")
                        and expected(case, project) in lines[0] and "Traceback" not in result.output)
            verdict = "clear one line" if one_line else ("traceback" if "Traceback" in result.output or (
                result.exception and not isinstance(result.exception, SystemExit)) else "NOT as expected")
            outcome[verdict] += 1
            after = (lines[-1] if lines else "(no output)").replace(str(project.root), "<project>").replace("|", "\\|")
            rows.append(f"| {case.kind} | `{case.command}` | {case.before} | {after} (exit {result.exit_code}, "
                        f"{seconds:.1f} s) |")
    table = ["| kind | command | before | after (measured) |", "|---|---|---|---|", *rows, "",
             f"{len(CASES)} rows: " + ", ".join(f"{n} {k}" for k, n in sorted(outcome.items())),
             "by kind: " + ", ".join(f"{n} {k}" for k, n in sorted(Counter(c.kind for c in CASES).items()))]
    text = "\n".join(table) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
