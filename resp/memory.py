"""Peak-memory model of one Taylor scoring pass (method steps 2-5, sized before running them).

`predict_scoring_memory` adds up, in bytes, what `resp.importance.taylor_scores` holds at its
peak for one forward/backward of `batch_size` sequences of `seq_len` tokens (one sequence per
backward in per-sample-abs mode, as the scorer runs it):

- weights: every parameter in the model dtype (counted on a meta-device copy of the model);
- accumulators: one fp32 gradient sum per scored weight (none in per-sample-abs mode, which
  folds each gradient into per-unit sums at once);
- saved activations: what autograd keeps for the backward, per token and layer (below), or
  only each layer's input with gradient checkpointing;
- then the larger of two moments of the backward:
  - loss buffers: the logits in the model dtype plus three fp32 [tokens, vocab] buffers
    (log-softmax output, its incoming gradient, its input gradient); this dominates for
    150k-token vocabularies;
  - layer buffers: the logits (still referenced), one recomputed layer under checkpointing,
    the MLP's gradient buffers and one weight gradient with the fp32 copies the hook makes,
    plus the other grads: without `grads_only_scored` every unscored parameter gets a
    gradient that lives until the pass ends (scored ones are folded and freed by hooks).

With the chunked loss (`loss_chunk_tokens` N, importance.loss_chunk_tokens) no logits outlive a
chunk: the loss buffers are those of at most N tokens (counted as if every token were a
completion token) plus the gathered hidden states of the label tokens and their gradient
(2 x tokens x hidden in the model dtype), and the layer buffers hold no logits.

Per token, a decoder layer saves (b = dtype bytes, f = 4): each RMSNorm its fp32 input (h*f),
its output (h*b) and one fp32 rsqrt; Qwen3's q/k norms their fp32 inputs ((H+KV)*d*f) and
rsqrts ((H+KV)*f); attention the rotated queries, the keys and values, the kernel's output
(already in the layout o_proj reads) and a logsumexp (H*f); the MLP the gate output, its SiLU,
the up output and their product (4*I*b). A padded batch (batch > 1) makes HF pass a [B, T, T]
mask, which SDPA converts to the model dtype in every layer, and repeat keys and values to H
heads; a single sequence runs causal GQA attention with neither. Without `grads_only_scored`
the norm weights' products also keep the normalised inputs (2*h*b, and (H+KV)*d*b for q/k
norms). Memory-efficient attention kernels (CUDA; CPU's flash kernel) are assumed: no [T, T]
score matrix per head. Allocator caching and fragmentation are not modelled (see
benchmarks/bench_scoring.py for a measurement with and without them).

Sharded over `nproc` workers (`scale.scoring: sharded`, FSDP2, mean mode): each worker holds
1/nproc of the weights and of the fp32 accumulators, plus what FSDP un-shards: the root's
parameters (embeddings, final norm, LM head: gathered for the forward and kept until the
backward ends), two decoder layers' parameters (the current one and the prefetched next),
and during a layer's backward its gradients in the model dtype with their fp32 reduce-scatter
copy; at the end one weight's element scores, gathered in fp32. Activations and loss buffers
are per worker as in one process (each worker scores batch_size traces at a time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from resp.adapters import adapter_for, head_dim
from resp.models import DTYPES

FP32 = 4
GIB = 1024 ** 3


class MemoryModelError(ValueError):
    pass


@dataclass(frozen=True)
class ScoringMemory:
    """Bytes held at the peak of one scoring pass, by component (module docstring)."""

    weights: int
    accumulators: int
    saved_activations: int
    loss_buffers: int
    layer_buffers: int
    other_grads: int
    unsharded: int = 0   # sharded scoring: what FSDP gathers on each worker (module docstring)

    @property
    def peak(self) -> int:
        return (self.weights + self.accumulators + self.saved_activations + self.unsharded
                + max(self.loss_buffers, self.layer_buffers + self.other_grads))

    def breakdown(self) -> dict[str, int]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "peak": self.peak}

    def table(self) -> str:
        rows = [f"{name:<18} {value:>16} bytes {value / GIB:10.3f} GiB" for name, value in self.breakdown().items()]
        return "\n".join(rows + ["(peak = weights + accumulators + saved_activations + unsharded"
                                 " + max(loss_buffers, layer_buffers + other_grads))"])


def load_config(config):
    """A transformers config from a config object, a dict (with model_type), a config.json
    file or a model directory / hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, (str, Path)) and Path(config).is_file():
        try:
            config = json.loads(Path(config).read_text())
        except json.JSONDecodeError as e:
            raise MemoryModelError(f"{config} is not a JSON config ({e}); pass a config.json or a model directory") from None
    if isinstance(config, dict):
        if "model_type" not in config:
            raise MemoryModelError("the config dict has no model_type: add e.g. \"model_type\": \"qwen3\"")
        values = {k: v for k, v in config.items() if k != "model_type"}
        return AutoConfig.for_model(config["model_type"], **values)
    try:
        return AutoConfig.from_pretrained(str(config))
    except OSError as e:
        raise MemoryModelError(f"cannot read a model config from {config} ({str(e).splitlines()[0]}): "
                               "pass a model directory, a config.json, or a hub id while online") from None


def layer_parameter_counts(config, attention_unit: str) -> tuple[int, int, int]:
    """(root parameters: embeddings, final norm, LM head; one decoder layer's parameters; its scored ones)."""
    from transformers import AutoModelForCausalLM

    from resp.importance import scored_weights
    from resp.structures import structures_for

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = adapter_for(config).layers(model)
    layer = sum(p.numel() for p in layers[0].parameters())
    scored = sum(w.numel() for (i, _), w in scored_weights(model, structures_for(model, attention_unit, [])).items() if i == 0)
    return sum(p.numel() for p in model.parameters()) - len(layers) * layer, layer, scored


def parameter_counts(config, attention_unit: str) -> tuple[int, int, int]:
    """(all parameters, scored weight elements, largest scored weight) from a meta-device model."""
    from transformers import AutoModelForCausalLM

    from resp.importance import scored_weights
    from resp.structures import structures_for

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    s = structures_for(model, attention_unit, [])
    scored = [w.numel() for w in scored_weights(model, s).values()]
    return sum(p.numel() for p in model.parameters()), sum(scored), max(scored)


def config_parameters(config, attention_unit: str) -> tuple[int, int, int]:
    """(all parameters, P of resp.cost.matmul_params, scored parameters) of a config, on a meta-device model."""
    total, scored, _ = parameter_counts(config, attention_unit)
    embed = 0 if getattr(config, "tie_word_embeddings", False) else config.vocab_size * config.hidden_size
    return total, total - embed, scored


def layer_activation_bytes(config, batch: int, seq_len: int, b: int, grads_only_scored: bool) -> int:
    """Bytes one decoder layer saves for the backward of `batch` x `seq_len` tokens (module docstring)."""
    h, i = config.hidden_size, config.intermediate_size
    heads, kv, d = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    qk_norm = config.model_type == "qwen3"
    padded = batch > 1
    per_token = 2 * (h * (FP32 + b) + FP32)                       # input and post-attention RMSNorm
    if qk_norm:
        per_token += (heads + kv) * (d * FP32 + FP32)             # q_norm / k_norm fp32 inputs and rsqrts
    per_token += 2 * heads * d * b + 2 * (heads if padded else kv) * d * b + heads * FP32  # q, out; k, v; logsumexp
    per_token += 4 * i * b                                        # gate, SiLU(gate), up, product
    if not grads_only_scored:
        per_token += 2 * h * b + ((heads + kv) * d * b if qk_norm else 0)
    mask = batch * seq_len * seq_len * b if padded else 0
    return batch * seq_len * per_token + mask


def predict_scoring_memory(config, dtype: str, seq_len: int, batch_size: int, *, attention_unit: str = "query_head",
                           per_sample_abs: bool = False, grads_only_scored: bool = True,
                           grad_checkpointing: bool = False, nproc: int = 1,
                           loss_chunk_tokens: int | None = None) -> ScoringMemory:
    """Predicted peak of one scoring pass of `batch_size` x `seq_len` tokens (module docstring);
    `nproc` > 1: per worker of sharded scoring; `loss_chunk_tokens`: the chunked loss."""
    if dtype not in DTYPES:
        raise MemoryModelError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if nproc < 1:
        raise MemoryModelError(f"nproc {nproc} must be >= 1")
    if nproc > 1 and per_sample_abs:
        raise MemoryModelError("sharded scoring (nproc > 1) runs in mean mode only: drop --per-sample-abs "
                               "(per-sample-abs needs no accumulators and is scored data-parallel)")
    if loss_chunk_tokens is not None and (loss_chunk_tokens < 1 or nproc > 1):
        raise MemoryModelError(f"loss_chunk_tokens {loss_chunk_tokens} must be >= 1 and needs nproc 1 (sharded scoring "
                               "computes the loss in the model's own forward)")
    if seq_len < 2 or batch_size < 1:
        raise MemoryModelError(f"seq_len {seq_len} must be >= 2 and batch_size {batch_size} >= 1")
    config = load_config(config)
    adapter_for(config)  # names the supported families when this one is not
    b = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    n_params, n_scored, largest = parameter_counts(config, attention_unit)
    batch = 1 if per_sample_abs else batch_size       # the scorer backpropagates one sample at a time
    tokens = batch * seq_len
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers

    layer = layer_activation_bytes(config, batch, seq_len, b, grads_only_scored)
    shared = tokens * h * FP32 + (batch * seq_len * seq_len if batch > 1 else 0)  # final norm input; bool mask
    if not grads_only_scored:
        shared += 2 * tokens * h * b                  # final norm's normalised input and output (norm weight, lm_head)
    saved = shared + layers * (tokens * h * b if grad_checkpointing else layer)

    # A weight's gradient in the model dtype plus what the hook allocates: an fp32 copy of it
    # (mean mode) or fp32 copies of weight and gradient, their product and its abs.
    copies = 0 if b == FP32 else FP32
    hook = (2 * copies + 2 * FP32) if per_sample_abs else copies
    mlp_grads = 3 * tokens * i * b + tokens * h * b
    logits = tokens * v * b if loss_chunk_tokens is None else 0   # still referenced during the backward
    layer_buffers = logits + (layer if grad_checkpointing else 0) + mlp_grads + largest * (b + hook)
    if loss_chunk_tokens is None:
        loss_buffers = tokens * v * (b + 3 * FP32)
    else:
        loss_buffers = min(loss_chunk_tokens, tokens) * v * (b + 3 * FP32) + 2 * tokens * h * b
    unsharded = 0
    if nproc > 1:
        root, per_layer, layer_scored = layer_parameter_counts(config, attention_unit)
        layer_grads = layer_scored if grads_only_scored else per_layer
        unsharded = (root + 2 * per_layer) * b + layer_grads * (b + FP32) + largest * FP32
    return ScoringMemory(
        weights=-(-n_params * b // nproc),
        accumulators=0 if per_sample_abs else -(-n_scored * FP32 // nproc),
        unsharded=unsharded,
        saved_activations=saved,
        loss_buffers=loss_buffers,
        layer_buffers=layer_buffers,
        other_grads=0 if grads_only_scored else -(-(n_params - n_scored) * b // nproc),
    )


def fit_verdict(predict, nproc: int, device_bytes: int, max_nproc: int = 64) -> str:
    """One line: whether `predict(nproc)` (a ScoringMemory) fits a device of `device_bytes`, and if not,
    by how much and the fewest workers that fit; MemoryModelError when it does not fit at `nproc`."""
    m = predict(nproc)
    if m.peak <= device_bytes:
        return (f"fits: per-worker peak {m.peak / GIB:.1f} GiB of {device_bytes / GIB:.1f} GiB on each of {nproc} "
                f"device(s) ({(device_bytes - m.peak) / GIB:.1f} GiB spare)")
    enough = next((n for n in range(nproc + 1, max_nproc + 1) if predict(n).peak <= device_bytes), None)
    where = (f"it fits sharded over {enough} devices (per-worker peak {predict(enough).peak / GIB:.1f} GiB)" if enough
             else f"not even sharded over {max_nproc} devices: what every worker holds unsharded (activations, loss "
                  f"buffers, root parameters: {(predict(max_nproc).peak - predict(max_nproc).weights - predict(max_nproc).accumulators) / GIB:.1f} GiB) "
                  "is too much; lower importance.batch_size or the trace length, or enable grad_checkpointing")
    raise MemoryModelError(f"does not fit: per-worker peak {m.peak / GIB:.1f} GiB on {nproc} device(s) exceeds "
                           f"{device_bytes / GIB:.1f} GiB by {(m.peak - device_bytes) / GIB:.1f} GiB; {where}")
