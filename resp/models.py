"""Model loading and model identity (for lineage).

A model is a Hugging Face hub id (with optional revision) or a local directory. Its identity
is the hub commit sha when known, otherwise a content hash of every file that decides its
behaviour: weights, config, tokenizer, chat template and generation config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from resp.adapters import UnsupportedArchitecture, adapter_for
from resp.artifacts import is_local

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a local model's content hash covers: a changed tokenizer, chat template or generation config
# changes what the model does as much as its weights. Lineage records the scheme (IDENTITY_SCHEME);
# records without one were hashed over LEGACY_IDENTITY_FILES.
IDENTITY_FILES = ("*.safetensors", "*.bin", "config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.jinja", "chat_template.json")
IDENTITY_SCHEME = "weights+config+tokenizer+chat_template+generation_config"
LEGACY_IDENTITY_FILES = ("*.safetensors", "*.bin", "config.json")


class ModelLoadError(ValueError):
    pass


@dataclass(frozen=True)
class ModelIdentity:
    name: str                  # hub id or local path as given
    revision: str | None       # hub commit sha (None for local directories)
    content_hash: str | None   # sha256 of weight + config files (local directories)

    @property
    def key(self) -> str:
        return self.revision or self.content_hash or self.name

    def to_dict(self) -> dict:
        return asdict(self)


def check_model_ref(name_or_path: str) -> None:
    """A path that is not a directory is an error; a hub id (org/name) is resolved by whoever loads it."""
    if is_local(name_or_path) and not Path(name_or_path).is_dir():
        raise ModelLoadError(f"model directory {name_or_path} does not exist: check model.name_or_path")


_HASHES: dict[tuple, str] = {}


def content_hash(directory: str | Path, patterns: tuple[str, ...] = IDENTITY_FILES) -> str:
    """sha256 over the (sorted) IDENTITY_FILES of a local model directory (memoised per process by the
    files' paths, sizes and modification times: a check and a run hash once)."""
    directory = Path(directory)
    files = sorted({f for pattern in patterns for f in directory.glob(pattern)})
    if not any(f.suffix in (".safetensors", ".bin") for f in files):
        raise ModelLoadError(f"{directory} holds no weight files (*.safetensors or *.bin): point model.name_or_path at a saved model")
    stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp in _HASHES:
        return _HASHES[stamp]
    _HASHES[stamp] = _hash_files(files)
    return _HASHES[stamp]


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_identity(name_or_path: str, revision: str | None = None) -> ModelIdentity:
    """Resolve what exactly `name_or_path` is right now (used for lineage and re-pruning)."""
    check_model_ref(name_or_path)
    if is_local(name_or_path):
        return ModelIdentity(name_or_path, None, content_hash(name_or_path))
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(name_or_path, revision=revision).sha
    except Exception as e:  # offline, unknown id, gated repository, bad revision
        raise ModelLoadError(f"hub model {name_or_path!r}{f' revision {revision!r}' if revision else ''} cannot be resolved "
                             f"({_first_line(e)}): check the id, revision and network, or download it and set "
                             "model.name_or_path to the local directory") from None
    return ModelIdentity(name_or_path, sha, None)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"model.device is {device} but no CUDA device is available here: set model.device=cpu")
        index = device.split(":")[1] if ":" in device else "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ModelLoadError(f"model.device {device} names a GPU this machine does not have "
                                 f"({torch.cuda.device_count()} visible): set model.device=cuda:0")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError(f"model.device is {device} but MPS is not available here: set model.device=cpu")
    elif kind != "cpu":
        raise ModelLoadError(f"model.device {device!r} is not a device torch knows here: use cpu, cuda or cuda:N")


def _config_json(name_or_path: str) -> dict | None:
    path = Path(name_or_path) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}): the model directory is corrupt; re-save or re-download it") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_files(directory: str | Path) -> None:
    """A local model directory must carry its tokenizer; one saved from a GGUF file often does not."""
    directory = Path(directory)
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        return
    raise ModelLoadError(f"{directory} has no tokenizer: none of {', '.join(TOKENIZER_FILES)}; save it beside the weights "
                         f"(from GGUF: AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name).save_pretrained('{directory}'), "
                         "as benchmarks/real_model.py prepare does)")


def _check_layer_count(name_or_path: str, config) -> None:
    """Before loading: the layers stored in a local directory's safetensors files are the layers config.json
    declares (the common way a config and its weights part; `_check_weights_fit_config` catches the rest)."""
    import re

    from safetensors import safe_open

    stored = set()
    for f in Path(name_or_path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names = st.keys()   # a safe_open handle has no __contains__/__iter__
            stored.update(int(m.group(1)) for k in names if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    declared = getattr(config, "num_hidden_layers", None)
    if stored and declared is not None and len(stored) != declared:
        raise ModelLoadError(f"model {name_or_path}: config.json disagrees with the weights (num_hidden_layers "
                             f"{declared}, {len(stored)} layers stored): fix config.json or re-save the model with "
                             "save_pretrained")


def _check_weights_fit_config(name_or_path: str, loading: dict) -> None:
    """Weights and config.json must describe the same model: transformers drops stored tensors the
    config has no place for (8 layers stored, 4 declared: a 4-layer model) and randomly initialises
    declared ones that are not stored, with a log line only."""
    unused, missing = loading.get("unexpected_keys") or [], loading.get("missing_keys") or []
    mismatched = loading.get("mismatched_keys") or []
    if unused or missing or mismatched:
        parts = [f"{len(v)} {what} (e.g. {min(v) if what != 'of another shape' else v[0][0]})"
                 for what, v in (("stored tensors it has no place for", unused), ("tensors not stored", missing),
                                 ("of another shape", mismatched)) if v]
        raise ModelLoadError(f"model {name_or_path}: config.json disagrees with the weights ({'; '.join(parts)}): fix "
                             "config.json (e.g. num_hidden_layers) or re-save the model with save_pretrained")


def load_model(name_or_path: str, revision: str | None = None, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool = False):
    """Load (model, tokenizer) for pruning; the model is in eval mode on `device`.

    Code inside a model directory runs only with `trust_remote_code=True` (model.trust_remote_code,
    `--trust-remote-code`); nothing in the directory can turn it on. A compact export of resp
    (config model_type `resp_compact`) loads with resp's own copy of its modeling code, never the
    copy in the directory. transformers is never left to ask interactively.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_ref(name_or_path)
    check_device(device)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    local = _config_json(name_or_path) if is_local(name_or_path) else None
    if is_local(name_or_path) and local is None:
        raise ModelLoadError(f"{name_or_path} has no config.json: point model.name_or_path at a saved model directory")
    compact = (local or {}).get("model_type") == "resp_compact"
    try:
        if compact:  # inference only: no pruning adapter, resp's own classes
            from resp.checkpoints.modeling_compact import RespCompactConfig, RespCompactForCausalLM

            config = RespCompactConfig.from_pretrained(name_or_path)
            model = RespCompactForCausalLM.from_pretrained(name_or_path, config=config, dtype=DTYPES[dtype])
        else:
            if (local or {}).get("auto_map") and not trust_remote_code:
                raise ModelLoadError(f"{name_or_path} ships its own modeling code (auto_map in config.json): pass "
                                     "--trust-remote-code (model.trust_remote_code=true) only if you trust that code")
            config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
            adapter_for(config)  # fail early, naming the supported families
            if local is not None:
                _check_layer_count(name_or_path, config)
            architectures = getattr(config, "architectures", None) or []
            if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
                raise ModelLoadError(f"{name_or_path} is a {architectures[0]}, not a causal language model (*ForCausalLM)")
            model, loading = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=DTYPES[dtype],
                                                                  trust_remote_code=trust_remote_code,
                                                                  output_loading_info=True)
            _check_weights_fit_config(name_or_path, loading)
        if local is not None:
            check_tokenizer_files(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (ModelLoadError, UnsupportedArchitecture):
        raise
    except Exception as e:  # OSError (offline hub, missing files), safetensors errors (truncated weights), ...
        text = _first_line(e)
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"{name_or_path} needs its own modeling code ({text}): pass --trust-remote-code "
                                 "(model.trust_remote_code=true) only if you trust that code") from None
        if is_local(name_or_path):
            raise ModelLoadError(f"model {name_or_path} cannot be loaded ({type(e).__name__}: {text}): its files are "
                                 "truncated or corrupt; re-save or re-download the model") from None
        raise ModelLoadError(f"hub model {name_or_path!r} cannot be loaded ({type(e).__name__}: {text}): check the id "
                             "and network, or download it and set model.name_or_path to the local directory") from None
    model.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s (%s, %d parameters) on %s", name_or_path, dtype, model.num_parameters(), device)
    return model, tokenizer
