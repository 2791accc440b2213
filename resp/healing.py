"""Healing: recover a pruned model on its own reasoning (method.md, "Recovery (healing) beyond the paper").

The dense model is the teacher, the pruned model (base weights under a mask) the student. Both read
the dense model's self-generated traces (prompt + sampled completion); the loss covers completion
tokens only (the same labels as the decode-only importance loss):

- `kl`: KL(teacher || student) of the next-token distributions, per completion token;
- `ce`: cross-entropy on the trace tokens, which are the teacher's own samples.

Pruned units stay exactly zero: their gradients are zeroed before every optimizer step and their
weights zeroed after it (one keep-tensor per parameter serves both), so the healed model exports in
the pruned model's compact shape. `mode: full` trains every remaining weight; `mode: lora` trains
LoRA adapters (peft) on the decoder projections, whose A columns / B rows of pruned inputs /
outputs are kept at zero the same way, and merges them back before the model is written.

Deterministic under `heal.seed`: the batch of step k is a function of (seed, k) alone, the
learning rate of step k a function of k, and there is no dropout. A checkpoint (trainable weights,
optimizer state, losses) is written atomically every `checkpoint_every` steps beside the output;
a rerun after a crash (kill -9 included) resumes from the newest checkpoint of the same inputs and
writes the same bytes as an uninterrupted run.

Output: a directory holding the healed masked model (stock shapes, `load_model` reads it), its
tokenizer, a copy of the mask, and `resp_heal.json` (teacher identity, mask digest, trace digests,
heal settings, code digest, losses). `export_healed` writes it in any export format.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from resp import artifacts
from resp.adapters import adapter_for
from resp.masks import Mask, MaskError, apply_mask, check_mask_fits
from resp.structures import Structures, structures_for
from resp.traces import IGNORE_INDEX, TraceError, TraceSet, decode_only_batches

log = logging.getLogger(__name__)

MANIFEST = "resp_heal.json"
MASK_DIR = "mask"   # the mask of the healed model (a subdirectory: not part of the model's content hash)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HealError(ValueError):
    """Healing inputs that cannot be used together."""


# ---------------------------------------------------------------- pruned units stay pruned

def keep_tensors(model, mask: Mask, s: Structures) -> dict[str, torch.Tensor]:
    """{parameter name: bool tensor of its shape, False on pruned entries} for every decoder
    projection weight and bias of `model` (a stock model, names as `named_parameters` gives them)."""
    adapter = adapter_for(model.config)
    hd = s.head_dim
    kv_alive = mask.kv_alive(s)
    keep = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for i, layer in enumerate(adapter.layers(model)):
        heads = mask.heads[i].repeat_interleave(hd)          # q rows / o columns
        kv = kv_alive[i].repeat_interleave(hd)               # k, v rows
        channels = mask.channels[i]                           # gate, up rows / down columns
        rows = {"q_proj": heads, "k_proj": kv, "v_proj": kv, "gate_proj": channels, "up_proj": channels}
        cols = {"o_proj": heads, "down_proj": channels}
        for name in PROJECTIONS:
            proj = getattr(adapter, name)(layer)
            out_keep = rows.get(name, torch.ones(proj.out_features, dtype=torch.bool))
            in_keep = cols.get(name, torch.ones(proj.in_features, dtype=torch.bool))
            keep[names[id(proj.weight)]] = out_keep[:, None] & in_keep[None, :]
            if proj.bias is not None:
                keep[names[id(proj.bias)]] = out_keep.clone()
    return keep


@torch.no_grad()
def take_created_biases(healed, teacher, mask: Mask) -> dict[str, torch.Tensor] | None:
    """Move the biases that `mask`'s bias compensation (FLAP) created out of `healed` (a stock model
    whose config has no place for them: reloaded, they would be dropped) and return them as a mask's
    bias tensors [L, hidden]: applied to the reloaded healed model, the mask creates them again with
    their healed values, as the unhealed mask does on the dense model. Biases the teacher's
    architecture has (e.g. Llama with mlp_bias) stay in the weights, compensation and healing included."""
    if not mask.biases:
        return None
    student_adapter, teacher_adapter = adapter_for(healed.config), adapter_for(teacher.config)
    first = teacher_adapter.layers(teacher)[0]
    created = [name for name in sorted(mask.biases) if getattr(teacher_adapter, name)(first).bias is None]
    moved = {}
    for name in created:
        projections = [getattr(student_adapter, name)(layer) for layer in student_adapter.layers(healed)]
        moved[name] = torch.stack([proj.bias.detach().to(torch.float32).cpu() for proj in projections])
        for proj in projections:
            proj.bias = None
    return moved or None


def _out_in(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept output rows, kept input columns) of a weight's keep-tensor (pruned units are whole rows/columns)."""
    return keep.any(1), keep.any(0)


def lora_keep_tensors(peft_model, weight_keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep-tensors of the LoRA parameters: A [r, in] keeps the base weight's kept input columns,
    B [out, r] its kept output rows, so B @ A is zero on every pruned row and column."""
    keep = {}
    for name, p in peft_model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        module = name.split(".lora_")[0].removeprefix("base_model.model.")
        rows, cols = _out_in(weight_keep[f"{module}.weight"])
        keep[name] = cols[None, :].expand_as(p).clone() if ".lora_A." in name else rows[:, None].expand_as(p).clone()
    return keep


@torch.no_grad()
def zero_pruned(named: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> None:
    """Set every pruned entry of the tensors in `named` to +0.0 (in place)."""
    for name, k in keep.items():
        if named[name] is not None:   # a gradient that was never computed
            named[name].masked_fill_(~k.to(named[name].device), 0.0)   # no copy when already there


def require_peft() -> None:
    """LoRA healing needs peft, an optional extra."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise HealError("heal.mode lora needs peft, which is not installed: pip install peft (the `heal` extra), "
                        "or set heal.mode: full")


def check_lora_rank(rank: int, mask: Mask, s: Structures) -> None:
    """A LoRA rank wider than the narrowest kept block of a pruned layer adds nothing there."""
    for i in s.prunable_layers:
        widths = {"attention": (int(mask.heads[i].sum()) * s.head_dim, f"{int(mask.heads[i].sum())} heads"),
                  "mlp": (int(mask.channels[i].sum()), f"{int(mask.channels[i].sum())} channels")}
        for block, (width, kept) in widths.items():
            if 0 < width < rank:
                raise HealError(f"heal.lora_rank {rank} is larger than layer {i}'s {block} after pruning ({kept} kept, "
                                f"width {width}): lower heal.lora_rank to at most {width} or use heal.mode: full")


# ---------------------------------------------------------------- data, schedule, loss

def check_heal_traces(traces: TraceSet, path: str | Path, task: str, split: str, teacher_key: str) -> None:
    """Healing data: the teacher's (dense model's) own traces of `task`'s calibration `split`."""
    made = traces.manifest
    made_task, made_split = made.get("task"), made.get("split")
    made_key = (made.get("model") or {}).get("key")
    if made_task != task or made_split != split:
        raise HealError(f"healing traces {path} are of task {made_task!r} split {made_split!r}, not task {task!r} split "
                        f"{split!r}: generate them with `resp traces --task {task} --limit N`")
    if made_key != teacher_key or made.get("mask_digest") is not None:
        who = "a pruned model" if made.get("mask_digest") is not None else f"model {str(made_key)[:16]}"
        raise HealError(f"healing traces {path} were generated by {who}, not the dense teacher {teacher_key[:16]}: "
                        f"generate them with `resp traces --task {task} --limit N` on the dense model")
    if not any(t.completion_ids for t in traces.traces):
        raise HealError(f"healing traces {path} have no completion tokens: regenerate them with `resp traces`")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Trace indices of (0-based) `step`: epochs are seeded permutations of all traces, cut into
    ceil(n / batch_size) batches; a function of (seed, step) only, so a resumed run sees the same batches."""
    per_epoch = math.ceil(n / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[index * batch_size:(index + 1) * batch_size].tolist()


def learning_rate(heal, step: int) -> float:
    """Learning rate of (1-based) `step`: linear warmup over heal.warmup_steps, then constant,
    linear to 0 or cosine to 0 at heal.steps."""
    if step <= heal.warmup_steps:
        return heal.lr * step / max(heal.warmup_steps, 1)
    if heal.schedule == "constant":
        return heal.lr
    progress = (step - heal.warmup_steps) / max(heal.steps - heal.warmup_steps, 1)
    if heal.schedule == "linear":
        return heal.lr * (1 - progress)
    return heal.lr * 0.5 * (1 + math.cos(math.pi * progress))


def completion_loss(student_logits: torch.Tensor, labels: torch.Tensor, loss: str,
                    teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over completion tokens (labels != -100) of the next-token loss: cross-entropy on the
    labels (`ce`) or KL(teacher || student) (`kl`)."""
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    student = student_logits[:, :-1][where].float()
    if loss == "ce":
        return F.cross_entropy(student, targets[where])
    teacher = teacher_logits[:, :-1][where].float()
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")


# ---------------------------------------------------------------- checkpoints

def _checkpoint_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".checkpoints")


def _save_checkpoint(directory: Path, run_key: str, step: int, trainable: dict, optimizer, losses: list[float]) -> None:
    state = {"run_key": run_key, "step": step, "trainable": {n: p.detach().clone() for n, p in trainable.items()},
             "optimizer": optimizer.state_dict(), "losses": list(losses)}
    with artifacts.atomic_path(directory / f"step-{step}.pt") as tmp:
        torch.save(state, tmp)
    for old in directory.glob("step-*.pt"):  # keep the newest only: it holds everything a resume needs
        if old.name != f"step-{step}.pt":
            old.unlink(missing_ok=True)


def _latest_checkpoint(directory: Path, run_key: str) -> dict | None:
    """The newest readable checkpoint of this run (same inputs, settings and code); others are ignored."""
    found = sorted(directory.glob("step-*.pt"), key=lambda f: int(f.stem.split("-")[1]) if f.stem.split("-")[1].isdigit() else -1)
    for path in reversed(found):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file cut by a crash while it was renamed cannot happen (atomic), a foreign one can
            log.warning("heal: ignoring unreadable checkpoint %s (%s)", path, type(e).__name__)
            continue
        if state.get("run_key") == run_key:
            return state
        log.info("heal: checkpoint %s belongs to other inputs or settings; starting over", path)
    return None


# ---------------------------------------------------------------- the step

def heal_model(student, teacher, mask: Mask, s: Structures, traces: list, pad_id: int, heal, run_key: str,
               checkpoints: Path | None, desc: str = "heal") -> tuple[object, list[float]]:
    """Train `student` (base weights, `mask` already applied) toward `teacher` on `traces`; return
    (the healed stock model with pruned units zero, the loss of every step). `heal` is a
    `resp.config.HealParams`. With `checkpoints`, resume from and write checkpoints there."""
    torch.manual_seed(heal.seed)
    weight_keep = keep_tensors(student, mask, s)
    if heal.mode == "lora":
        from peft import LoraConfig, get_peft_model

        for p in student.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=heal.lora_rank, lora_alpha=heal.lora_alpha, lora_dropout=0.0,
                            target_modules=list(PROJECTIONS), bias="none")
        model = get_peft_model(student, config)
        keep = lora_keep_tensors(model, weight_keep)
    else:
        model = student
        for p in model.parameters():
            p.requires_grad_(True)
        keep = weight_keep
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainable_keep = {n: k.to(trainable[n].device) for n, k in keep.items() if n in trainable}
    zero_pruned({n: p.data for n, p in trainable.items()}, trainable_keep)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=heal.lr, weight_decay=heal.weight_decay)
    losses: list[float] = []
    start = 0
    state = _latest_checkpoint(checkpoints, run_key) if checkpoints is not None else None
    if state is not None:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state["trainable"][n])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], list(state["losses"])
        log.info("heal: resuming from step %d of %d (%s)", start, heal.steps, checkpoints)
    usable = [t for t in traces if t.completion_ids]
    device = next(teacher.parameters()).device
    model.eval()       # no dropout: a step is a function of its inputs
    teacher.eval()
    bar = tqdm(range(start, heal.steps), desc=desc, unit="step", initial=start, total=heal.steps)
    for step in bar:
        chunk = [usable[i] for i in batch_indices(len(usable), heal.batch_size, heal.seed, step)]
        batch = {k: v.to(device) for k, v in next(decode_only_batches(chunk, len(chunk), pad_id)).items()}
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(heal, step + 1)
        teacher_logits = None
        if heal.loss == "kl":
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = completion_loss(logits, batch["labels"], heal.loss, teacher_logits)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        zero_pruned({n: p.grad for n, p in trainable.items()}, trainable_keep)
        if heal.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), heal.max_grad_norm)
        optimizer.step()
        zero_pruned({n: p.data for n, p in trainable.items()}, trainable_keep)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if checkpoints is not None and heal.checkpoint_every and done % heal.checkpoint_every == 0 and done < heal.steps:
            _save_checkpoint(checkpoints, run_key, done, trainable, optimizer, losses)
    if heal.mode == "lora":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    zero_pruned(dict(model.named_parameters()), weight_keep)   # merged adapters add exact zeros there; this says so
    return model.eval(), losses


def heal_run_key(teacher_key: str, mask_digest: str, trace_digests: list[str], heal, code: str) -> str:
    return artifacts.json_digest({"teacher": teacher_key, "mask": mask_digest, "traces": trace_digests,
                                  "heal": heal.model_dump(mode="json"), "code": code})


def heal(heal_params, model_params, task: str, split: str, mask_path: str | Path, trace_paths: list[str | Path],
         out_dir: str | Path, attention_unit: str, protected_layers, code: dict | None = None,
         method: str | None = None) -> Path:
    """Heal the model of `model_params` pruned by `mask_path` on the dense traces `trace_paths`
    (task `task`, calibration split `split`); write the healed model directory `out_dir`.

    `heal_params` is a `resp.config.HealParams`, `model_params` a `resp.config.ModelParams`;
    `code` is what the manifest records of the code (`resp.stages.table.code_record("heal")`); `method` names
    the method whose heal settings ran (recorded; default the mask's method).

    OUT holds the healed model (stock shapes, pruned units zero), its tokenizer, `resp_heal.json`,
    and `mask/sparsity-T.safetensors`: the mask, made for the healed model, for export and evaluation."""
    from resp.lineage import read_mask
    from resp.models import load_model, model_identity

    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise HealError(f"out {out_dir} is not empty and holds no {MANIFEST} (it is not a healed model): choose a new or "
                        "empty directory; a previous healed model there is replaced, nothing else")
    mask, mask_meta = read_mask(mask_path)
    identity = model_identity(model_params.name_or_path, model_params.revision)
    sets = []
    for path in trace_paths:
        try:
            traces = TraceSet.load(path)
        except TraceError as e:
            raise HealError(str(e)) from None
        check_heal_traces(traces, path, task, split, identity.key)
        sets.append((str(path), traces))
    if not sets:
        raise HealError("no healing traces given: pass the dense model's traces (`resp traces --task TASK --limit N`)")
    teacher, tokenizer = load_model(model_params.name_or_path, model_params.revision, model_params.dtype,
                                    model_params.device, model_params.trust_remote_code)
    s = structures_for(teacher, mask_meta.get("attention_unit", attention_unit),
                       mask_meta.get("protected_layers", protected_layers))
    try:
        check_mask_fits(mask, s, mask_meta, identity.key)
    except MaskError as e:
        raise HealError(f"{mask_path}: {e}") from None
    if heal_params.mode == "lora":
        require_peft()
        check_lora_rank(heal_params.lora_rank, mask, s)
    target = mask_meta["target"] if mask_meta.get("target") is not None else artifacts.parse_target(Path(mask_path).name)
    student = copy.deepcopy(teacher)
    apply_mask(student, mask, s)   # zeroes pruned units and adds the mask's bias compensation (FLAP) once
    for p in teacher.parameters():
        p.requires_grad_(False)

    trace_digests = [t.manifest["digest"] for _, t in sets]
    code = code or {}
    run_key = heal_run_key(identity.key, mask.digest(), trace_digests, heal_params, code.get("digest", ""))
    all_traces = [t for _, ts in sets for t in ts.traces]
    checkpoints = _checkpoint_dir(out_dir)
    healed, losses = heal_model(student, teacher, mask, s, all_traces, tokenizer.pad_token_id, heal_params, run_key,
                                checkpoints, desc=f"heal {task}")
    tokens = sum(len(t.completion_ids) for t in all_traces)
    manifest = {
        "kind": "healed",
        "teacher": {**identity.to_dict(), "key": identity.key},
        "task": task, "split": split, "method": method or mask_meta.get("method"), "target": target,
        "mask": {"path": str(mask_path), "digest": mask.digest(), "method": mask_meta.get("method"),
                 "target": mask_meta.get("target"), "sparsity": mask.sparsity(s)},
        "traces": [{"path": p, "digest": t.manifest["digest"], "n": len(t.traces),
                    "prompt_ids_digest": t.prompt_ids_digest()} for p, t in sets],
        "heal": heal_params.model_dump(mode="json"),
        "code": code,
        "run_key": run_key,
        "completion_tokens": tokens,
        "trained_tokens": _trained_tokens(all_traces, heal_params),
        "loss": {"first": losses[0], "last": losses[-1], "mean_first_10": float(np.mean(losses[:10])),
                 "mean_last_10": float(np.mean(losses[-10:]))},
        "attention_unit": s.attention_unit, "protected_layers": list(s.protected),
    }
    healed_biases = take_created_biases(healed, teacher, mask)
    with artifacts.atomic_dir(out_dir) as tmp:
        healed.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        healed_identity = model_identity(str(tmp))   # content hash: the same wherever the directory lives
        # The mask again, made for the healed weights, so that `resp export --model OUT --mask OUT/mask/...`
        # and `resp evaluate` read a healed model as any other. Its biases: the healed values of those the
        # compensation created (a stock config cannot hold them); compensation of existing biases is in the weights.
        mask_meta_out = {**{k: v for k, v in mask_meta.items() if k != "digest"},
                         "model": {**healed_identity.to_dict(), "name": f"{identity.name} (healed)",
                                   "key": healed_identity.key},
                         "method": method or mask_meta.get("method"),
                         "label": f"{mask_meta.get('label', mask_meta.get('method'))} + heal",
                         "healed_from": {"mask": str(mask_path), "digest": mask.digest(), "base_model": manifest["teacher"]}}
        Mask(mask.heads, mask.channels, healed_biases).save(artifacts.mask_file(tmp / MASK_DIR, target), mask_meta_out)
        artifacts.write_json(tmp / MANIFEST, {**manifest, "healed_model": mask_meta_out["model"]}, sort_keys=True,
                             newline=True)
    shutil.rmtree(checkpoints, ignore_errors=True)   # the run is complete: nothing left to resume
    log.info("healed %s (%s %s, %d steps, loss %s %.4f -> %.4f) -> %s", mask_path, heal_params.mode, heal_params.loss,
             heal_params.steps, heal_params.loss, manifest["loss"]["mean_first_10"], manifest["loss"]["mean_last_10"],
             out_dir)
    return out_dir


def _trained_tokens(traces: list, heal) -> int:
    """Completion tokens the optimizer saw over all steps (a trace counts each time it is drawn)."""
    usable = [t for t in traces if t.completion_ids]
    return sum(len(usable[i].completion_ids) for step in range(heal.steps)
               for i in batch_indices(len(usable), heal.batch_size, heal.seed, step))


def load_healed(directory: str | Path, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, mask path, manifest) of a healed model directory."""
    from resp.models import load_model

    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise HealError(f"{directory} holds no {MANIFEST}: it is not a healed model; run `resp heal` first")
    manifest = json.loads((directory / MANIFEST).read_text())
    model, tokenizer = load_model(str(directory), None, dtype, device)
    return model, tokenizer, healed_mask(directory), manifest


def healed_mask(directory: str | Path) -> Path:
    """The mask file of a healed model directory (made for the healed model)."""
    return artifacts.mask_file(Path(directory) / MASK_DIR, json.loads((Path(directory) / MANIFEST).read_text())["target"])
