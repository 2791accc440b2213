"""A pruned model evaluated by lm-eval and by resp on the same items: accuracy side by side.

The mask (--mask, e.g. the main job's RESP mask at 30 %, data/runs/arith/resp/masks/sparsity-0.30.safetensors
after `dvc repro`; or --magnitude T: the embedded model pruned to T by weight magnitude, no pipeline
needed) is exported masked and compact from the embedded model; resp evaluates the
masked model greedily (as `resp evaluate`, params.yaml evaluation.max_new_tokens) on the first --items
items of data/world/arith/test.jsonl, and lm-eval's `hf` model evaluates both exports on the same
items through `resp.lm_eval_task` (compact with trust_remote_code). Reports strict and flexible
accuracy of each, how many answers agree word for word, and how many completions were cut inside
their thinking (the one case where lm-eval's reading differs from resp's).

Results: benchmarks/results/lm_eval.json (or --out). Needs the lmeval extra.

    python benchmarks/lm_eval_check.py --mask data/runs/arith/resp/masks/sparsity-0.30.safetensors
    python benchmarks/lm_eval_check.py --magnitude 0.15      # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--mask", type=Path, help="a mask file of `resp prune`")
    which.add_argument("--magnitude", type=float, help="prune the embedded model to this sparsity by weight magnitude")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lm_eval.json")
    args = parser.parse_args()

    from resp.baselines import magnitude_scores
    from resp.checkpoints import export_mask_file, export_model
    from resp.masks import Mask, prune_step
    from resp.structures import structures_for
    from resp.config import load_params
    from resp.evaluation import score_completions
    from resp.generation import SamplingSpec, generate
    from resp.lm_eval_task import run_lm_eval, write_task
    from resp.models import load_model, model_identity
    from resp.tasks import final_text, load_items, render_prompt

    params = load_params(ROOT / "params.yaml")
    ev, task = params.evaluation, params.tasks["arith"]
    model_dir = ROOT / params.model.name_or_path
    with tempfile.TemporaryDirectory(prefix="lm-eval-check-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data" / "test.jsonl"
        data.parent.mkdir()
        lines = (ROOT / task.source / "test.jsonl").read_text().splitlines()[: args.items]
        data.write_text("\n".join(lines) + "\n")
        items = load_items(task.model_copy(update={"source": str(data.parent)}), "test")
        model, tokenizer = load_model(str(model_dir))
        identity = model_identity(str(model_dir))
        if args.mask:
            exports = {fmt: export_mask_file(model, tokenizer, identity, args.mask, fmt, tmp / fmt,
                                             params.export.channel_multiple, params.prune.attention_unit,
                                             params.prune.protected_layers) for fmt in ("masked", "compact")}
        else:
            s = structures_for(model, params.prune.attention_unit, params.prune.protected_layers)
            mask = prune_step(*magnitude_scores(model, s, params.importance.normalize), Mask.dense(s), s, args.magnitude)
            exports = {fmt: export_model(model, tokenizer, mask, s, fmt, tmp / fmt, params.export.channel_multiple)
                       for fmt in ("masked", "compact")}
        pruned, tokenizer = load_model(str(exports["masked"]))
        spec = SamplingSpec(temperature=0.0, top_p=ev.top_p, top_k=ev.top_k, max_new_tokens=ev.max_new_tokens)
        started = time.perf_counter()
        completions = generate(pruned, tokenizer, [render_prompt(tokenizer, item.message) for item in items], spec,
                               batch_size=ev.batch_size, seed=ev.sample_seed, desc="resp")
        own = score_completions(items, completions, task.format, markers=())
        results = {"mask": str(args.mask) if args.mask else f"magnitude {args.magnitude}", "items": len(items), "max_new_tokens": ev.max_new_tokens,
                   "resp": {"strict": own["accuracy_strict"], "flexible": own["accuracy_flexible"],
                            "cut_inside_thinking": sum(c.truncated and "</think>" not in c.text for c in completions),
                            "seconds": round(time.perf_counter() - started, 1)}}
        task_dir = write_task(data, tmp / "task", max_gen_toks=ev.max_new_tokens).parent
        mine = [final_text(c.text).strip() for c in completions]
        for fmt, directory in exports.items():
            started = time.perf_counter()
            theirs = run_lm_eval(directory, task_dir, trust_remote_code=fmt == "compact", batch_size=ev.batch_size)
            results[f"lm_eval_{fmt}"] = {"strict": theirs["strict"], "flexible": theirs["flexible"],
                                         "same_answer_text": sum(a == b for a, b in zip(theirs["responses"], mine)),
                                         "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
