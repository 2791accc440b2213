"""The pipeline's own steps on CUDA, on the embedded model, against the CPU results.

For a GPU session (one device call, with benchmarks/gpu_check.py): the same `resp.recipe.prune`
and `resp.evaluation.evaluate_masks` the CLI runs, with `model.device=cuda`:

- dense traces (the decode loop on CUDA): greedy completions equal to the CPU ones (share);
- `resp_noregen` pruned on CUDA in float32 and bfloat16 (score and apply steps):
  share of units whose kept/pruned decision equals the CPU mask of the same method;
- `resp` pruned on CUDA in float32 (regeneration on CUDA): seconds, masks written;
- evaluation of the CUDA float32 `resp_noregen` masks on CUDA: accuracy next to CPU's.

CPU references are computed here first (same process, same code), so the comparison does not
depend on committed files. Writes one JSON report (rewritten after every measurement).

    python benchmarks/cuda_pipeline_check.py --out $OUT/cuda_pipeline.json
    python benchmarks/cuda_pipeline_check.py --cpu-only --out /tmp/c.json   # dry run here
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resp import recipe  # noqa: E402
from resp.artifacts import masks_in_dir  # noqa: E402
from resp.config import declared_method, load_params  # noqa: E402
from resp.evaluation import evaluate_masks  # noqa: E402
from resp.generation import SamplingSpec, generate  # noqa: E402
from resp.masks import Mask  # noqa: E402
from resp.stages.common import loaded_model, base_model  # noqa: E402
from resp.tasks import load_items, render_prompt  # noqa: E402


def agreement(a: Path, b: Path) -> float:
    ma, mb = Mask.load(a)[0], Mask.load(b)[0]
    same = int((ma.heads == mb.heads).sum()) + int((ma.channels == mb.channels).sum())
    return same / (ma.heads.numel() + ma.channels.numel())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cuda_pipeline"))
    ap.add_argument("--cpu-only", action="store_true", help="run the CUDA half on CPU too (checks the script)")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override (dry runs: smaller)")
    args = ap.parse_args(argv)
    gpu = "cpu" if args.cpu_only else "cuda"
    report: dict = {"device": gpu}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))

    def params(device, dtype="float32", *extra):
        return load_params(ROOT / "params.yaml", [f"model.device={device}", f"model.dtype={dtype}",
                                                  f"evaluation.num_items={args.items}", *args.overrides, *extra])

    # dense greedy completions: the decode loop on each device
    completions = {}
    for device in ("cpu", gpu):
        p = params(device)
        loaded = loaded_model(p, base_model(p))
        loaded.masked.set(Mask.dense(loaded.masked.s))
        t = p.tasks["arith"]
        prompts = [render_prompt(loaded.tokenizer, i.message) for i in load_items(t, t.eval_split)[: args.items]]
        start = time.time()
        out = generate(loaded.model, loaded.tokenizer, prompts, SamplingSpec(0.0, 1.0, 0, 256), 100, 0, f"greedy {device}")
        report[f"greedy_seconds_{device}"] = round(time.time() - start, 2)
        completions[device] = [c.completion_ids for c in out]
    report["greedy_equal_share"] = sum(a == b for a, b in zip(completions["cpu"], completions[gpu])) / args.items
    save()

    dense = args.work / "dense.jsonl"
    recipe.make_traces(params("cpu"), "arith", "train", None, dense)
    for method in ("resp_noregen",):
        cpu = recipe.prune(params("cpu"), "arith", declared_method(params("cpu"), method), args.work / "cpu" / method,
                           str(dense))
        for dtype in ("float32", "bfloat16"):
            start = time.time()
            run = recipe.prune(params(gpu, dtype), "arith", declared_method(params(gpu, dtype), method),
                               args.work / gpu / dtype / method, str(dense))
            report[f"{method}_{dtype}"] = {"seconds": round(time.time() - start, 2),
                                           "agreement_with_cpu": {f"{t:.2f}": agreement(cpu[t], run[t]) for t in run}}
            save()
    start = time.time()
    written = recipe.prune(params(gpu), "arith", declared_method(params(gpu), "resp"),
                           args.work / gpu / "float32" / "resp", str(dense))
    report["resp_float32"] = {"seconds": round(time.time() - start, 2), "masks": sorted(f"{t:.2f}" for t in written)}
    save()
    for device, root in (("cpu", args.work / "cpu"), (gpu, args.work / gpu / "float32")):
        masks = masks_in_dir(root / "resp_noregen" / "masks")
        start = time.time()
        path = evaluate_masks(params(device, "float32", "evaluation.nll_traces=0"), "arith", "resp_noregen", masks, None,
                              args.work / f"eval-{device}.json", False)
        results = json.loads(Path(path).read_text())["results"]
        report[f"evaluate_{device}"] = {"seconds": round(time.time() - start, 2),
                                        "greedy_accuracy": {k: r["greedy"]["accuracy_strict"] for k, r in results.items()}}
        save()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
