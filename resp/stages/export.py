"""Exports of mask files (method step 10): masked, compact or uniform checkpoints of the base model
pruned by each mask. `export_masks` is the one way the API, the CLI and the flow export."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from resp.config import Params


def export_masks(params: Params, jobs: list[tuple[str | Path, str, str | Path]], model: str | None = None,
                 revision: str | None = None, overwrite: bool = False, base: dict | None = None,
                 trust_remote_code: bool = False) -> list[Path]:
    """Write every (mask file, format, directory) of `jobs` from one load of the base model.

    Before the model loads: every format is known, every mask reads and is the target its name says,
    every directory may be written (a non-empty one that is not a resp export only with `overwrite`),
    and each is locked (a second writer fails at once). model/revision: the base model the masks were
    made for (default model.name_or_path / model.revision); `base`: its identity when already resolved;
    `trust_remote_code` (or model.trust_remote_code) runs modeling code shipped in the model directory."""
    from resp.checkpoints import check_export_dir, check_format, export_mask_file
    from resp.lineage import check_mask_file
    from resp.locking import export_dir_lock
    from resp.models import ModelIdentity, load_model, model_identity

    for _, fmt, _ in jobs:
        check_format(fmt)
    for mask, _, out in jobs:
        check_mask_file(mask)
        check_export_dir(out, overwrite)
    name, revision = (model, revision) if model else (params.model.name_or_path, revision or params.model.revision)
    identity = (ModelIdentity(base["name"], base["revision"], base["content_hash"]) if base is not None and not model
                else model_identity(name, revision))
    written = []
    with ExitStack() as locks:
        for out in dict.fromkeys(str(out) for _, _, out in jobs):
            locks.enter_context(export_dir_lock(out))
        lm, tokenizer = load_model(name, revision, params.model.dtype, params.model.device,
                                   trust_remote_code or params.model.trust_remote_code)
        for mask, fmt, out in jobs:
            written.append(export_mask_file(lm, tokenizer, identity, mask, fmt, out, params.export.channel_multiple,
                                            params.prune.attention_unit, params.prune.protected_layers, overwrite))
    return written


def export(params: Params, mask: str, formats: list[str], out_root: str, base: dict) -> dict[str, str]:
    """The model pruned by `mask` in every format, to `<out_root>/<format>/` (the flow's layout)."""
    jobs = [(mask, fmt, Path(out_root) / fmt) for fmt in formats]
    return {fmt: str(path) for fmt, path in zip(formats, export_masks(params, jobs, base=base))}
