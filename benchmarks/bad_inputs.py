"""Re-run the bad-input campaign (tests/bad_inputs.py) through the real CLI and print it as a
table: kind, command, before (what a campaign saw: issue 13's for the first rows, issue 21's for
the rest), the outcome measured on a baseline checkout (optional), and after (what the command
prints now, measured), with the counts per kind. CPU only, no downloads, about two minutes.

    python benchmarks/bad_inputs.py [--out benchmarks/results/bad_inputs.md]
    # the same rows against another checkout's code (its `resp` first on PYTHONPATH), kept as JSON:
    PYTHONPATH=/path/to/main python benchmarks/bad_inputs.py --json main.json
    python benchmarks/bad_inputs.py --baseline main.json --out benchmarks/results/bad_inputs.md
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--json", type=Path, help="write each row's outcome as JSON (to compare as a --baseline)")
    parser.add_argument("--baseline", type=Path, help="a --json file of the same rows measured on another checkout")
    parser.add_argument("--baseline-label", default="baseline", help="what the --baseline measured, for the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)   # the CLI's INFO logs would mix into the measured output

    import torch
    from conftest import make_qwen3
    from transformers import GenerationConfig

    import resp
    from bad_inputs import CASES, build_project, judge, run_case
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

        outcomes = {}
        for case in CASES:
            started = time.perf_counter()
            try:
                result, lines = run_case(case, project)
                verdict = outcome_of(case, judge(case, project, result, lines), result)
                last = (lines[-1] if lines else "(no output)") if case.code != 1 else next(
                    (line for line in lines if line.startswith("MISMATCH")), lines[-1] if lines else "(no output)")
                after = f"{last} (exit {result.exit_code}, {time.perf_counter() - started:.1f} s)"
            except AssertionError as e:  # a row's own check of what the command left (a user's file replaced)
                verdict, after = "accepted / wrong thing done", str(e)[:120]
            except Exception as e:  # noqa: BLE001 - the harness itself failed on this code (a baseline lacking what a row sets up)
                verdict, after = "harness error", f"{type(e).__name__}: {str(e)[:120]}"
            outcomes[case.name] = {"verdict": verdict,
                                   "after": after.replace(str(project.root), "<project>").replace("|", "\\|")}
    print(f"code measured: {Path(resp.__file__).parent}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(outcomes, indent=1))
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    head = ("| kind | command | before (campaign) |" + (f" {args.baseline_label} (measured) |" if baseline else "")
            + " after (measured) |")
    intro = ["# The bad-input campaign, measured", "",
             "Every row is one command a new user could type, run through the real CLI against a small project "
             "(`tests/bad_inputs.py`; `python benchmarks/bad_inputs.py` re-measures it). *before (campaign)*: what "
             "the campaign that found the row saw (issue 13 for the first 40 rows, issue 21 for the rest)"
             + (f"; *{args.baseline_label}*: the same rows measured on that code" if baseline else "")
             + "; *after*: measured now. Required: one clear line naming the problem and the fix (exit 2), an audit "
             "that fails naming the tampering (exit 1), or, where the command used to do the wrong thing silently, "
             "the right thing done and checked.", ""]
    rows = [*intro, head, "|" + "---|" * (head.count("|") - 1)]
    for case in CASES:
        o = outcomes[case.name]
        was = f" {baseline[case.name]['verdict']}: {baseline[case.name]['after']} |" if baseline else ""
        rows.append(f"| {case.kind} | `{case.command}` | {case.before} |{was} {o['verdict']}: {o['after']} |")
    kinds = sorted({c.kind for c in CASES})
    summary = ["", f"{len(CASES)} rows; outcome per kind (" + (f"{args.baseline_label} -> " if baseline else "")
               + "after):", ""]
    for kind in kinds:
        names = [c.name for c in CASES if c.kind == kind]
        now = Counter(outcomes[n]["verdict"] for n in names)
        line = f"- {kind} ({len(names)}): "
        if baseline:
            then = Counter(baseline[n]["verdict"] for n in names)
            line += ", ".join(f"{k} {then[k]} -> {now[k]}" for k in sorted(set(then) | set(now)))
        else:
            line += ", ".join(f"{k} {n}" for k, n in sorted(now.items()))
        summary.append(line)
    text = "\n".join(rows + summary) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def outcome_of(case, wrong: str | None, result) -> str:
    """How a row ended: as required (one clear line / the audit names it / the right thing done), or what went wrong."""
    if wrong is None:
        return {2: "one clear line", 1: "audit fails naming it", 0: "right thing done"}[case.code]
    if wrong == "traceback":
        return "traceback"
    if result.exit_code == 0:
        return "accepted / wrong thing done"
    return "vague or wrong line"

if __name__ == "__main__":
    main()
