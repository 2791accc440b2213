"""Exports of a pruned model (method step 10): masked, compact, uniform.

- masked: stock config and shapes, pruned structures zeroed; loads anywhere.
- compact: physically smaller per-layer shapes (`modeling_compact.py` travels with the weights);
  loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; same logits as masked.
- uniform: the mask rounded to one shape for all layers, in the stock config (see `uniform.py`).

Every export directory holds the weights, config, tokenizer and `resp_manifest.json`: format, base
model identity, mask digest, the per-layer plan, and parameter counts (`stored`: saved in the
files; `effective`: those that can change the output, i.e. without zeroed units).
"""

from __future__ import annotations

import logging
from pathlib import Path

from resp.artifacts import atomic_dir, write_json
from resp.checkpoints.compact import compact_model
from resp.checkpoints.masked import masked_model
from resp.checkpoints.slicing import ExportError
from resp.checkpoints.uniform import layer_changes, uniform_model
from resp.masks import Mask, check_mask_fits
from resp.structures import Structures, structures_for

log = logging.getLogger(__name__)

MANIFEST = "resp_manifest.json"


def _masked(model, mask: Mask, s: Structures, channel_multiple: int) -> tuple:
    exported = masked_model(model, mask, s)
    plan = [{"kv_heads": int(kv), **kept} for kv, kept in zip(mask.kv_alive(s).sum(1).tolist(), mask.kept_per_layer())]
    effective = model.num_parameters() - mask.pruned_params(s)
    return exported, {"plan": plan, "effective_params": effective}


def _compact(model, mask: Mask, s: Structures, channel_multiple: int) -> tuple:
    exported, plans = compact_model(model, mask, s)
    # classmethods: the saved config.json gets an auto_map and the modeling file is copied next to it
    type(exported).register_for_auto_class("AutoModelForCausalLM")
    type(exported.config).register_for_auto_class()
    return exported, {"plan": [p.summary() for p in plans], "effective_params": exported.num_parameters()}


def _uniform(model, mask: Mask, s: Structures, channel_multiple: int) -> tuple:
    exported, plans, shape = uniform_model(model, mask, s, channel_multiple)
    plan = [{**p.summary(), **change} for p, change in zip(plans, layer_changes(plans, mask, s))]
    return exported, {"plan": plan, "rounding": shape, "effective_params": exported.num_parameters()}


FORMATS = {"masked": _masked, "compact": _compact, "uniform": _uniform}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r} is not one of {sorted(FORMATS)}")


def check_export_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an export directory this tool must not replace: a file, a path
    that cannot be written, or a non-empty directory that is not a resp export (no
    `resp_manifest.json`) unless `overwrite`. A previous export is replaced (after the new one is
    complete); nothing else is ever deleted."""
    from resp.outputs import check_output

    out = Path(out)
    check_output(out, "dir")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} is not empty and holds no {MANIFEST} (it is not a resp export): "
                          "choose a new or empty directory, or pass --overwrite to replace its contents")
    return out


def export_model(model, tokenizer, mask: Mask, s: Structures, fmt: str, out_dir: str | Path,
                 channel_multiple: int, manifest_extra: dict | None = None,
                 mask_meta: dict | None = None, model_key: str | None = None, overwrite: bool = False) -> Path:
    """Write `model` pruned by `mask` in format `fmt` to `out_dir` (via a hidden temp directory
    beside it); return the path. `out_dir` must pass `check_export_dir` (`overwrite`: replace a
    non-empty directory that is not an export).

    `model` holds the base (unmasked) weights and is not modified. `mask_meta`/`model_key` let
    `check_mask_fits` refuse a mask made for another model; `manifest_extra` (e.g. the base model
    identity) is merged into the manifest. `tokenizer` may be None (nothing to save).
    """
    check_format(fmt)
    out = check_export_dir(out_dir, overwrite)
    check_mask_fits(mask, s, mask_meta, model_key)
    exported, report = FORMATS[fmt](model, mask, s, channel_multiple)
    stored = exported.num_parameters()
    manifest = {
        **(manifest_extra or {}),
        "format": fmt,
        "mask_digest": mask.digest(),
        "decoder_sparsity": mask.sparsity(s),
        "params": {"base": model.num_parameters(), "stored": stored, "effective": report.pop("effective_params")},
        **report,
    }
    with atomic_dir(out) as tmp:  # an existing `out` passed `check_export_dir`: it is replaced once this one is whole
        exported.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, manifest, sort_keys=True)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    log.info("wrote %s export to %s (%d stored / %d effective parameters, %.1f MB on disk)",
             fmt, out, stored, manifest["params"]["effective"], size / 1e6)
    return out


def export_mask_file(model, tokenizer, identity, mask_path: str | Path, fmt: str, out_dir: str | Path,
                     channel_multiple: int, attention_unit: str, protected_layers, overwrite: bool = False) -> Path:
    """`export_model` for a mask file written by pruning: the mask is checked against the base
    model `identity` (a `resp.models.ModelIdentity`), its structures follow the mask's manifest
    (`attention_unit`/`protected_layers` are the fallbacks), and the manifest names both."""
    mask, meta = Mask.load(mask_path)
    s = structures_for(model, meta.get("attention_unit", attention_unit), meta.get("protected_layers", protected_layers))
    return export_model(model, tokenizer, mask, s, fmt, out_dir, channel_multiple,
                        manifest_extra={"base_model": {**identity.to_dict(), "key": identity.key},
                                        "mask_file": str(mask_path)},
                        mask_meta=meta, model_key=identity.key, overwrite=overwrite)
