"""Progressive regeneration (method step 7): traces of the pruned model on the calibration prompts."""

from __future__ import annotations

import logging
from pathlib import Path

from resp import artifacts
from resp.config import Method, Params
from resp.stages.common import load_mask, loaded_model, run_manifest, sampling_spec

log = logging.getLogger(__name__)

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


def regenerate(params: Params, task: str, method: Method, base: dict, mask: str, prompts: str, tag: str,
               out: str) -> str:
    """Traces of the model under `mask` on the prompts the `prompts` trace file answers."""
    from resp.tasks import load_items
    from resp.traces import TraceSet, check_usable, self_generated_traces

    t = params.tasks[task]
    loaded = loaded_model(params, base)
    m = load_mask(mask, loaded.masked.s)
    loaded.masked.set(m)
    by_id = {i.id: i for i in load_items(t, t.calibration_split)}
    items = [by_id[tr.prompt_id] for tr in TraceSet.load(prompts).traces]
    model_dir = None
    if params.generation.backend == "vllm":  # vLLM loads the pruned model from a masked export
        from resp.checkpoints import export_model

        model_dir = str(export_model(loaded.model, loaded.tokenizer, m, loaded.masked.s, "masked",
                                     Path(out).parent.parent / "masked" / tag, params.export.channel_multiple))
    stream = method.declaration.regeneration_stream
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
