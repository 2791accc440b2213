"""RESP: structured pruning of reasoning LLMs calibrated on their own reasoning traces.

The Python API (`resp/api.py`), one call per job of the workflow (README, "Python API"):

    import resp
    p = resp.load_params("params.yaml", ["model.name_or_path=Qwen/Qwen3-0.6B", "evaluation.nll_traces=0"])
    traces = resp.make_traces(p, "gsm8k", "runs/gsm8k/dense.jsonl")
    masks = resp.prune(p, "gsm8k", "resp", "runs/gsm8k/resp", dense_traces=traces)
    resp.export(p, masks[0.3], "compact", "checkpoints/gsm8k/resp-0.30")
    resp.evaluate(p, "gsm8k", masks, "metrics/gsm8k/resp.json", dense=True)

Names load on first use (PEP 562), so `import resp` imports neither torch nor transformers.

`export` and `evaluate` are also the names of the library modules `resp.export` and
`resp.evaluate`, and Python binds a submodule to its package's attribute whenever it is first
imported (`from resp.evaluate import evaluate_masks` anywhere does). So instead of a function
that an import would silently replace, those two modules are made callable: `resp.evaluate(...)`
calls `resp.api.evaluate`, and `resp.evaluate.evaluate_masks`, `import resp.export as x` and
monkeypatching keep working as before.
"""

import importlib
import sys
import types

# name -> module it comes from; `export` and `evaluate` are the callable modules
_API = {"load_params": "resp.config", "make_traces": "resp.api", "prune": "resp.api"}
_CALLABLE_MODULES = ("export", "evaluate")
__all__ = ["load_params", "make_traces", "prune", "export", "evaluate"]


class _CallableModule(types.ModuleType):
    """`resp.export` / `resp.evaluate`: the library module, callable as the API function of its name."""

    def __call__(self, *args, **kwargs):
        from resp import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)

    def __reduce__(self):
        # by reference, as (cloud)pickle treats a plain module: Dask ships functions that use them
        return importlib.import_module, (self.__name__,)


class _Package(types.ModuleType):
    """The `resp` package: makes `resp.export` / `resp.evaluate` callable as the import system
    binds them (its `setattr(parent, child, module)` after a first import)."""

    def __setattr__(self, name, value):
        if name in _CALLABLE_MODULES and type(value) is types.ModuleType and value.__name__ == f"resp.{name}":
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"resp.{name}")   # binds it (callable) as an attribute
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
