"""RESP: structured pruning of reasoning LLMs calibrated on their own reasoning traces.

The Python API (`resp/api.py`), one call per job of the workflow (README, "Python API"):

    import resp
    p = resp.load_params("params.yaml", ["model.name_or_path=Qwen/Qwen3-0.6B", "evaluation.nll_traces=0"])
    traces = resp.make_traces(p, "gsm8k", "runs/gsm8k/dense.jsonl")
    masks = resp.prune(p, "gsm8k", "resp", "runs/gsm8k/resp", dense_traces=traces)
    healed = resp.heal(p, "gsm8k", masks[0.5], heal_traces, "runs/gsm8k/healed-0.50", method="resp_heal")
    resp.export(p, masks[0.3], "compact", "checkpoints/gsm8k/resp-0.30")
    resp.evaluate(p, "gsm8k", masks, "metrics/gsm8k/resp.json", dense=True)

Names load on first use (PEP 562), so `import resp` imports neither torch nor transformers; it
checks the installed transformers against the range resp is tested on (read from package metadata).
"""

import importlib
from importlib import metadata

# The transformers versions resp is tested on (pyproject.toml declares the same; tests/test_packaging.py).
TRANSFORMERS_RANGE = ">=5.24,<6"


def check_transformers(installed: str | None = None) -> None:
    """One-line ImportError unless the installed transformers (or `installed`) lies in TRANSFORMERS_RANGE."""
    from packaging.specifiers import SpecifierSet

    if installed is None:
        try:
            installed = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            installed = "none"
    if installed == "none" or not SpecifierSet(TRANSFORMERS_RANGE).contains(installed, prereleases=True):
        raise ImportError(f"resp needs transformers{TRANSFORMERS_RANGE}, found {installed}: "
                          f"pip install 'transformers{TRANSFORMERS_RANGE}' (or install requirements.lock, README)")


check_transformers()

_API = {"load_params": "resp.config", "make_traces": "resp.api", "prune": "resp.api", "export": "resp.api",
        "evaluate": "resp.api", "heal": "resp.api"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
