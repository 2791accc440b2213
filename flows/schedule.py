"""Scheduled re-pruning: prune again when the base model changes.

`reprune` resolves what the base model is right now (`resp.models.model_identity`: the hub
commit sha, or a content hash of a local directory) and compares it with the newest base
registered in MLflow. Unchanged: it logs so and does nothing. Changed (or never registered):
it runs the pipeline flow and registers the new versions; each records in its `replaces` tag
the version of the same model and target it supersedes.

`deployment` wraps `reprune` with the cron schedule of `schedule.cron` / `schedule.timezone`;
`serve` runs it (blocking) against the Prefect API (PREFECT_API_URL, or a temporary server).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, serve as prefect_serve
from prefect.schedules import Cron
from pydantic import ValidationError

from flows.pipeline import (FlowError, check_flow_outputs, flow_settings, pipeline, task_runner,
                            temporary_server_dies_with_this_process)
from resp import registry
from resp.config import load_params
from resp.models import model_identity

DEPLOYMENT = "resp-reprune"


@flow(name="resp-reprune")
def reprune(params_path: str, overrides: list[str] | None = None) -> dict:
    """Re-run the pipeline and register new versions if the base model changed since the last registration."""
    logger = get_run_logger()
    # Re-pruning exists to register: force it whatever flow.register_models says.
    overrides = [*(overrides or []), "flow.register_models=true"]
    p = load_params(params_path, overrides)
    identity = model_identity(p.model.name_or_path, p.model.revision)
    current = {**identity.to_dict(), "key": identity.key}
    latest = registry.latest_base(p, current)
    if latest is not None and latest["base_key"] == identity.key:
        logger.info("base model %s unchanged (%s, registered as %s version %s): nothing to do",
                    identity.name, identity.key[:12], latest["name"], latest["version"])
        return {"changed": False, "base_key": identity.key, "previous": latest, "registered": []}
    if latest is None:
        logger.info("base model %s (%s) has no registered version yet: pruning it", identity.name, identity.key[:12])
    else:
        logger.info("base model %s changed: %s (registered as %s version %s) -> %s: re-pruning", identity.name,
                    latest["base_key"][:12], latest["name"], latest["version"], identity.key[:12])
    with flow_settings(p.flow):
        result = pipeline.with_options(task_runner=task_runner(p.flow))(params_path, overrides)
    new = [v for v in result["registered"] if v["created"]]
    for v in new:
        logger.info("registered %s version %s%s", v["name"], v["version"],
                    f", replacing version {v['replaces']}" if v["replaces"] else "")
    return {"changed": True, "base_key": identity.key, "previous": latest, "registered": result["registered"]}


def deployment(params_path: str | Path, overrides: list[str] | None = None):
    """The re-pruning deployment with the cron schedule from params (built without a server)."""
    p = load_params(params_path, overrides)
    try:  # both the cron string and the time zone are validated here
        return reprune.to_deployment(
            name=DEPLOYMENT, schedules=[Cron(p.schedule.cron, timezone=p.schedule.timezone)],
            parameters={"params_path": str(Path(params_path).resolve()), "overrides": list(overrides or [])},
            description="Re-prune and register new versions when the base model's revision or content changes.")
    except ValueError as e:
        reason = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e).splitlines()[0]
        raise FlowError(f"schedule.cron {p.schedule.cron!r} / schedule.timezone {p.schedule.timezone!r} is invalid "
                        f"({reason}): use a 5-field cron such as '0 3 * * *' and an IANA zone such as UTC") from None


def serve(params_path: str | Path, overrides: list[str] | None = None) -> None:
    """Serve the deployment: runs `reprune` on schedule until interrupted."""
    check_flow_outputs(load_params(params_path, overrides).flow)
    temporary_server_dies_with_this_process()
    prefect_serve(deployment(params_path, overrides))


def check_once(params_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Run the re-pruning check now (what a scheduled run does)."""
    check_flow_outputs(load_params(params_path, overrides).flow)
    temporary_server_dies_with_this_process()
    return reprune(str(params_path), list(overrides or []))
