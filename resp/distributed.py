"""Data-parallel and sharded Taylor scoring over torch.distributed (method steps 2-5 beyond one device).

Each worker scores a deterministic shard of the traces; `taylor_scores` then sums the partial
gradient sums (or per-unit sums in per-sample-abs mode) and the sample/token counts across
workers with one all-reduce per tensor, so every worker ends with the scores of the whole
trace set: the same numbers as one process, up to fp32 summation order.

Launch one process per device with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT:

    torchrun --nproc_per_node=8 --no-python resp score --traces T.jsonl --out S.safetensors

The backend follows `model.device`: nccl for cuda (worker i uses cuda:LOCAL_RANK), gloo for cpu.
Without those variables `score_trace_file` runs in one process. Only rank 0 writes files.

`scale.scoring: sharded` shards the model instead of replicating it (PyTorch FSDP2
`fully_shard`, one unit per decoder layer plus the root), for models whose weights and fp32
gradient accumulators exceed one device: each worker holds 1/N of the weights and of the fp32
accumulators (`resp memory --nproc N` predicts the per-worker peak). Workers still score
their own shard of the traces; FSDP reduce-scatters the gradients summed (not averaged) in
fp32, `taylor_scores` folds them into the sharded fp32 accumulators and gathers each weight's
element scores once at the end. Same scores as one process, up to fp32 summation order.
Each worker loads the whole model into host memory before sharding it onto its device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from resp.config import Params
from resp.importance import UnitScores, save_scores, taylor_scores
from resp.models import load_model, model_identity
from resp.structures import Structures, structures_for
from resp.traces import Trace, TraceSet, check_usable, decode_only_batches

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ValueError):
    pass


def shard(traces: list[Trace], rank: int, world_size: int) -> list[Trace]:
    """Worker `rank`'s traces: every world_size-th trace of the length-sorted order.

    Dealing out length-sorted traces gives every worker about the same number of tokens;
    the sort is stable, so the shards depend only on the trace list.
    """
    if not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} is outside [0, {world_size}): check RANK and WORLD_SIZE")
    order = sorted(range(len(traces)), key=lambda i: len(traces[i].prompt_ids) + len(traces[i].completion_ids))
    return [traces[i] for i in order[rank::world_size]]


def launched_by_torchrun() -> bool:
    """True when the process environment describes a multi-process job (torchrun sets it)."""
    present = [k for k in TORCHRUN_ENV if k in os.environ]
    if present and len(present) < len(TORCHRUN_ENV):
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        raise DistributedError(f"distributed environment is incomplete (missing {', '.join(missing)}): "
                               "launch with torchrun --nproc_per_node=N, or unset RANK/WORLD_SIZE for one process")
    return bool(present)


def init_distributed(device: str) -> str:
    """Join the process group described by the torchrun environment; returns this worker's device."""
    if not launched_by_torchrun():
        raise DistributedError("no distributed environment (RANK, WORLD_SIZE, ...): launch with torchrun --nproc_per_node=N")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError(f"model.device is {device} but CUDA is not available: set model.device=cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"worker LOCAL_RANK {local_rank} has no CUDA device (this machine has "
                                   f"{torch.cuda.device_count()}): start at most that many workers per node "
                                   "(torchrun --nproc_per_node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method="env://")
    log.info("rank %d/%d joined the %s process group on %s", dist.get_rank(), dist.get_world_size(), backend, device)
    return device


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor in place across the process group (nccl only reduces CUDA tensors)."""
    on_gpu = dist.get_backend() == "nccl"
    for t in tensors:
        if on_gpu and t.device.type != "cuda":
            buffer = t.cuda()
            dist.all_reduce(buffer)
            t.copy_(buffer)
        else:
            dist.all_reduce(t)


def distributed_taylor_scores(model, traces: list[Trace], s: Structures, batch_size: int, pad_id: int,
                              per_sample_abs: bool, grads_only_scored: bool, grad_checkpointing: bool,
                              loss_chunk_tokens: int | None = None) -> UnitScores:
    """`taylor_scores` of all `traces`, computed by the initialised process group (each worker
    passes the same full list and scores its shard)."""
    if not dist.is_initialized():
        raise DistributedError("the process group is not initialised: call init_distributed first (under torchrun)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = shard(traces, rank, world_size)
    log.info("rank %d/%d scores %d of %d traces", rank, world_size, len(mine), len(traces))
    return taylor_scores(model, mine, s, batch_size, pad_id, per_sample_abs, grads_only_scored, grad_checkpointing,
                         desc=f"taylor scores rank {rank}", reduce=all_reduce_sum, loss_chunk_tokens=loss_chunk_tokens)


def lockstep_batches(traces: list[Trace], world_size: int, per_step: int, pad_id: int) -> int:
    """The most backward passes any worker's shard needs (every worker runs that many under FSDP)."""
    return max(sum(1 for _ in decode_only_batches(shard(traces, r, world_size), per_step, pad_id))
               for r in range(world_size))


def shard_model(model, device: str):
    """Shard `model`'s parameters over the process group with FSDP2: each decoder layer, then the root
    (embeddings, final norm, LM head). Gradients are reduce-scattered in fp32 and summed across workers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from resp.adapters import adapter_for

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in adapter_for(model.config).layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # a plain SUM over the workers' trace shards, as one process computes it (gloo has no PREMUL_SUM)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def sharded_taylor_scores(model, traces: list[Trace], s: Structures, batch_size: int, pad_id: int,
                          grads_only_scored: bool, grad_checkpointing: bool) -> UnitScores:
    """`taylor_scores` (mean mode) of all `traces` by the initialised process group with `model`
    sharded by `shard_model` (each worker passes the same full list and scores its shard)."""
    if not dist.is_initialized():
        raise DistributedError("the process group is not initialised: call init_distributed first (under torchrun)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = shard(traces, rank, world_size)
    steps = lockstep_batches(traces, world_size, batch_size, pad_id)
    log.info("rank %d/%d scores %d of %d traces on sharded parameters (%d backward passes)",
             rank, world_size, len(mine), len(traces), steps)
    return taylor_scores(model, mine, s, batch_size, pad_id, False, grads_only_scored, grad_checkpointing,
                         desc=f"sharded taylor scores rank {rank}", reduce=all_reduce_sum, sharded=True,
                         lockstep_batches=steps)


def score_trace_file(params: Params, traces_path: str | Path, out: str | Path, model_path: str | None = None) -> Path | None:
    """Score a saved trace set with the params' importance settings, over all workers when
    launched by torchrun (else in this process); rank 0 writes `out` and returns its path."""
    joined = launched_by_torchrun() and not dist.is_initialized()
    device = init_distributed(params.model.device) if joined else params.model.device
    try:
        name = model_path or params.model.name_or_path
        traces = TraceSet.load(traces_path)
        check_usable(traces, f"scoring {traces_path}")
        imp, distributed = params.importance, dist.is_initialized()
        sharded = distributed and params.scale.scoring == "sharded"
        if sharded and imp.per_sample_abs:
            raise DistributedError("scale.scoring: sharded scores in mean mode only: set importance.per_sample_abs: "
                                   "false, or scale.scoring: data_parallel (per-sample-abs needs no accumulators)")
        if sharded and imp.loss_chunk_tokens is not None:
            raise DistributedError("scale.scoring: sharded computes the loss in the model's own forward: set "
                                   "importance.loss_chunk_tokens: null, or scale.scoring: data_parallel")
        # sharded: load into host memory, FSDP moves each worker's shards onto its device
        model, tokenizer = load_model(name, params.model.revision, params.model.dtype, "cpu" if sharded else device)
        if sharded:
            model = shard_model(model, device)
        s = structures_for(model, params.prune.attention_unit, params.prune.protected_layers)
        args = (model, traces.traces, s, imp.batch_size, tokenizer.pad_token_id)
        if sharded:
            scores = sharded_taylor_scores(*args, imp.grads_only_scored, imp.grad_checkpointing)
        else:
            args += (imp.per_sample_abs, imp.grads_only_scored, imp.grad_checkpointing)
            chunk = {"loss_chunk_tokens": imp.loss_chunk_tokens}
            scores = distributed_taylor_scores(*args, **chunk) if distributed else taylor_scores(*args, **chunk)
        if distributed and dist.get_rank() != 0:
            return None
        identity = model_identity(name, params.model.revision)
        manifest = {"model": {**identity.to_dict(), "key": identity.key}, "traces": str(traces_path),
                    "traces_digest": traces.manifest["digest"], "importance": imp.model_dump(),
                    "attention_unit": s.attention_unit, "protected_layers": list(s.protected),
                    "world_size": dist.get_world_size() if distributed else 1,
                    "scoring": "sharded" if sharded else "data_parallel" if distributed else "one_process"}
        path = save_scores(scores, out, manifest)
        log.info("wrote scores of %d traces (%d tokens, mean loss %.4f) to %s",
                 scores.n_samples, scores.n_tokens, scores.mean_loss, path)
        return path
    finally:
        if joined:
            dist.destroy_process_group()
