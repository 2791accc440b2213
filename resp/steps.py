"""The pruning steps, each a function from paths (and plain values) to a path, and what each reads.

    calibrate   dense traces / task data            -> the method's calibration trace file
    score       mask + traces                       -> scores file (Taylor, decode-only)
    apply       scores + mask + sparsity            -> mask file
    regenerate  mask + the calibration prompts      -> trace file
    baseline    calibration traces                  -> one mask file per target (one-shot scorers)
    write_run   the schedule's record               -> masks/sparsity-*.safetensors + summary.json

`resp.recipe.prune` composes them; the CLI and DVC stages run that composition in one process
and the Prefect flow runs each step as a task of its own (cached on its inputs, the digests of
the files it reads, the params sections it declares and its code). Within a process, models
come from a cache keyed by the base model's identity, so consecutive steps do not reload it.

`STEPS` declares, per step, the params sections it reads and the module it runs; its code is
that module's import closure within `resp`. Prefect cache keys, the registry's params hash and
dvc.yaml's `params:` / `deps:` all come from (or are tested against) these declarations.
"""

from __future__ import annotations

import ast
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from resp import artifacts
from resp.config import Params

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


# ---------------------------------------------------------------- declarations

@dataclass(frozen=True)
class StepDeclaration:
    sections: tuple[str, ...]   # dotted params sections; `{task}` and `{method}` are filled per call
    module: str                 # the module the step runs; its import closure is the step's code


PRUNE_SECTIONS = ("model", "tasks", "prose_task", "calibration", "generation", "importance", "prune",
                  "methods.{method}", "baselines")

STEPS: dict[str, StepDeclaration] = {
    # DVC stages (one process each) and the Prefect tasks that are not pruning steps
    "calibration_traces": StepDeclaration(("model", "tasks.{task}", "calibration", "generation"), "resp.recipe"),
    "heldout_traces": StepDeclaration(("model", "tasks.{task}", "generation", "evaluation.nll_traces"), "resp.recipe"),
    "prune": StepDeclaration(PRUNE_SECTIONS, "resp.recipe"),
    "export": StepDeclaration(("model", "export", "prune.attention_unit", "prune.protected_layers"), "resp.checkpoints"),
    "evaluate": StepDeclaration(("model", "tasks.{task}", "evaluation", "prune.attention_unit",
                                 "prune.protected_layers"), "resp.evaluation"),
    "register": StepDeclaration(("registry",), "resp.registry"),
    "report": StepDeclaration(("run", "prune.targets", "report", "evaluation"), "resp.report"),
    "heal_traces": StepDeclaration(("model", "tasks.{task}", "calibration.seed", "generation",
                                    "methods.{method}.heal.num_prompts"), "resp.recipe"),
    "heal": StepDeclaration(("model", "tasks.{task}", "methods.{method}.heal"), "resp.healing"),
    # the steps `prune` is made of (Prefect tasks)
    "calibrate": StepDeclaration(PRUNE_SECTIONS, "resp.steps"),
    "score": StepDeclaration(("model", "importance", "prune.attention_unit", "prune.protected_layers",
                              "methods.{method}"), "resp.steps"),
    "apply": StepDeclaration(("model", "importance.normalize", "prune.attention_unit", "prune.protected_layers"),
                             "resp.steps"),
    "regenerate": StepDeclaration(("model", "tasks.{task}", "generation", "methods.{method}", "export.channel_multiple",
                                   "scale.vllm_gpu_memory_utilization"), "resp.steps"),
    "baseline": StepDeclaration(PRUNE_SECTIONS, "resp.steps"),
    "write_run": StepDeclaration(PRUNE_SECTIONS, "resp.steps"),
}


def _imports(module: str) -> set[str]:
    """`resp` modules that `module`'s source imports anywhere (top level or inside functions)."""
    path = _module_path(module)
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    # the package itself only re-exports (lazily): `from resp import x` counts as `resp.x`
    return {m for m in found if m.startswith("resp.") and _module_exists(m)}


def _module_path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    package = PACKAGE / rel / "__init__.py"
    return package if package.is_file() else (PACKAGE / rel).with_suffix(".py")


def _module_exists(module: str) -> bool:
    return _module_path(module).is_file()


@lru_cache(maxsize=None)
def code_files(module: str) -> tuple[str, ...]:
    """The source files (relative to the repository root) of `module`'s import closure in `resp`."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or not _module_exists(m):
            continue
        seen.add(m)
        todo.extend(_imports(m) - seen)
    return tuple(sorted(_module_path(m).relative_to(ROOT).as_posix() for m in seen))


@lru_cache(maxsize=None)
def code_digest(step: str) -> str:
    """sha256 over the code a step runs (names and bytes of its closure's files)."""
    return artifacts.json_digest({f: artifacts.file_digest(ROOT / f) for f in code_files(STEPS[step].module)})


def code_record(step: str) -> dict:
    """What an artifact's manifest records of the code that wrote it: the step and the digest of its code.
    Content, not the git commit: a commit that leaves the step's code alone writes the same bytes, so
    DVC does not rerun what follows, and the digest still names the exact source that ran."""
    return {"step": step, "digest": code_digest(step)}


def step_sections(step: str, **fill: str) -> tuple[str, ...]:
    return tuple(s.format(**fill) for s in STEPS[step].sections)


def step_params(params: Params, step: str, **fill: str) -> dict:
    """The values of the params sections `step` reads (JSON-able), by dotted name."""
    tree = params.model_dump(mode="json")
    used = {}
    for dotted in step_sections(step, **fill):
        node = tree
        for key in dotted.split("."):
            node = node[key]
        used[dotted] = node
    return used


def params_hash(params: Params, task: str, method: str) -> str:
    """Digest of every params section a pruning run of `method` on `task` reads."""
    return artifacts.json_digest(step_params(params, "prune", task=task, method=method))


# ---------------------------------------------------------------- models, once per process

@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    masked: object          # resp.masks.MaskedModel: puts the model into any mask's state
    structures: dict        # (attention_unit, protected layers) -> Structures


_MODELS: dict[tuple, LoadedModel] = {}


def base_model(params: Params) -> dict:
    """The base model's identity (hub commit or content hash), computed once per run and passed
    to every step: it keys the model cache and enters every manifest and cache key."""
    from resp.models import model_identity

    identity = model_identity(params.model.name_or_path, params.model.revision)
    return {**identity.to_dict(), "key": identity.key}


def loaded_model(params: Params, base: dict) -> LoadedModel:
    """The model of `params.model` (identity `base`), loaded once per process and kept."""
    from resp.models import load_model
    from resp.masks import MaskedModel
    from resp.structures import structures_for

    m = params.model
    key = (base["key"], m.name_or_path, m.dtype, m.device, m.trust_remote_code)
    if key not in _MODELS:
        _MODELS.clear()  # one model in memory at a time
        model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, m.device, m.trust_remote_code)
        _MODELS[key] = LoadedModel(model, tokenizer, None, {})
    loaded = _MODELS[key]
    p = params.prune
    skey = (p.attention_unit, tuple(p.protected_layers or ()))
    if skey not in loaded.structures:
        loaded.structures[skey] = structures_for(loaded.model, p.attention_unit, p.protected_layers)
    s = loaded.structures[skey]
    if loaded.masked is None or loaded.masked.s is not s:
        # every step starts from the dense weights: masks of different runs are not nested
        loaded.masked = MaskedModel(loaded.model, s, keep_dense=True, dense=loaded.masked.dense if loaded.masked else None)
    return loaded


def _structures(params: Params, base: dict):
    return loaded_model(params, base).masked.s


def _load_mask(path: str | None, s):
    from resp.masks import Mask

    return Mask.dense(s) if path is None else Mask.load(path)[0]


# ---------------------------------------------------------------- steps

def calibrate(params: Params, task: str, method: str, base: dict, dense_traces: str | None, out: str) -> str | None:
    """The calibration traces `method` declares, as a file: the dense model's own traces for
    `self` (returned as is), else built here and written to `out`; None for `none`."""
    from resp.recipe import calibration_traces
    from resp.traces import check_usable

    loaded = loaded_model(params, base)
    traces, path = calibration_traces(params, task, params.methods[method].calibration, loaded.model,
                                      loaded.tokenizer, dense_traces, run_manifest(params, task, method, base))
    if traces is None:
        return None
    if not path:
        traces.save(out)
        path = out
    check_usable(traces, f"{method} calibration traces")
    return path


def score(params: Params, task: str, method: str, base: dict, mask: str | None, traces: str, reference: str,
          out: str, part: int = 0) -> str:
    """Taylor scores of every unit of the model under `mask` on `traces` (filtered by the
    method's trace_filter against the answers of the `reference` traces), on the `part`-th
    rotating subset and the first completion tokens the schedule options (prune.score_*) keep."""
    from resp.cost import scoring_spent
    from resp.importance import save_scores, taylor_scores
    from resp.schedule import scheduled_subset
    from resp.traces import TraceSet, filter_traces

    loaded = loaded_model(params, base)
    s = loaded.masked.s
    current = TraceSet.load(traces)
    dense_answers = {tr.prompt_id: tr.answer for tr in TraceSet.load(reference).traces}
    used = filter_traces(current, params.methods[method].trace_filter, dense_answers)
    p = params.prune
    scored = scheduled_subset(used.traces, part, p.score_subsets, p.score_tokens)
    m = _load_mask(mask, s)
    loaded.masked.set(m)
    imp = params.importance
    scores = taylor_scores(loaded.model, scored, s, imp.batch_size, loaded.tokenizer.pad_token_id,
                           imp.per_sample_abs, imp.grads_only_scored, imp.grad_checkpointing, desc=f"{method} scores",
                           loss_chunk_tokens=imp.loss_chunk_tokens)
    spent = scoring_spent(scored, imp.batch_size, imp.per_sample_abs, imp.grad_checkpointing, imp.grads_only_scored,
                          loaded.model, s)
    return str(save_scores(scores, out, {"model": base, "mask_digest": m.digest(), "traces": traces,
                                         "traces_digest": current.manifest["digest"], "importance": imp.model_dump(),
                                         "used_traces": len(used.traces), "part": part, "spent": spent}))


def apply(params: Params, base: dict, scores: str, mask: str | None, sparsity: float, out: str) -> str:
    """Prune `mask` by `scores` (normalised per importance.normalize) up to parameter sparsity `sparsity`."""
    from resp.importance import load_scores
    from resp.masks import prune_step

    s = _structures(params, base)
    unit_scores, _ = load_scores(scores)
    att, ch = unit_scores.normalized(s, params.importance.normalize)
    pruned = prune_step(att, ch, _load_mask(mask, s), s, sparsity)
    return str(pruned.save(out, {"kind": "step", "scores": scores, "target": sparsity}))


FRESH_GAP = 2**20   # prompts a trace set may hold before a fresh stream could meet the dense streams


def regeneration_seed(seed: int, stream: str, tag: str) -> int:
    """The base seed of a regeneration (prompt i samples from base + i). `common` reuses the dense
    traces' `seed`, so a regenerated trace shares its random numbers with the dense one (common random
    numbers, a variance-reduction choice); `fresh` (the paper's) moves each regeneration, named by its
    unique `tag` within the run, to a stream of its own. torch's CPU generator keeps only the low 32 bits
    of a seed, so the offset lives there: base = seed + 2**20 + (hash(tag) mod (2**32 - 2**21)) never
    meets the dense streams seed..seed+2**20-1, and two regenerations of one run overlap only if their
    hashes land within a trace set's size of each other (about n * N / 2**32 for n regenerations of N prompts)."""
    if stream == "common":
        return seed
    return seed + FRESH_GAP + int(artifacts.json_digest({"regeneration": tag}), 16) % (2**32 - 2 * FRESH_GAP)


def regenerate(params: Params, task: str, method: str, base: dict, mask: str, prompts: str, tag: str,
               out: str) -> str:
    """Traces of the model under `mask` on the prompts the `prompts` trace file answers."""
    from resp.recipe import sampling_spec
    from resp.tasks import load_items
    from resp.traces import TraceSet, check_usable, self_generated_traces

    t = params.tasks[task]
    loaded = loaded_model(params, base)
    m = _load_mask(mask, loaded.masked.s)
    loaded.masked.set(m)
    by_id = {i.id: i for i in load_items(t, t.calibration_split)}
    items = [by_id[tr.prompt_id] for tr in TraceSet.load(prompts).traces]
    model_dir = None
    if params.generation.backend == "vllm":  # vLLM loads the pruned model from a masked export
        from resp.checkpoints import export_model

        model_dir = str(export_model(loaded.model, loaded.tokenizer, m, loaded.masked.s, "masked",
                                     Path(out).parent.parent / "masked" / tag, params.export.channel_multiple))
    stream = params.methods[method].regeneration_stream
    seed = regeneration_seed(params.generation.seed, stream, tag)
    new = self_generated_traces(loaded.model, loaded.tokenizer, items, t.format, sampling_spec(params),
                                params.generation.batch_size, seed,
                                {**run_manifest(params, task, method, base), "mask_digest": m.digest(),
                                 "prompt_ids": [i.id for i in items], "regeneration": tag,
                                 "regeneration_stream": stream}, desc=f"regenerate {tag}",
                                backend=params.generation.backend, model_dir=model_dir,
                                gpu_memory_utilization=params.scale.vllm_gpu_memory_utilization)
    check_usable(new, f"regenerated traces ({tag})", allow_truncated=True)
    new.save(out)
    st = new.stats()
    log.info("regenerated traces at %s: mean %.1f tokens, truncation %.3f, accuracy %s",
             tag, st["mean_completion_tokens"], st["truncation_rate"], st["answer_accuracy"])
    return out


def baseline(params: Params, task: str, method: str, base: dict, calibration: str | None, out_dir: str) -> dict[str, str]:
    """Masks at every target of a one-shot scorer (Wanda-sp, OWL-sp, FLAP, magnitude, random)."""
    from resp.baselines import baseline_masks
    from resp.masks import Mask
    from resp.traces import TraceSet, decode_only_batches

    declared, p = params.methods[method], params.prune
    loaded = loaded_model(params, base)
    s = loaded.masked.s
    loaded.masked.set(Mask.dense(s))
    batches = None
    if calibration is not None:
        batches = list(decode_only_batches(TraceSet.load(calibration).traces, params.importance.batch_size,
                                           loaded.tokenizer.pad_token_id))
    b = params.baselines
    masks = baseline_masks(declared.scorer, loaded.model, s, p.targets, batches, p.seed, params.importance.normalize,
                           b.owl_outlier_m, b.owl_lambda, declared.bias_compensation)
    if declared.scorer == "flap" and declared.bias_compensation and not (s.o_bias and s.mlp_bias):
        log.info("flap: bias compensation goes into o_proj/down_proj biases this architecture lacks: they are created "
                 "when a mask is applied and carried by the compact export (a masked export refuses such a mask)")
    return {artifacts.target_key(t): str(masks[t].save(Path(out_dir) / "steps" / "baseline" /
                                                       f"{artifacts.target_name(t)}.safetensors", {"kind": "step"}))
            for t in p.targets}


def run_manifest(params: Params, task: str, method: str, base: dict) -> dict:
    """What every file of a pruning run records about how it was made."""
    return {"model": base, "task": task, "method": method, "declaration": params.methods[method].model_dump(),
            "params_hash": params_hash(params, task, method), "code": code_record("prune")}


def write_run(params: Params, task: str, method: str, base: dict, record: dict, out_dir: str) -> dict[str, str]:
    """The run's outputs: `masks/sparsity-<t>.safetensors` with manifests saying what produced them,
    and `summary.json` (no wall-clock time in it, losses at artifacts.LOSS_DIGITS: a rerun with the same params
    writes the same bytes, on another CPU too;
    its `cost` counts what the score and regenerate steps processed, `resp.cost.run_cost`).
    `record`: {"saved": {target key: mask file}, "trace_sets": [...], "used_by": {target key: n},
    "steps": [...], "spent": [files the score and regenerate steps wrote]}."""
    from resp.cost import matmul_params, run_cost
    from resp.masks import Mask
    from resp.schedule import reported_steps
    from resp.traces import TraceSet

    p = params.prune
    s = _structures(params, base)
    history = record["trace_sets"]
    first = TraceSet.load(history[0]["path"]) if history else None
    written, masks = {}, {}
    for target in p.targets:
        key = artifacts.target_key(target)
        mask = masks[target] = Mask.load(record["saved"][key])[0]
        manifest = {**run_manifest(params, task, method, base), "target": target, "sparsity": mask.sparsity(s),
                    "structure_ratio": mask.structure_ratio(s), "attention_unit": s.attention_unit,
                    "protected_layers": list(s.protected), "kept_per_layer": mask.kept_per_layer(),
                    "trace_sets": history[:record["used_by"][key]],
                    "prompt_ids_digest": first.prompt_ids_digest() if first is not None else None,
                    "label": method}
        written[key] = str(mask.save(artifacts.mask_file(Path(out_dir) / "masks", target), manifest))
        log.info("%s %s: mask at target %.2f has parameter sparsity %.4f, structure ratio %.4f -> %s",
                 method, task, target, manifest["sparsity"], manifest["structure_ratio"], written[key])
    summary = {"method": method, "task": task, "trace_sets": history, "steps": reported_steps(record["steps"]),
               "cost": run_cost(record["spent"], matmul_params(loaded_model(params, base).model)),
               "masks": {artifacts.target_key(t): {"path": written[artifacts.target_key(t)],
                                                   "sparsity": masks[t].sparsity(s)} for t in p.targets}}
    artifacts.write_json(Path(out_dir) / "summary.json", summary)
    return written
