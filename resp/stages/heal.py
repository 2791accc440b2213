"""Healing (after method step 9): the model pruned by one mask, trained back towards the dense model
on the dense model's own traces with the settings the method declares (`methods.<m>.heal`)."""

from __future__ import annotations

from resp.config import Method, Params
from resp.stages.table import code_record


def heal(params: Params, task: str, method: Method, mask: str, traces: list[str], out: str) -> str:
    """The healed model of `mask`, written to the directory `out` (`resp.healing.heal`)."""
    from resp.healing import heal as train

    return str(train(method.declaration.heal, params.model, task, params.tasks[task].calibration_split, mask,
                     traces, out, params.prune.attention_unit, params.prune.protected_layers, code_record("heal"),
                     method.name))
