"""The `resp` command line: one small function per subcommand, mapping its options onto one call of
`resp.api` (traces, prune, heal, evaluate) or of a library entry point, and printing the result; the
argument checks are the API's. `resp run` and `resp schedule` (Prefect) are added by flows/cli.py.

Every subcommand reads `--params PATH` (default params.yaml) with repeated
`--set section.key=value` overrides, validated by `resp.config.load_params`. Bad input ends
a command with its one-line message and exit code 2, not a traceback. Logs go to stderr;
results go to stdout and to the files the options name.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, get_args

import typer

from resp.config import Params, TaskParams, declared_method, load_params

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
    """Project errors subclass ValueError and carry a one-line message naming the fix; files that
    cannot be read or written, and corrupt safetensors files, end in one line too."""
    try:
        yield
    except ValueError as e:
        text = " ".join(str(e).split())
        if type(e).__name__ in ("JSONDecodeError", "UnicodeDecodeError"):  # a file that was not named
            text = f"a file this command reads is corrupt ({type(e).__name__}: {text}): re-run the command that wrote it"
        typer.echo(f"error: {text}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        if e.filename is None:
            raise
        typer.echo(f"error: {e.filename}: {e.strerror or type(e).__name__}: check the path and its permissions", err=True)
        raise typer.Exit(2) from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        typer.echo(f"error: a safetensors file is truncated or corrupt ({' '.join(str(e).split())}): re-run the command "
                   "that wrote it", err=True)
        raise typer.Exit(2) from None


TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="run modeling code shipped inside the model "
                                                                             "directory (only for models you trust; "
                                                                             "also model.trust_remote_code)")]


def _early_checks(p: Params, outputs: list[tuple[Path | None, str]] = ()) -> None:
    """Before any model is loaded: the device exists, and every output path can be written."""
    from resp.models import check_device
    from resp.outputs import check_output

    check_device(p.model.device)
    for path, kind in outputs:
        if path is not None:
            check_output(path, kind)


def _benchmark_task(params: Params, task: str | None, task_file: Path | None, fmt: str | None,
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


def _model_ref(params: Params, model: str | None, revision: str | None) -> tuple[str, str | None]:
    """(name, revision) from --model/--revision, falling back to params.model."""
    return (model, revision) if model else (params.model.name_or_path, revision or params.model.revision)


@app.command("benchmark")
def benchmark_command(
    model: Annotated[str | None, typer.Option(help="hub id or local model directory (default: params model.name_or_path)")] = None,
    revision: Annotated[str | None, typer.Option(help="hub revision (branch, tag or sha)")] = None,
    task: Annotated[str | None, typer.Option(help="task name from params.yaml tasks")] = None,
    task_file: Annotated[Path | None, typer.Option(help="a local task file instead of --task (needs --format)")] = None,
    task_format: Annotated[str | None, typer.Option("--format", help="format of --task-file: gsm8k, mathqa or text")] = None,
    split: Annotated[str | None, typer.Option(help="split to evaluate (default: the task's eval_split)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N items (default: evaluation.num_items)")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature; 0 = greedy")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed (default: evaluation.sample_seed)")] = None,
    out: Annotated[Path | None, typer.Option(help="write metrics and per-item records to this JSON file")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an --out file that is not a benchmark report "
                                                                "(a previous report is always replaced)")] = False,
    trust_remote_code: TrustRemoteCode = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Benchmark any model (hub id or directory) on a task or task file: accuracy, mean completion length, truncation rate.

    For the masks of a pruning run (and the metrics file the report reads) use `resp evaluate`."""
    # Imported here so that `resp --help` does not pay for torch and transformers.
    from resp.artifacts import check_replaceable_json, write_json
    from resp.evaluation import evaluate_task
    from resp.generation import SamplingSpec, VllmEngine
    from resp.models import check_model_ref, load_model
    from resp.tasks import load_items

    with user_errors():
        p = load_params(params, overrides)
        label, task_params, split = _benchmark_task(p, task, task_file, task_format, split)
        _early_checks(p, [(out, "file")])
        if out is not None:
            check_replaceable_json(out, BENCHMARK_KEYS, "a `resp benchmark` report", overwrite)
        seed = p.evaluation.sample_seed if seed is None else seed
        items = load_items(task_params, split)[: limit or p.evaluation.num_items]
        name, revision = _model_ref(p, model, revision)
        backend = p.evaluation.backend
        with ExitStack() as stack:
            if backend == "vllm":  # vLLM loads the weights itself (hub ids too); no Hugging Face copy
                check_model_ref(name)
                engine = stack.enter_context(VllmEngine(name, p.scale.vllm_gpu_memory_utilization, "evaluation.backend",
                                                        revision))
                lm, tokenizer = None, engine.tokenizer
            else:
                (lm, tokenizer), engine = load_model(name, revision, p.model.dtype, p.model.device,
                                                     trust_remote_code or p.model.trust_remote_code), None
            spec = SamplingSpec(temperature=temperature, top_p=p.evaluation.top_p, top_k=p.evaluation.top_k,
                                max_new_tokens=p.evaluation.max_new_tokens)
            started = time.perf_counter()
            result = evaluate_task(lm, tokenizer, items, task_params.format, spec, p.evaluation.batch_size, seed, engine,
                                   p.evaluation.reflection_markers)
        seconds = time.perf_counter() - started
    correct = sum(r["correct_strict"] for r in result["records"])
    typer.echo(f"{label} [{split}] {name}: accuracy strict {result['accuracy_strict']:.4f} ({correct}/{result['n']}), "
               f"flexible {result['accuracy_flexible']:.4f}, "
               f"mean completion {result['mean_completion_tokens']:.1f} tokens, "
               f"truncation rate {result['truncation_rate']:.4f}, self-check rate {result['reflection_rate']:.4f}, "
               f"{seconds:.1f} s")
    if out is not None:
        report = {"model": name, "revision": revision, "task": label, "format": task_params.format, "split": split,
                  "sampling": {**asdict(spec), "seed": seed, "batch_size": p.evaluation.batch_size, "backend": backend},
                  **result}
        log.info("wrote evaluation of %d items to %s", result["n"], write_json(out, report, newline=True))


BENCHMARK_KEYS = ("model", "task", "split", "sampling", "records")   # what `resp benchmark --out` writes


@app.command("eval", hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_renamed_command() -> None:
    """Renamed: click would otherwise suggest `resp evaluate`, which evaluates pruning runs instead."""
    typer.echo("error: `resp eval` is now `resp benchmark` (any model on a task); `resp evaluate` evaluates the masks "
               "of a pruning run", err=True)
    raise typer.Exit(2)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="export directory; with --masks-dir the root of OUT/sparsity-T/FORMAT")],
    mask: Annotated[Path | None, typer.Option(help="mask file written by pruning (MASK.safetensors with MASK.safetensors.json)")] = None,
    masks_dir: Annotated[Path | None, typer.Option(help="export every mask of a run directory's masks/ instead of one --mask")] = None,
    export_format: Annotated[str | None, typer.Option("--format", help="masked, compact or uniform (default: every format in export.formats)")] = None,
    model: Annotated[str | None, typer.Option(help="base model the mask was made for (default: params model.name_or_path)")] = None,
    revision: Annotated[str | None, typer.Option(help="hub revision (branch, tag or sha)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out that is not a resp export "
                                                                "(a previous export is always replaced)")] = False,
    trust_remote_code: TrustRemoteCode = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Export a pruned model: masked (zeroed, stock shapes), compact (smaller per-layer shapes) or uniform (stock config)."""
    from resp.artifacts import masks_in_dir, target_name
    from resp.stages.export import export_masks

    with user_errors():
        p = load_params(params, overrides)
        if (mask is None) == (masks_dir is None):
            raise ValueError("give exactly one of --mask FILE or --masks-dir DIR")
        formats = [export_format] if export_format else list(p.export.formats)
        # one directory per format: OUT itself for one format, OUT/FORMAT for several (never one over the other)
        jobs = ([(mask, out if len(formats) == 1 else out / f, f) for f in formats] if mask is not None else
                [(path, out / target_name(target) / f, f) for target, path in masks_in_dir(masks_dir).items() for f in formats])
        _early_checks(p)
        written = export_masks(p, [(m, f, d) for m, d, f in jobs], model, revision, overwrite,
                               trust_remote_code=trust_remote_code)
    for (_, _, fmt), path in zip(jobs, written):
        typer.echo(f"wrote {fmt} export to {path}")


@app.command("validate")
def validate_command(params: ParamsPath = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Check params.yaml (and overrides) without running anything."""
    with user_errors():
        p = load_params(params, overrides)
    typer.echo(f"{params}: valid ({len(p.tasks)} tasks, methods {', '.join(p.run.methods)})")


world_app = typer.Typer(help="The embedded tiny world: task files and the reasoning model trained on them.",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")


@world_app.command("generate")
def world_generate_command(params: ParamsPath = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Write the arith (GSM8K format), choice (MathQA format) and prose task files."""
    from resp.world.problems import write_world

    with user_errors():
        w = load_params(params, overrides).world
    write_world(w.dir, w.seed, w.train_items, w.test_items, w.prose_items)
    typer.echo(f"wrote arith/choice/prose train and test files to {w.dir}")


@world_app.command("train")
def world_train_command(params: ParamsPath = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Train the embedded Qwen3 reasoning model from scratch (deterministic; about an hour on 2 cores)."""
    from resp.world.train import train_embedded_model

    with user_errors():
        p = load_params(params, overrides)
    path = train_embedded_model(p.embedded_model, p.embedded_model.dir, n_test=p.world.test_items, world_seed=p.world.seed)
    typer.echo(f"wrote the embedded model to {path}")


@world_app.command("check")
def world_check_command(
    out: Annotated[Path | None, typer.Option(help="also write the measurements as JSON here")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an --out file that is not a world check")] = False,
    params: ParamsPath = Path("params.yaml"), overrides: Overrides = None,
) -> None:
    """Measure the committed model against the world's targets (accuracy, entropy, length, self-checks)."""
    from resp.artifacts import check_replaceable_json, write_json
    from resp.world.check import format_measurements, measure_world

    with user_errors():
        p = load_params(params, overrides)
        _early_checks(p, [(out, "file")] if out else [])
        if out is not None:
            check_replaceable_json(out, ("arith", "choice"), "a `resp world check` file", overwrite)
        results = measure_world(p)
    typer.echo(format_measurements(results))
    if out is not None:
        typer.echo(f"wrote {write_json(out, results, newline=True)}")


@app.command("traces")
def traces_command(
    task: Annotated[str, typer.Option(help="task name from params.yaml tasks")],
    out: Annotated[Path, typer.Option(help="trace set file (.jsonl; the manifest goes to OUT.json)")],
    split: Annotated[str | None, typer.Option(help="split (default: the task's calibration split, seeded selection)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="number of prompts (default: calibration.num_prompts)")] = None,
    model: Annotated[str | None, typer.Option(help="model (default: params model.name_or_path)")] = None,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Sample the model's own reasoning traces (thinking on) for a task's prompts."""
    from resp.api import make_traces

    with user_errors():
        path = make_traces(load_params(params, overrides), task, out, split=split, limit=limit, model=model)
    typer.echo(f"wrote traces to {path}")


@app.command("prune")
def prune_command(
    task: Annotated[str, typer.Option(help="task name from params.yaml tasks")],
    method: Annotated[str, typer.Option(help="resp, resp_noregen, gisp, generic, wanda_sp, flap, magnitude or random")],
    out: Annotated[Path, typer.Option(help="run directory: masks/, steps/, traces/, summary.json")],
    traces: Annotated[Path | None, typer.Option(help="dense self-generated traces (needed by resp and resp_noregen)")] = None,
    unused_traces_ok: Annotated[bool, typer.Option("--unused-traces-ok", help="a pipeline passing one --traces to every "
                                                   "method: a method that does not read them says so and goes on")] = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Prune a model for a task with one method; writes a mask at every target sparsity."""
    from resp.api import prune
    from resp.artifacts import target_key

    with user_errors():
        p = load_params(params, overrides)
        declared = declared_method(p, method).declaration
        if traces is not None and unused_traces_ok and not declared.reads_dense_traces:
            typer.echo(f"{method} (calibration: {declared.calibration}) does not read --traces {traces}", err=True)
            traces = None
        started = time.perf_counter()
        written = prune(p, task, method, out, dense_traces=traces)
    for target, path in written.items():
        typer.echo(f"target {target_key(target)}: {path}")
    typer.echo(f"{method} on {task}: {len(written)} masks in {time.perf_counter() - started:.1f} s (summary: {out / 'summary.json'})")


@app.command("heal")
def heal_command(
    task: Annotated[str, typer.Option(help="task name from params.yaml tasks")],
    traces: Annotated[list[Path], typer.Option(help="the dense model's traces of the task's calibration split "
                                                    "(`resp traces --limit N`; repeatable)")],
    out: Annotated[Path, typer.Option(help="healed model directory (weights, resp_heal.json, mask/); with --masks-dir "
                                           "the root of OUT/sparsity-T/")],
    mask: Annotated[Path | None, typer.Option(help="mask file written by pruning (MASK.safetensors with MASK.safetensors.json)")] = None,
    masks_dir: Annotated[Path | None, typer.Option(help="heal every mask of a run directory's masks/ instead of one --mask")] = None,
    method: Annotated[str | None, typer.Option(help="method whose heal: {...} settings run (default: the mask's method)")] = None,
    register: Annotated[bool, typer.Option("--register", help="register each healed model in the MLflow registry "
                                                              "(its pruned run must be registered)")] = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Heal a pruned model on the dense model's own reasoning traces (the dense model teaches); pruned units stay zero."""
    from resp.api import heal
    from resp.artifacts import masks_in_dir, target_name
    from resp.healing import healed_mask

    with user_errors():
        p = load_params(params, overrides)
        if (mask is None) == (masks_dir is None):
            raise ValueError("give exactly one of --mask FILE or --masks-dir DIR")
        jobs = [(mask, out)] if mask is not None else [(path, out / target_name(target))
                                                      for target, path in masks_in_dir(masks_dir).items()]
        for mask_path, healed_out in jobs:
            started = time.perf_counter()
            healed = heal(p, task, mask_path, traces, healed_out, method=method)
            typer.echo(f"healed {mask_path} -> {healed} in {time.perf_counter() - started:.1f} s; export it with "
                       f"`resp export --model {healed} --mask {healed_mask(healed)} --format compact --out DIR`")
            if register:
                from resp.registry import register_healed

                v = register_healed(p, healed)
                typer.echo(f"{v['name']} version {v['version']}: healed, parent {v['parent']}"
                           + ("" if v["created"] else " (already registered)"))


@app.command("evaluate")
def evaluate_command(
    task: Annotated[str, typer.Option(help="task name from params.yaml tasks")],
    out: Annotated[Path, typer.Option(help="metrics JSON file, e.g. data/metrics/arith/resp.json")],
    method: Annotated[str | None, typer.Option(help="the method that made the masks in --masks-dir")] = None,
    masks_dir: Annotated[Path | None, typer.Option(help="masks/ of a `resp prune` run (sparsity-*.safetensors), or the run directory")] = None,
    dense: Annotated[bool, typer.Option("--dense", help="evaluate the unpruned model too (alone: the file's method is 'dense')")] = False,
    heldout: Annotated[Path | None, typer.Option(help="held-out dense traces for NLL (`resp traces --split <eval split>`)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an --out file that is not a metrics file "
                                                                "(a previous one is always replaced)")] = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Evaluate a pruning run: the dense model and/or every mask of one method (accuracy greedy and sampled,
    length, truncation, held-out NLL), into the metrics file `resp report` and `resp register` read.

    To benchmark any model (hub id or directory) on a task, use `resp benchmark`."""
    import json

    from resp.api import evaluate

    with user_errors():
        if (masks_dir is None) != (method is None):
            raise ValueError("--masks-dir and --method go together: the method names who made the masks")
        path = evaluate(load_params(params, overrides), task, masks_dir, out, method=method, dense=dense, heldout=heldout,
                        overwrite=overwrite)
    report = json.loads(path.read_text())
    for label, r in report["results"].items():
        nll = f"{r['nll']['nll']:.4f}" if r["nll"] else "-"
        sampled = (f"{r['sampled']['accuracy_strict']:.4f}/{r['sampled']['accuracy_flexible']:.4f}"
                   if r["sampled"] else "-")
        typer.echo(f"{task} {report['method']} {label}: sparsity {r['sparsity']:.4f}, accuracy strict/flexible greedy "
                   f"{r['greedy']['accuracy_strict']:.4f}/{r['greedy']['accuracy_flexible']:.4f}, sampled "
                   f"{sampled}, mean completion "
                   f"{r['greedy']['mean_completion_tokens']:.1f} tokens, truncation {r['greedy']['truncation_rate']:.4f}, NLL {nll}")
    typer.echo(f"wrote {path}")


@app.command("report")
def report_command(
    metrics_dir: Annotated[Path, typer.Option(help="directory holding {task}/{method}.json and {task}/dense.json")],
    out: Annotated[Path, typer.Option(help="report directory: results.md, metrics.json, plots/")],
    runs_dir: Annotated[Path, typer.Option(help="directory holding {task}/{method}/summary.json (trace drift, regenerations)")] = Path("data/runs"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace results.md/metrics.json in --out that resp did "
                                                                   "not write")] = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Write the results table (intervals, paired differences), flat metrics and plots for
    run.tasks x run.methods x prune.targets, as params `report` says."""
    from resp.report import check_report_dir, write_report

    with user_errors():
        p = load_params(params, overrides)
        from resp.outputs import check_output

        check_output(out, "dir")
        check_report_dir(out, overwrite)
        written = write_report(metrics_dir, out, p.run.tasks, list(p.run.methods), p.prune.targets,
                               runs_dir=runs_dir, params=p.report)
    typer.echo(f"wrote {len(written)} files to {out} (table: {out / 'results.md'})")


@app.command("score")
def score_command(
    traces: Annotated[Path, typer.Option(help="trace set to score (.jsonl with its .jsonl.json manifest)")],
    out: Annotated[Path, typer.Option(help="scores file (.safetensors; counts and manifest go to OUT.json)")],
    model: Annotated[str | None, typer.Option(help="model (default: params model.name_or_path)")] = None,
    mask: Annotated[Path | None, typer.Option(help="score the model under this mask file (default: the dense model)")] = None,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Taylor scores of every attention unit and MLP channel on a trace set, as the score stage
    computes them; data-parallel under `torchrun --nproc_per_node=N --no-python resp score ...`
    (gloo on cpu, nccl on cuda), or with the model sharded over the workers (FSDP2) with
    `--set scale.scoring=sharded`."""
    from resp.stages.common import base_model
    from resp.stages.score import score_traces
    from resp.traces import TraceSet, check_usable

    with user_errors():
        p = load_params(params, overrides)
        if model is not None:
            p = p.model_copy(update={"model": p.model.model_copy(update={"name_or_path": model})})
        _early_checks(p, [(out, "file")])
        if out.is_file() and not out.with_name(out.name + ".json").is_file():
            raise ValueError(f"--out {out} exists and is not a scores file (no {out.name}.json manifest beside it): "
                             "choose another --out; previous scores are replaced, other files never")
        if mask is not None and not mask.is_file():
            raise ValueError(f"--mask {mask} not found: pass a mask file written by `resp prune` (masks/ or steps/)")
        check_usable(TraceSet.load(traces), f"scoring {traces}")
        path = score_traces(p, base_model(p), traces, out, mask=None if mask is None else str(mask))
    if path is not None:  # only rank 0 writes
        typer.echo(f"wrote scores to {path}")


@app.command("memory")
def memory_command(
    seq_len: Annotated[int, typer.Option(help="tokens per trace (prompt + completion)")],
    config: Annotated[str | None, typer.Option(help="model directory, hub id or config.json (default: params model.name_or_path)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="traces per backward (default: importance.batch_size)")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: model.dtype)")] = None,
    per_sample_abs: Annotated[bool | None, typer.Option("--per-sample-abs/--no-per-sample-abs", help="default: importance.per_sample_abs")] = None,
    grads_only_scored: Annotated[bool | None, typer.Option("--grads-only-scored/--all-grads", help="default: importance.grads_only_scored")] = None,
    grad_checkpointing: Annotated[bool | None, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="default: importance.grad_checkpointing")] = None,
    nproc: Annotated[int, typer.Option(help="workers of sharded scoring (scale.scoring: sharded): per-worker peak")] = 1,
    gpu_memory: Annotated[float | None, typer.Option(help="GiB per device: say whether it fits, else by how much not and "
                                                          "how many devices would do (default: this machine's CUDA device)")] = None,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Predict the peak memory of one Taylor scoring pass, by component (resp.memory); with --nproc N,
    per worker of sharded scoring."""
    from resp.memory import GIB, fit_verdict, predict_scoring_memory

    with user_errors():
        p = load_params(params, overrides)
        imp = p.importance
        settings = dict(
            attention_unit=p.prune.attention_unit,
            per_sample_abs=imp.per_sample_abs if per_sample_abs is None else per_sample_abs,
            grads_only_scored=imp.grads_only_scored if grads_only_scored is None else grads_only_scored,
            grad_checkpointing=imp.grad_checkpointing if grad_checkpointing is None else grad_checkpointing)
        config, dtype = config or p.model.name_or_path, dtype or p.model.dtype
        batch_size = batch_size or imp.batch_size
        import torch

        devices = torch.cuda.device_count()
        if gpu_memory is None and devices:
            if nproc > devices:
                raise ValueError(f"--nproc {nproc} exceeds the {devices} CUDA device(s) here: use at most {devices}, or "
                                 "pass --gpu-memory GIB to predict for another machine's devices")
            gpu_memory = torch.cuda.get_device_properties(0).total_memory / GIB
        predict = lambda n: predict_scoring_memory(config, dtype, seq_len, batch_size, **settings, nproc=n)  # noqa: E731
        estimate = predict(nproc)
        typer.echo(f"scoring memory of {config}: {dtype}, batch {batch_size} x {seq_len} tokens, "
                   + ", ".join(f"{k}={v}" for k, v in settings.items())
                   + (f", sharded over {nproc} workers (per worker)" if nproc > 1 else ""))
        typer.echo(estimate.table())
        if gpu_memory is not None:
            typer.echo(fit_verdict(predict, nproc, int(gpu_memory * GIB)))


@app.command("cost")
def cost_command(
    prompt_tokens: Annotated[float, typer.Option(help="mean prompt tokens per calibration trace")],
    completion_tokens: Annotated[float | None, typer.Option(help="mean completion tokens per trace (default: generation.max_new_tokens)")] = None,
    prompts: Annotated[int | None, typer.Option(help="calibration traces (default: calibration.num_prompts)")] = None,
    method: Annotated[str | None, typer.Option(help="method (default: report.reference)")] = None,
    config: Annotated[str | None, typer.Option(help="model directory, hub id or config.json (default: params model.name_or_path)")] = None,
    rates: Annotated[Path | None, typer.Option(help="rates file (benchmarks/gpu_check.py writes one)")] = None,
    score_tok_s: Annotated[float | None, typer.Option(help="instead of --rates: scoring tokens/s (forward + backward)")] = None,
    generate_tok_s: Annotated[float | None, typer.Option(help="instead of --rates: generated tokens/s")] = None,
    gpu: Annotated[str | None, typer.Option(help="the device the run will use; refused when the rates were measured on another")] = None,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Predict a pruning run's GPU-hours from measured rates, split into scoring and generation (resp.cost)."""
    from resp.cost import Rates, check_rates, load_rates, model_shape, predict_run
    from resp.memory import config_parameters, load_config

    with user_errors():
        p = load_params(params, overrides)
        method = method or p.report.reference
        declared_method(p, method)
        config = config or p.model.name_or_path
        model_config = load_config(config)
        total, matmul, scored = config_parameters(model_config, p.prune.attention_unit)
        if (rates is None) == (score_tok_s is None or generate_tok_s is None):
            raise ValueError("give either --rates FILE or both --score-tok-s and --generate-tok-s")
        if rates is not None:
            measured = load_rates(rates)
            check_rates(measured, model_config, total, gpu)
        else:
            measured = Rates(gpu or "unnamed", {**model_shape(model_config), "parameters": total}, p.model.dtype,
                             score_tok_s, generate_tok_s, p.importance.batch_size, p.generation.batch_size, "command line")
        completion = completion_tokens or p.generation.max_new_tokens
        n = prompts or p.calibration.num_prompts
        prediction = predict_run(p, method, n, prompt_tokens, completion, measured, (matmul, scored))
    pr = p.prune
    typer.echo(f"{method} on {config} ({total / 1e9:.2f}B parameters): {n} prompts x ({prompt_tokens:g} + {completion:g}) "
               f"tokens, {pr.steps} steps to {max(pr.targets)}, {prediction.regenerations} regenerations, "
               f"score_every {pr.score_every}, score_subsets {pr.score_subsets}, score_tokens {pr.score_tokens}")
    typer.echo(f"rates: {measured.device} ({measured.source}): scoring {measured.score_tokens_per_s:.0f} tokens/s, "
               f"generation {measured.generate_tokens_per_s:.0f} tokens/s")
    typer.echo(prediction.table())


STABLE_VERSION_KEYS = ("base_key", "name", "sparsity", "target")   # what `register --out` writes (a tracked file)


@app.command("register")
def register_command(
    task: Annotated[str | None, typer.Option(help="task name from params.yaml tasks (not with --healed)")] = None,
    method: Annotated[str | None, typer.Option(help="method whose masks to register (not with --healed)")] = None,
    healed: Annotated[Path | None, typer.Option(help="register this healed model (`resp heal --out`) instead of a pruning "
                                                     "run: --exports-dir then holds its <format>/ exports, --metrics is "
                                                     "`resp evaluate` of it; its pruned parent must be registered")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="`resp prune --out` directory (default: <flow.data_dir>/runs/TASK/METHOD)")] = None,
    exports_dir: Annotated[Path | None, typer.Option(help="holds sparsity-<t>/<format>/ exports (default: <flow.data_dir>/checkpoints/TASK/METHOD)")] = None,
    metrics: Annotated[Path | None, typer.Option(help="evaluation JSON of the method (default: <flow.data_dir>/metrics/TASK/METHOD.json when present)")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the registered versions as JSON to this file")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an --out file that is not a versions file "
                                                                "(a previous one is always replaced)")] = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Register every mask of a method in the MLflow registry with its lineage (one version per sparsity).

    Metrics and exports must have been computed from the masks of the run registered: given ones
    that were not are refused; defaults (the data layout) are taken only where their mask digests match.
    With --healed: one version for the healed model, its parent the pruned version it healed."""
    import signal

    from resp.artifacts import Layout, check_replaceable_json, existing_exports, write_json
    from resp.lineage import export_digest, mask_digests, metrics_digests
    from resp.outputs import check_output
    from resp.registry import mask_files, register_method

    # a plain `kill` ends a registration like Ctrl-C: its half-made run is deleted, not left RUNNING
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with user_errors():
        p = load_params(params, overrides)
        if out is not None:
            check_output(out, "file")
            check_replaceable_json(out, ("task", "method", "versions"), "a `resp register` versions file", overwrite)
        if healed is not None:
            if task is not None or method is not None or run_dir is not None:
                raise ValueError("--healed takes the task and method from the healed model's manifest: "
                                 "drop --task, --method and --run-dir")
            _register_healed(p, healed, exports_dir, metrics, out)
            return
        if task is None or method is None:
            raise ValueError("pass --task and --method (a pruning run) or --healed DIR (a healed model)")
        layout = Layout(Path(p.flow.data_dir))
        masks_dir = (run_dir or layout.run_dir(task, method)) / "masks"
        digests = mask_digests(mask_files(masks_dir))
        exports = existing_exports(exports_dir or layout.method_exports(task, method), sorted(digests),
                                   list(p.export.formats))
        if exports_dir is None:  # derived: only the exports of these masks
            exports = {t: kept for t, dirs in exports.items()
                       if (kept := {f: d for f, d in dirs.items() if _derived(d, export_digest(d) == digests[t])})}
        if metrics is None and layout.metrics(task, method).is_file():
            made_from = metrics_digests(layout.metrics(task, method))
            if _derived(layout.metrics(task, method), all(made_from.get(t) == d for t, d in digests.items())):
                metrics = layout.metrics(task, method)
        versions = register_method(p, task, method, masks_dir, exports, metrics)
    if out is not None:  # the same bytes whatever the store: version numbers and run ids are the store's own
        write_json(out, {"task": task, "method": method,
                         "versions": [{k: v[k] for k in STABLE_VERSION_KEYS} for v in versions]}, newline=True)
    for v in versions:
        typer.echo(f"{v['name']} version {v['version']}: target {v['target']}, sparsity {v['sparsity']}, parent {v['parent']}"
                   + (f", replaces version {v['replaces']}" if v["replaces"] else "")
                   + ("" if v["created"] else " (already registered)"))


def _register_healed(p: Params, healed: Path, exports_dir: Path | None, metrics: Path | None, out: Path | None) -> None:
    """`resp register --healed`: one version for a healed model, with the exports found in `exports_dir/<format>/`."""
    import json

    from resp.artifacts import write_json
    from resp.healing import MANIFEST
    from resp.registry import register_healed

    exports = {}
    if exports_dir is not None:
        exports = {fmt: exports_dir / fmt for fmt in p.export.formats if (exports_dir / fmt).is_dir()}
        if not exports:
            raise ValueError(f"--exports-dir {exports_dir} holds no <format>/ export of {list(p.export.formats)}: "
                             "export the healed model there first (`resp export --model HEALED ...`)")
    v = register_healed(p, healed, exports, metrics)
    if out is not None:  # the same bytes whatever the store, as for a pruning run
        made = json.loads((healed / MANIFEST).read_text())
        write_json(out, {"task": made["task"], "method": made["method"],
                         "versions": [{k: v[k] for k in STABLE_VERSION_KEYS}]}, newline=True)
    typer.echo(f"{v['name']} version {v['version']}: healed, target {v['target']}, parent {v['parent']}"
               + ("" if v["created"] else " (already registered)"))


def _derived(path: Path, matches: bool) -> bool:
    if not matches:
        log.warning("not registering %s with these masks: it was computed from other masks (another run)", path)
    return matches


@app.command("audit")
def audit_command(
    model: Annotated[str | None, typer.Option(help="registered model name, e.g. resp-tiny-arith-resp")] = None,
    version: Annotated[str | None, typer.Option(help="version of --model")] = None,
    traces: Annotated[str | None, typer.Option(help="trace file or sha256 digest: list the versions whose lineage holds it")] = None,
    fetch: Annotated[bool, typer.Option("--fetch", help="first restore the version's recorded files missing here (trace "
                                                       "sets, masks, exports) from DVC (cache, else the default remote), "
                                                       "each kept only if it matches its registered sha256")] = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Print a version's lineage and verify every recorded digest (exit 1 on a mismatch); --traces: versions using a trace set."""
    from resp.registry import audit, lineage_lines, versions_with_traces

    with user_errors():
        p = load_params(params, overrides)
        if (model is None) == (traces is None) or (model is not None and version is None):
            raise ValueError("give --model NAME --version V (lineage of a version) or --traces FILE_OR_DIGEST (reverse query)")
        if fetch and traces is not None:
            raise ValueError("--fetch restores the files of one version: give it with --model NAME --version V, not --traces")
        if traces is not None:
            found = versions_with_traces(p, traces)
        else:
            report = audit(p, model, version, fetch=fetch)
    if traces is not None:
        typer.echo(f"trace set {found['query']} (sha256 {found['digest'][:16]}): {len(found['versions'])} registered version(s)")
        for v in found["versions"]:
            typer.echo(f"  {v['name']} version {v['version']}: {v['task']}/{v['method']} target {v['target']}, "
                       f"used as {', '.join(v['trace_tags'])}")
        return
    for path in report["restored"]:
        typer.echo(f"restored {path} from DVC (sha256 verified against the registry)")
    for line in lineage_lines(report):
        typer.echo(line)
    checked = (len(report["checks"]) + len(report.get("joins", [])) + len(report.get("tag_checks", []))
               + (report["base_check"] in ("ok", "mismatch")))
    if report["problems"]:
        for problem in report["problems"]:
            typer.echo(f"MISMATCH {problem}")
        typer.echo(f"audit failed: {len(report['problems'])} of {checked} checks do not verify")
        raise typer.Exit(1)
    typer.echo(f"audit passed: {checked} checks verify")


@app.command("study")
def study_command(
    report_only: Annotated[bool, typer.Option("--report-only", help="analyse the finished cells; run nothing")] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="run at most this many new cells, then analyse")] = None,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """The study: every study.methods x study.tasks x study.seeds cell (resumable), then the analysis
    (intervals over seeds and items) in study.dir: results.md, metrics.json, plots/."""
    from resp.study import run_study
    from resp.study_report import write_study_report

    with user_errors():
        p = load_params(params, overrides)
        if not report_only:
            _early_checks(p)
            run_study(p, limit)
        written = write_study_report(p)
    typer.echo(f"study report: {written}")
