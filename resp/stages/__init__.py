"""The workflow's stages: one declaration each (`table.STAGES`) and one plain function beside it.

    table.py         the declarations: params sections read, file arguments, code, outputs; code digests
    common.py        what the bodies share: the base model's identity, the per-process model cache
    traces.py        dense_traces, heldout_traces, heal_traces: the dense model's own traces
    calibrate.py     the calibration a method declares, from the table of calibration sources
    score.py         Taylor scores of the model under a mask on traces (decode-only)
    apply.py         a mask pruned by scores up to a sparsity
    regenerate.py    traces of the model under a mask
    baseline.py      one-shot scorers' masks at every target
    write_run.py     the run's masks/ and summary.json
    export.py        masked / compact / uniform exports of mask files
    evaluate.py      metrics of a run's masks
    heal.py          a pruned model healed on the dense model's traces
    healed.py        a healed model exported and evaluated under the mask made for it

`resp.recipe.prune` composes calibrate -> (score -> apply -> regenerate?)* | baseline -> write_run;
the CLI and the API call these functions in one process, the Prefect flow (flows/pipeline.py)
makes one cached task per stage from the table. A "step" is a pruning step of the schedule
(`prune.steps`, `steps/step-0001/`), never one of these. A stage that reads `methods.{method}` takes
the method as a value (`resp.config.Method`: name and declaration, built once where a run enters by
`declared_method`) and never looks it up in params again; `evaluate` takes only a label ("dense" too).
"""
