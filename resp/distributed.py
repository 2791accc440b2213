"""Data-parallel and sharded Taylor scoring over torch.distributed (method steps 2-5 beyond one device).

Each worker scores a deterministic shard of the traces; `taylor_scores` then sums the partial
gradient sums (or per-unit sums in per-sample-abs mode) and the sample/token counts across
workers with one all-reduce per tensor, so every worker ends with the scores of the whole
trace set: the same numbers as one process, up to fp32 summation order.

One process per device runs under torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT: the score stage starts such a job itself with `scale.score_nproc: N` (`run_workers`),
or by hand:

    torchrun --nproc_per_node=8 --no-python resp score --traces T.jsonl --out S.safetensors

The backend follows `model.device`: nccl for cuda (worker i uses cuda:LOCAL_RANK), gloo for cpu.
Without those variables `resp.stages.score.score_traces` runs in one process. Only rank 0 writes files.

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

import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from resp.config import Params
from resp.importance import UnitScores, taylor_scores
from resp.models import load_model
from resp.structures import Structures, structures_for
from resp.traces import Trace, decode_only_batches

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


def check_sharded_scoring(params: Params, world_size: int) -> None:
    """What sharded scoring over `world_size` workers cannot compute, as one line naming the fix."""
    imp = params.importance
    if world_size < 2 or params.scale.scoring != "sharded":
        return
    if imp.per_sample_abs:
        raise DistributedError("scale.scoring: sharded scores in mean mode only: set importance.per_sample_abs: "
                               "false, or scale.scoring: data_parallel (per-sample-abs needs no accumulators)")
    if imp.loss_chunk_tokens is not None:
        raise DistributedError("scale.scoring: sharded computes the loss in the model's own forward: set "
                               "importance.loss_chunk_tokens: null, or scale.scoring: data_parallel")


def check_launch(params: Params) -> None:
    """Before any work: the `scale.score_nproc` workers the params ask for can start here (one per
    CUDA device, or per CPU core with gloo), torchrun is there, and the scoring mode can run on them."""
    nproc = params.scale.score_nproc
    if nproc < 2:
        return
    check_sharded_scoring(params, nproc)
    if params.model.device.startswith("cuda"):
        present, what = torch.cuda.device_count(), "CUDA device(s)"
    else:
        present, what = os.cpu_count() or 1, "CPU core(s)"
    if nproc > present:
        raise DistributedError(f"scale.score_nproc is {nproc} but this machine has {present} {what} for model.device "
                               f"{params.model.device}: set scale.score_nproc to at most {present} (1 scores in this process)")
    if not dist.is_available() or importlib.util.find_spec("torch.distributed.run") is None:
        raise DistributedError(f"torchrun (torch.distributed.run) is not available to {sys.executable}: install a torch "
                               "build with distributed support, or set scale.score_nproc: 1")


# what a worker prints (stderr, one line) when it fails: the launcher repeats it in its own error
WORKER_ERROR = "resp worker error: "


def run_workers(module: str, request: dict, nproc: int, beside: Path, what: str) -> None:
    """Run `python -m <module> REQUEST` on `nproc` workers of one torchrun job on this machine and wait.

    The request (JSON) goes to a temp directory beside `beside`, with the workers' log; the directory
    is kept, with the log, when a worker failed, and removed, with those earlier failures left beside
    `beside`, when every worker succeeded (a run directory ends holding only its outputs)."""
    from resp.artifacts import write_json

    beside.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{beside.name}.workers-"
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=beside.parent))
    request_path = write_json(workdir / "request.json", request)
    log_path = workdir / "workers.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, str(request_path)]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    # the workers import the `resp` this process runs
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p)
    log.info("%s on %d torchrun workers (log: %s)", what, nproc, log_path)
    with open(log_path, "w") as sink:
        code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        reported = [line.split(WORKER_ERROR, 1)[1] for line in lines if WORKER_ERROR in line]
        cause = reported[0] if reported else (lines[-1] if lines else "no output")
        raise DistributedError(f"{what} failed on {nproc} torchrun workers (exit {code}): {cause}; full log: {log_path}")
    for done in beside.parent.glob(f"{glob.escape(prefix)}*"):
        shutil.rmtree(done)


def worker_model(params: Params, device: str, mask: str | None, sharded: bool):
    """This worker's model under `mask`, on its device, or in host memory for `shard_model` to shard
    (sharded). Returns (model, tokenizer, structures, mask)."""
    from resp.masks import Mask, MaskedModel

    m = params.model
    model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, "cpu" if sharded else device, m.trust_remote_code)
    s = structures_for(model, params.prune.attention_unit, params.prune.protected_layers)
    mask_value = Mask.dense(s) if mask is None else Mask.load(mask)[0]
    MaskedModel(model, s, keep_dense=bool(mask_value.biases)).set(mask_value)
    return model, tokenizer, s, mask_value
