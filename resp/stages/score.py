"""Taylor importance of every unit under a mask on a trace set (method steps 2-5), as a scores file."""

from __future__ import annotations

from resp.config import Method, Params
from resp.stages.common import load_mask, loaded_model


def score(params: Params, task: str, method: Method, base: dict, mask: str | None, traces: str, reference: str,
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
    used = filter_traces(current, method.declaration.trace_filter, dense_answers)
    p = params.prune
    scored = scheduled_subset(used.traces, part, p.score_subsets, p.score_tokens)
    m = load_mask(mask, s)
    loaded.masked.set(m)
    imp = params.importance
    scores = taylor_scores(loaded.model, scored, s, imp.batch_size, loaded.tokenizer.pad_token_id,
                           imp.per_sample_abs, imp.grads_only_scored, imp.grad_checkpointing, desc=f"{method.name} scores",
                           loss_chunk_tokens=imp.loss_chunk_tokens)
    spent = scoring_spent(scored, imp.batch_size, imp.per_sample_abs, imp.grad_checkpointing, imp.grads_only_scored,
                          loaded.model, s)
    return str(save_scores(scores, out, {"model": base, "mask_digest": m.digest(), "traces": traces,
                                         "traces_digest": current.manifest["digest"], "importance": imp.model_dump(),
                                         "used_traces": len(used.traces), "part": part, "spent": spent}))
