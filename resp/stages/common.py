"""What the stage bodies share: the base model's identity, the model loaded once per process, the
sampling of the generation params, and what every file of a pruning run records about its making."""

from __future__ import annotations

from dataclasses import dataclass

from resp.config import Method, Params
from resp.generation import SamplingSpec
from resp.stages.table import code_record, params_hash


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    masked: object          # resp.masks.MaskedModel: puts the model into any mask's state
    structures: dict        # (attention_unit, protected layers) -> Structures


_MODELS: dict[tuple, LoadedModel] = {}


def base_model(params: Params) -> dict:
    """The base model's identity (hub commit or content hash), computed once per run and passed
    to every stage: it keys the model cache and enters every manifest and cache key."""
    from resp.models import model_identity

    identity = model_identity(params.model.name_or_path, params.model.revision)
    return {**identity.to_dict(), "key": identity.key}


def loaded_model(params: Params, base: dict) -> LoadedModel:
    """The model of `params.model` (identity `base`), loaded once per process and kept."""
    from resp.masks import MaskedModel
    from resp.models import load_model
    from resp.structures import structures_for

    m = params.model
    key = (base["key"], m.name_or_path, m.dtype, m.device, m.trust_remote_code)
    if key not in _MODELS:
        _MODELS.clear()  # one model in memory at a time
        model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype, m.device, m.trust_remote_code)
        _MODELS[key] = LoadedModel(model, tokenizer, None, {})
    loaded = _MODELS[key]
    p = params.prune
    skey = (p.attention_unit, tuple(p.protected_layers or ()))
    if skey not in loaded.structures:
        loaded.structures[skey] = structures_for(loaded.model, p.attention_unit, p.protected_layers)
    s = loaded.structures[skey]
    if loaded.masked is None or loaded.masked.s is not s:
        # every stage starts from the dense weights: masks of different runs are not nested
        loaded.masked = MaskedModel(loaded.model, s, keep_dense=True, dense=loaded.masked.dense if loaded.masked else None)
    return loaded


def drop_loaded_models() -> None:
    """Free the model `loaded_model` keeps (and its device memory) for other processes; the next stage reloads it."""
    import torch

    _MODELS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_mask(path: str | None, s):
    """The mask file at `path`, or the dense mask of structures `s` for None."""
    from resp.masks import Mask

    return Mask.dense(s) if path is None else Mask.load(path)[0]


def sampling_spec(params: Params) -> SamplingSpec:
    g = params.generation
    return SamplingSpec(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_new_tokens=g.max_new_tokens)


def run_manifest(params: Params, task: str, method: Method, base: dict) -> dict:
    """What every file of a pruning run records about how it was made."""
    return {"model": base, "task": task, "method": method.name, "declaration": method.declaration.model_dump(),
            "params_hash": params_hash(params, task, method.name), "code": code_record("prune")}
