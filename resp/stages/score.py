"""Taylor importance of every unit under a mask on a trace set (method steps 2-5), as a scores file.

One scoring path for the score stage and `resp score`: `score_traces` runs in this process, or as one
worker of a torchrun job (data-parallel or sharded, `scale.scoring`), where rank 0 writes the file.
With `scale.score_nproc: N > 1` the stage starts that job itself (N workers of
`python -m resp.stages.score REQUEST`) and returns the same path, so `resp prune`, `dvc repro` and
the Prefect flow score on N devices with no hand-run command.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from resp.config import Method, Params
from resp.stages.common import drop_loaded_models, load_mask, loaded_model

log = logging.getLogger(__name__)


def score(params: Params, task: str, method: Method, base: dict, mask: str | None, traces: str, reference: str,
          out: str, part: int = 0) -> str | None:
    """Taylor scores of every unit of the model under `mask` on `traces` (filtered by the
    method's trace_filter against the answers of the `reference` traces), on the `part`-th
    rotating subset and the first completion tokens the schedule options (prune.score_*) keep.
    On scale.score_nproc workers when it is above 1; under torchrun, ranks other than 0 return None."""
    from resp.distributed import check_launch, launched_by_torchrun, run_workers

    p = params.prune
    arguments = {"mask": mask, "trace_filter": method.declaration.trace_filter, "reference": reference,
                 "part": part, "subsets": p.score_subsets, "tokens": p.score_tokens, "desc": f"{method.name} scores"}
    if params.scale.score_nproc > 1 and not launched_by_torchrun():
        check_launch(params)
        if params.model.device.startswith("cuda"):
            drop_loaded_models()   # the workers need the devices' memory (worker 0 shares this process's device)
        request = {"params": params.model_dump(mode="json"), "base": base, "traces": traces, "out": out, **arguments}
        run_workers("resp.stages.score", request, params.scale.score_nproc, Path(out), f"{method.name} scoring")
        return str(Path(out))   # what rank 0's save_scores returned
    path = score_traces(params, base, traces, out, **arguments)
    return None if path is None else str(path)


def score_traces(params: Params, base: dict, traces: str | Path, out: str | Path, mask: str | None = None,
                 trace_filter: str = "none", reference: str | None = None, part: int = 0, subsets: int = 1,
                 tokens: int | None = None, desc: str = "taylor scores") -> Path | None:
    """Score the trace file `traces` under `mask` (None: dense) with the params' importance settings and
    write `out` (+ manifest: what was scored, how, and what it spent). `trace_filter` against the
    answers of `reference`, then the `part`-th of `subsets` rotating subsets cut to `tokens` completion
    tokens, choose the traces scored. Under torchrun every worker scores its shard (scale.scoring) and
    rank 0 writes `out`; the others return None."""
    import torch.distributed as dist

    from resp.cost import scoring_spent
    from resp.distributed import (check_sharded_scoring, distributed_taylor_scores, init_distributed,
                                  launched_by_torchrun, shard_model, sharded_taylor_scores, worker_model)
    from resp.importance import save_scores, taylor_scores
    from resp.schedule import scheduled_subset
    from resp.traces import TraceSet, filter_traces

    joined = launched_by_torchrun() and not dist.is_initialized()
    device = init_distributed(params.model.device) if joined else params.model.device
    try:
        distributed = dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        sharded = distributed and params.scale.scoring == "sharded"
        check_sharded_scoring(params, world_size)
        current = TraceSet.load(traces)
        dense_answers = {tr.prompt_id: tr.answer for tr in TraceSet.load(reference).traces} if reference else None
        used = filter_traces(current, trace_filter, dense_answers)
        scored = scheduled_subset(used.traces, part, subsets, tokens)
        if distributed:
            model, tokenizer, s, m = worker_model(params, device, mask, sharded)
        else:
            loaded = loaded_model(params, base)
            model, tokenizer, s, m = loaded.model, loaded.tokenizer, loaded.masked.s, load_mask(mask, loaded.masked.s)
            loaded.masked.set(m)
        imp = params.importance
        spent = scoring_spent(scored, imp.batch_size, imp.per_sample_abs, imp.grad_checkpointing, imp.grads_only_scored,
                              model, s)
        args = (model, scored, s, imp.batch_size, tokenizer.pad_token_id)
        if sharded:
            args = (shard_model(model, device), *args[1:])
            scores = sharded_taylor_scores(*args, imp.grads_only_scored, imp.grad_checkpointing)
        else:
            args += (imp.per_sample_abs, imp.grads_only_scored, imp.grad_checkpointing)
            chunk = {"loss_chunk_tokens": imp.loss_chunk_tokens}
            scores = (distributed_taylor_scores(*args, **chunk) if distributed
                      else taylor_scores(*args, desc=desc, **chunk))
        if distributed and dist.get_rank() != 0:
            return None
        manifest = {"model": base, "mask_digest": m.digest(), "traces": str(traces),
                    "traces_digest": current.manifest["digest"], "importance": imp.model_dump(),
                    "used_traces": len(used.traces), "part": part, "spent": spent, "world_size": world_size,
                    "scoring": "sharded" if sharded else "data_parallel" if distributed else "one_process"}
        path = save_scores(scores, out, manifest)
        log.info("wrote scores of %d traces (%d tokens, mean loss %.4f) to %s",
                 scores.n_samples, scores.n_tokens, scores.mean_loss, path)
        return path
    finally:
        if joined:
            dist.destroy_process_group()


def main(request_path: str) -> None:
    """One torchrun worker of the score stage: `score_traces` with the request `score` wrote."""
    request = json.loads(Path(request_path).read_text())
    params = Params.model_validate(request.pop("params"))
    score_traces(params, **request)


if __name__ == "__main__":
    from resp.distributed import WORKER_ERROR

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(*sys.argv[1:])
    except Exception as e:   # one line the launcher repeats; the traceback stays in the workers' log
        logging.getLogger("resp").exception("score worker failed")
        print(f"{WORKER_ERROR}{' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(1)
