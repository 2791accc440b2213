"""The `resp` console command: the library's subcommands (`resp.cli`) and the two that run Prefect,
`resp run` (the pipeline flow) and `resp schedule` (re-pruning on a cron schedule). They live here
because Prefect is imported only by flows/."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from prefect.settings import PREFECT_API_URL

from flows import schedule
from flows.pipeline import run_pipeline
from resp.cli import Overrides, ParamsPath, app, user_errors

__all__ = ["app"]


@app.command("run")
def run_command(params: ParamsPath = Path("params.yaml"), overrides: Overrides = None) -> None:
    """Run the workflow as a Prefect flow, one cached task per stage: traces, pruning stages, exports, evaluation,
    registration (a run killed midway resumes at the stage it was in)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Prefect API request otherwise
    with user_errors():
        result = run_pipeline(params, overrides)
    for key, written in result["masks"].items():
        typer.echo(f"{key}: {len(written)} masks, metrics {result['metrics'][key]}")
    for v in result["registered"]:
        typer.echo(f"registered {v['name']} version {v['version']} (target {v['target']})"
                   + ("" if v["created"] else ", already registered"))


@app.command("schedule")
def schedule_command(
    serve: Annotated[bool, typer.Option("--serve", help="serve the cron deployment (blocks; runs the check on schedule)")] = False,
    once: Annotated[bool, typer.Option("--once", help="run the re-pruning check now")] = False,
    params: ParamsPath = Path("params.yaml"),
    overrides: Overrides = None,
) -> None:
    """Scheduled re-pruning: re-prune and register when the base model's revision or content changes."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with user_errors():
        if serve and once:
            raise ValueError("give at most one of --serve and --once")
        if once:
            result = schedule.check_once(params, overrides)
        else:
            deployment = schedule.deployment(params, overrides)
            if serve:
                schedule.serve(params, overrides)
                return
    if once:
        created = [v for v in result["registered"] if v["created"]]
        typer.echo(f"base model {result['base_key'][:12]}: " + ("changed" if result["changed"] else "unchanged")
                   + f"; {len(created)} new version(s)")
        for v in created:
            replaces = f", replaces version {v['replaces']}" if v["replaces"] else ""
            typer.echo(f"registered {v['name']} version {v['version']}{replaces}")
        return
    cron = deployment.schedules[0].schedule
    typer.echo(f"deployment {deployment.name}: cron '{cron.cron}' ({cron.timezone}), params {deployment.parameters['params_path']}")
    if PREFECT_API_URL.value():
        typer.echo(f"applied to {PREFECT_API_URL.value()} as deployment {deployment.apply()}; "
                   "runs start while `resp schedule --serve` runs")
    else:
        typer.echo("serve it with `resp schedule --serve` (set PREFECT_API_URL to keep it on a Prefect server)")
