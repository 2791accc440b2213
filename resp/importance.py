"""First-order Taylor importance of prunable units (method steps 2-5).

For each sample n the loss is the mean NLL over its completion tokens (decode-only labels).
Gradients of the batch's *sum* of per-sample losses are accumulated over all batches into
fp32 buffers G (one per scored weight), so G = sum_n grad_n whatever the batching; the element
score is |w * G/N| (mean before abs). With `per_sample_abs` the score is sum_n |w * grad_n|,
reduced to per-unit sums right away, one sample per backward, without a full gradient buffer.

Loss: by default the model's forward gives the full-vocabulary logits of every token and the
cross-entropy ignores the prompt's. With `loss_chunk_tokens` N, only the completion tokens'
hidden states go through the LM head and the cross-entropy, N tokens at a time, each chunk's
logits recomputed in the backward (activation checkpointing) instead of kept: the same loss and
gradients up to float rounding, with at most N x vocab logits alive instead of batch x length x vocab.

Memory: only the scored projections require grad (optionally all weights, for comparison);
each `.grad` is folded into its accumulator by a post-accumulate-grad hook and freed at once.
With FSDP2-sharded parameters (`sharded`, resp.distributed) the accumulators are sharded too:
FSDP reduce-scatters each backward's gradients (summed in fp32 across workers) into the
sharded `.grad`, which is folded into the fp32 shard accumulator after the backward; the
element scores are computed shard-wise and each weight's is gathered to reduce it to units.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from resp import artifacts
from resp.adapters import adapter_for
from resp.structures import Structures
from resp.traces import IGNORE_INDEX, Trace, decode_only_batches

log = logging.getLogger(__name__)

# Sums tensors in place across data-parallel workers (see resp.distributed); None = one process.
Reduce = Callable[[list[torch.Tensor]], None]


class ImportanceError(ValueError):
    pass


@dataclass
class UnitScores:
    attention: torch.Tensor   # float64 [L, A]: raw summed element scores per attention unit
    channels: torch.Tensor    # float64 [L, I]
    n_samples: int
    n_tokens: int
    mean_loss: float

    def normalized(self, s: Structures, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        att_div, ch_div = s.normalizer(mode)
        return self.attention / att_div, self.channels / ch_div


def scored_weights(model, s: Structures) -> dict[tuple[int, str], torch.nn.Parameter]:
    """The weights whose Taylor scores are summed into units, keyed by (layer, projection)."""
    adapter = adapter_for(model.config)
    names = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if s.attention_unit == "kv_group":
        names += ["k_proj", "v_proj"]
    return {(i, n): getattr(adapter, n)(layer).weight
            for i, layer in enumerate(adapter.layers(model)) for n in names}


def reduce_to_units(name: str, elem: torch.Tensor, s: Structures) -> tuple[str, torch.Tensor]:
    """Sum an element-score tensor of one projection into its units: ("attention"|"channels", [A] or [I])."""
    hd, H, KV = s.head_dim, s.num_heads, s.num_kv_heads
    if name == "q_proj":       # [H*hd, hidden]: rows of head h
        per_head = elem.view(H, hd, -1).sum((1, 2))
    elif name == "o_proj":     # [hidden, H*hd]: columns of head h
        per_head = elem.view(-1, H, hd).sum((0, 2))
    elif name in ("k_proj", "v_proj"):   # [KV*hd, hidden]: only scored for kv_group
        return "attention", elem.view(KV, hd, -1).sum((1, 2))
    elif name in ("gate_proj", "up_proj"):   # [I, hidden]
        return "channels", elem.sum(1)
    else:                      # down_proj [hidden, I]
        return "channels", elem.sum(0)
    if s.attention_unit == "kv_group":
        per_head = per_head.view(KV, s.n_rep).sum(1)
    return "attention", per_head


def per_sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean NLL over label tokens (next-token shift); returns (losses [B], counts [B])."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(1)
    return nll.sum(1) / counts.clamp(min=1), counts


def _chunk_nll(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def chunked_per_sample_mean_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                                 chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_sample_mean_loss` of the model's logits without materialising them (module docstring):
    the LM head and cross-entropy run on the label tokens only, `chunk_tokens` at a time, each chunk
    checkpointed. Returns (losses [B], counts [B])."""
    adapter = adapter_for(model.config)
    hidden = adapter.backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    shift_labels = labels[:, 1:]
    rows, positions = (shift_labels != IGNORE_INDEX).nonzero(as_tuple=True)
    selected, targets = hidden[:, :-1][rows, positions], shift_labels[rows, positions]
    head = adapter.lm_head(model)
    # a batch without labels still runs its backward through the model (FSDP's collectives need every pass)
    nll = torch.cat([checkpoint(_chunk_nll, head, selected[start:start + chunk_tokens],
                                targets[start:start + chunk_tokens], use_reentrant=False)
                     for start in range(0, len(targets), chunk_tokens)] or [selected.sum(-1).float()])
    counts = (shift_labels != IGNORE_INDEX).sum(1)
    sums = torch.zeros(len(labels), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return sums / counts.clamp(min=1), counts


def taylor_scores(model, traces: list[Trace], s: Structures, batch_size: int, pad_id: int,
                  per_sample_abs: bool = False, grads_only_scored: bool = True,
                  grad_checkpointing: bool = False, desc: str = "taylor scores",
                  reduce: Reduce | None = None, sharded: bool = False, lockstep_batches: int = 0,
                  loss_chunk_tokens: int | None = None) -> UnitScores:
    """Score every attention unit and MLP channel of `model` on `traces` (see module docstring).

    With `reduce`, `traces` is this worker's shard: the partial sums (gradient sums, or unit
    sums in per-sample-abs mode) and the counts are summed across workers before scoring, so
    every worker returns the scores of the union of the shards. With `sharded` (FSDP2 parameters,
    mean mode only) gradients are already summed across workers, `reduce` sums only the counts,
    and every worker runs `lockstep_batches` backward passes (a worker short of batches runs
    label-less ones, which add nothing): FSDP's collectives need all workers in every pass.
    `loss_chunk_tokens`: the chunked loss (module docstring); None: the model's full logits.
    """
    if sharded and per_sample_abs:
        raise ImportanceError("per_sample_abs is not implemented for sharded parameters: score in per-sample-abs "
                              "mode data-parallel (resp score under torchrun), it needs no gradient accumulators")
    if sharded and loss_chunk_tokens is not None:
        raise ImportanceError("importance.loss_chunk_tokens is not implemented for sharded parameters (FSDP gathers "
                              "the LM head only inside the model's own forward): set it to null for scale.scoring: sharded")
    if loss_chunk_tokens is not None and loss_chunk_tokens <= 0:
        raise ImportanceError(f"loss_chunk_tokens {loss_chunk_tokens} must be positive (or None: the full logits)")
    device = next(model.parameters()).device
    weights = scored_weights(model, s)
    was_training = model.training
    previous_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(not grads_only_scored)
    for w in weights.values():
        w.requires_grad_(True)

    L = s.num_layers
    attention = torch.zeros(L, s.attention_units, dtype=torch.float64)
    channels = torch.zeros(L, s.intermediate_size, dtype=torch.float64)
    accumulators = {} if per_sample_abs else {key: torch.zeros_like(w, dtype=torch.float32) for key, w in weights.items()}
    hooks = []

    def fold(key):
        layer, name = key

        def hook(param):
            if per_sample_abs:
                elem = (param.detach().float() * param.grad.float()).abs()
                kind, unit = reduce_to_units(name, elem, s)
                (attention if kind == "attention" else channels)[layer] += unit.double().cpu()
            else:
                accumulators[key] += param.grad.float()
            param.grad = None
        return hook

    def fold_sharded():  # FSDP sets the reduce-scattered shard's .grad itself, after the backward: no hook fires
        for key, w in weights.items():
            if w.grad is not None:
                accumulators[key] += w.grad.float()
                w.grad = None

    for key, w in weights.items():
        if not sharded:
            hooks.append(w.register_post_accumulate_grad_hook(fold(key)))
    if grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF only checkpoints in train mode; our families have no dropout at 0.0 rates

    n_samples = n_tokens = 0
    loss_sum = 0.0
    try:
        per_step = 1 if per_sample_abs else batch_size
        batches = list(decode_only_batches(traces, per_step, pad_id))
        idle = {"input_ids": torch.full((1, 2), pad_id), "attention_mask": torch.ones(1, 2, dtype=torch.long),
                "labels": torch.full((1, 2), IGNORE_INDEX)}
        batches += [idle] * (lockstep_batches - len(batches))
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            if loss_chunk_tokens is None:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                losses, counts = per_sample_mean_loss(logits, batch["labels"])
            else:
                losses, counts = chunked_per_sample_mean_loss(model, batch["input_ids"], batch["attention_mask"],
                                                              batch["labels"], loss_chunk_tokens)
            valid = counts > 0
            loss = losses[valid].sum()
            if not torch.isfinite(loss):
                raise ImportanceError(f"non-finite loss ({loss.item()}) while scoring: check the model dtype "
                                      "(use float32 or bfloat16, not float16) and the traces")
            loss.backward()
            if sharded:
                fold_sharded()
            n_samples += int(valid.sum())
            n_tokens += int(counts.sum())
            loss_sum += float(loss.detach())
    finally:
        for h in hooks:
            h.remove()
        if grad_checkpointing:
            model.activation_checkpointing_disable()
        model.train(was_training)
        for p, flag in previous_flags.items():
            p.requires_grad_(flag)
            p.grad = None

    if reduce is not None:
        counts = torch.tensor([n_samples, n_tokens, loss_sum], dtype=torch.float64)
        reduce([counts] if sharded else [counts, *([attention, channels] if per_sample_abs else accumulators.values())])
        n_samples, n_tokens, loss_sum = int(counts[0]), int(counts[1]), float(counts[2])
    if n_samples == 0:
        raise ImportanceError("no trace had a completion token to score: the trace set is empty")
    if not per_sample_abs:
        for (layer, name), acc in accumulators.items():
            elem = (weights[(layer, name)].detach().float() * (acc / n_samples)).abs()
            if sharded:  # a DTensor: gather this weight's element scores (one full fp32 tensor at a time)
                elem = elem.full_tensor()
            kind, unit = reduce_to_units(name, elem, s)
            (attention if kind == "attention" else channels)[layer] += unit.double().cpu()
    mean_loss = loss_sum / n_samples
    if not math.isfinite(mean_loss):
        raise ImportanceError("non-finite mean loss while scoring")
    return UnitScores(attention, channels, n_samples, n_tokens, mean_loss)


def save_scores(scores: UnitScores, path: str | Path, manifest: dict) -> Path:
    """Write unit scores (safetensors) and `<path>.json` (counts + manifest)."""
    tensors = {"attention": scores.attention.contiguous(), "channels": scores.channels.contiguous()}
    counts = {"n_samples": scores.n_samples, "n_tokens": scores.n_tokens, "mean_loss": scores.mean_loss}
    return artifacts.write_with_manifest(path, lambda tmp: save_file(tensors, str(tmp)), {**manifest, **counts})


def load_scores(path: str | Path) -> tuple[UnitScores, dict]:
    path = Path(path)
    meta = artifacts.manifest_path(path)
    if not path.is_file() or not meta.is_file():
        raise ImportanceError(f"scores {path} (or its manifest {meta.name}) not found: write them with `resp score`")
    tensors = load_file(str(path))
    manifest = artifacts.read_manifest(path)
    return UnitScores(tensors["attention"], tensors["channels"], manifest["n_samples"], manifest["n_tokens"],
                      manifest["mean_loss"]), manifest

