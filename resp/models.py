"""Model loading and model identity (for lineage).

A model is a Hugging Face hub id (with optional revision) or a local directory. Its identity
is the hub commit sha when known, otherwise a content hash of its weight and config files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from resp.adapters import adapter_for

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IDENTITY_FILES = ("*.safetensors", "*.bin", "config.json")


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


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).exists() or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1


def check_model_ref(name_or_path: str) -> None:
    """A path that is not a directory is an error; a hub id (org/name) is resolved by whoever loads it."""
    if _is_local(name_or_path) and not Path(name_or_path).is_dir():
        raise ModelLoadError(f"model directory {name_or_path} does not exist: check model.name_or_path")


def content_hash(directory: str | Path) -> str:
    """sha256 over the (sorted) weight and config files of a local model directory."""
    directory = Path(directory)
    files = sorted({f for pattern in IDENTITY_FILES for f in directory.glob(pattern)})
    if not files:
        raise ModelLoadError(f"{directory} holds no weight files (*.safetensors or *.bin): point model.name_or_path at a saved model")
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
    if _is_local(name_or_path):
        return ModelIdentity(name_or_path, None, content_hash(name_or_path))
    from huggingface_hub import HfApi

    sha = HfApi().model_info(name_or_path, revision=revision).sha
    return ModelIdentity(name_or_path, sha, None)


def load_model(name_or_path: str, revision: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Load (model, tokenizer) for pruning; the model is in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_ref(name_or_path)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    # A compact export (resp_manifest.json says so) carries its own modeling file: trust it, and
    # skip the pruning adapter, since a compact model is for inference, not for pruning again.
    manifest = Path(name_or_path) / "resp_manifest.json"
    compact = manifest.is_file() and json.loads(manifest.read_text()).get("format") == "compact"
    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=compact)
    if not compact:
        adapter_for(config)  # fail early, naming the supported families
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise ModelLoadError(f"{name_or_path} is a {architectures[0]}, not a causal language model (*ForCausalLM)")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=DTYPES[dtype],
                                                 trust_remote_code=compact)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s (%s, %d parameters) on %s", name_or_path, dtype, model.num_parameters(), device)
    return model, tokenizer
