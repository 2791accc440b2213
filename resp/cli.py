"""The `resp` command line: one small function per subcommand, each calling library entry points.

Every subcommand reads `--params PATH` (default params.yaml) with repeated
`--set section.key=value` overrides, validated by `resp.config.load_params`. Bad input ends
a command with its one-line message and exit code 2, not a traceback. Logs go to stderr;
results go to stdout and to the files the options name.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, get_args

import typer

from resp.config import Params, TaskParams, load_params

log = logging.getLogger("resp")

app = typer.Typer(help="RESP: structured pruning of reasoning LLMs calibrated on their own reasoning traces.",
                  no_args_is_help=True, add_completion=False)

ParamsPath = Annotated[Path, typer.Option("--params", help="params file (every knob of the project)")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="override a param: section.key=value (repeatable)")]


@app.callback()
def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@contextmanager
def user_errors():
    """Project errors subclass ValueError and carry a one-line message naming the fix."""
    try:
        yield
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _eval_task(params: Params, task: str | None, task_file: Path | None, fmt: str | None,
               split: str | None) -> tuple[str, TaskParams, str]:
    """(label, task params, split) from either a named task or a local task file."""
    if (task is None) == (task_file is None):
        raise ValueError("give exactly one of --task NAME (from params.yaml tasks) or --task-file PATH --format F")
    if task is not None:
        if task not in params.tasks:
            raise ValueError(f"task {task!r} is not in params.yaml tasks; defined: {sorted(params.tasks)}")
        task_params = params.tasks[task]
        return task, task_params, split or task_params.eval_split
    formats = get_args(TaskParams.model_fields["format"].annotation)
    if fmt not in formats:
        raise ValueError(f"--task-file needs --format, one of {list(formats)} (got {fmt!r})")
    split = split or task_file.name.split(".")[0]  # test.jsonl -> ids test-0, test-1, ...
    task_params = TaskParams(format=fmt, source=str(task_file), subset=None, few_shot=0,
                             calibration_split=split, eval_split=split)
    return str(task_file), task_params, split


@app.command("eval")
def eval_command(
    model: Annotated[str | None, typer.Option(help="hub id or local model directory (default: params model.name_or_path)")] = None,
    revision: Annotated[str | None, typer.Option(help="hub revision (branch, tag or sha)")] = None,
    task: Annotated[str | None, typer.Option(help="task name from params.yaml tasks")] = None,
    task_file: Annotated[Path | None, typer.Option(help="a local task file instead of --task (needs --format)")] = None,
    task_format: Annotated[str | None, typer.Option("--format", help="format of --task-file: gsm8k, mathqa or text")] = None,
    split: Annotated[str | None, typer.Option(help="split to evaluate (default: the task's eval_split)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N items (default: evaluation.num_items)")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature; 0 = greedy")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed (default: first of evaluation.sample_seeds)")] = None,
    out: Annotated[Path | None, typer.Option(help="write metrics and per-item records to this JSON file")] = None,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Evaluate a model on a task: accuracy, mean completion length, truncation rate."""
    # Imported here so that `resp --help` does not pay for torch and transformers.
    from resp.evaluate import evaluate_task, write_json
    from resp.generation import SamplingSpec
    from resp.models import load_model
    from resp.tasks import load_items

    with user_errors():
        p = load_params(params, overrides)
        label, task_params, split = _eval_task(p, task, task_file, task_format, split)
        if seed is None and not p.evaluation.sample_seeds:
            raise ValueError("evaluation.sample_seeds is empty: pass --seed")
        seed = p.evaluation.sample_seeds[0] if seed is None else seed
        items = load_items(task_params, split)[: limit or p.evaluation.num_items]
        name, revision = (model, revision) if model else (p.model.name_or_path, revision or p.model.revision)
        lm, tokenizer = load_model(name, revision, p.model.dtype, p.model.device)
        spec = SamplingSpec(temperature=temperature, top_p=p.evaluation.top_p, top_k=p.evaluation.top_k,
                            max_new_tokens=p.evaluation.max_new_tokens)
        started = time.perf_counter()
        result = evaluate_task(lm, tokenizer, items, task_params.format, spec, p.evaluation.batch_size, seed)
        seconds = time.perf_counter() - started
    correct = sum(r["correct"] for r in result["records"])
    typer.echo(f"{label} [{split}] {name}: accuracy {result['accuracy']:.4f} ({correct}/{result['n']}), "
               f"mean completion {result['mean_completion_tokens']:.1f} tokens, "
               f"truncation rate {result['truncation_rate']:.4f}, {seconds:.1f} s")
    if out is not None:
        report = {"model": name, "revision": revision, "task": label, "format": task_params.format, "split": split,
                  "sampling": {**asdict(spec), "seed": seed, "batch_size": p.evaluation.batch_size}, **result}
        log.info("wrote evaluation of %d items to %s", result["n"], write_json(out, report))


@app.command("export")
def export_command(
    mask: Annotated[Path, typer.Option(help="mask file written by pruning (MASK.safetensors with MASK.safetensors.json)")],
    out: Annotated[Path, typer.Option(help="export directory (written as OUT.tmp, then renamed)")],
    export_format: Annotated[str, typer.Option("--format", help="masked, compact or uniform")],
    model: Annotated[str | None, typer.Option(help="base model the mask was made for (default: params model.name_or_path)")] = None,
    revision: Annotated[str | None, typer.Option(help="hub revision (branch, tag or sha)")] = None,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Export a pruned model: masked (zeroed, stock shapes), compact (smaller per-layer shapes) or uniform (stock config)."""
    from resp.export import check_format, export_model
    from resp.masks import Mask
    from resp.models import load_model, model_identity
    from resp.structures import structures_for

    with user_errors():
        p = load_params(params, overrides)
        check_format(export_format)
        pruning_mask, meta = Mask.load(mask)
        name, revision = (model, revision) if model else (p.model.name_or_path, revision or p.model.revision)
        identity = model_identity(name, revision)
        lm, tokenizer = load_model(name, revision, p.model.dtype, p.model.device)
        s = structures_for(lm, meta.get("attention_unit", p.prune.attention_unit),
                           meta.get("protected_layers", p.prune.protected_layers))
        path = export_model(lm, tokenizer, pruning_mask, s, export_format, out, p.export.channel_multiple,
                            manifest_extra={"base_model": {**identity.to_dict(), "key": identity.key},
                                            "mask_file": str(mask)},
                            mask_meta=meta, model_key=identity.key)
    typer.echo(f"wrote {export_format} export to {path}")
