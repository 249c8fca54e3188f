"""Every stage in order under one parent MLflow run: ``DIR/{raw,data,prototypes,train,features,tune,report}``.

A stage whose folder already holds a complete artifact for the same inputs and config is
skipped (its summary is reused), so rerunning a pipeline after a failure, or after changing only
the tune section, redoes only what changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from smpp_ray import console, stages, storage
from smpp_ray.config import Config, flatten_config
from smpp_ray.stage_table import (
    PIPELINE_STAGES,
    STAGE_FOLDERS,
    STAGES,
    pipeline_inputs,
    pipeline_layout,
)
from smpp_ray.tracking import (
    OUT_TAG,
    STAGE_TAG,
    StopRequested,
    log_metrics,
    resolve_tracking_uri,
    set_tags,
    stop_signals_end_runs,
    tracked_run,
)

logger = logging.getLogger(__name__)

__all__ = ["PIPELINE_STAGES", "STAGE_FOLDERS", "pipeline_layout", "run_pipeline"]


def _node_tags() -> dict[str, str]:
    """The Ray nodes this driver's job ran work on: the driver's node and, from the state API,
    every node that ran one of the job's tasks or actors (Ray Data, Train, Tune). Lets a cluster
    test, or a person, see which nodes a pipeline touched."""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        context = ray.get_runtime_context()
        tags = {"smpp.driver_node_id": context.get_node_id()}
    except Exception:  # tagging is best effort; never fail a finished pipeline over it
        logger.debug("could not read the Ray node id", exc_info=True)
        return {}
    try:
        from ray.util.state import list_tasks

        # The GCS this driver is connected to: other Rays may run on the same host
        tasks = list_tasks(address=context.gcs_address, filters=[("job_id", "=", context.get_job_id())],
                           limit=10_000, raise_on_missing_output=False)
        # Intersected with this cluster's nodes: a local Ray without a dashboard still points the
        # state API at 127.0.0.1:8265, where another cluster on the host may answer.
        ours = {node["NodeID"] for node in ray.nodes()}
        tags["smpp.node_ids"] = ",".join(sorted({t.node_id for t in tasks if t.node_id in ours}))
    except Exception as err:  # a local Ray started without a dashboard has no state API
        # Not for the console: nothing a user must do (the tags are a convenience).
        logging.getLogger("smpp.details").info("Ray state API unavailable (%s); not tagging the nodes that ran tasks",
                                               err)
    return tags


def run_pipeline(config: Config, out_dir: str, *, raw_dir: str | None = None,
                 only: Sequence[str] = (), force: bool = False) -> dict[str, Any]:
    """Run the stages (all, or ``only``) and return the evaluation summary.

    ``raw_dir`` points at a real SMPD folder; without it the synthetic corpus is generated.
    """
    out_dir = storage.normalize(out_dir)
    # First: an s3:// out without a tracking server is refused before anything is written
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri, out_dir) if config.tracking.enabled else ""
    storage.make_dir(out_dir)
    raw_dir = storage.normalize(raw_dir) if raw_dir else None
    layout = pipeline_layout(out_dir)
    selected = [s for s in PIPELINE_STAGES if not only or s in only]
    if raw_dir:  # the stages that would make the raw corpus a given one replaces
        made_raw = {spec.source for stage in STAGES.values() for spec in stage.inputs if spec.replaced_by_raw}
        selected = [s for s in selected if s not in made_raw]
    started = time.time()
    current = {"stage": ""}
    try:
        with stop_signals_end_runs():
            return _run_stages(config, out_dir, tracking_uri, layout, raw_dir, selected, force, started, current)
    except StopRequested as stop:
        logger.error("pipeline stopped by %s %s; its MLflow runs are KILLED; rerun the same command to resume",
                     stop.signal_name, f"during stage {current['stage']}" if current["stage"] else "before any stage")
        raise


def _run_stages(config: Config, out_dir: str, tracking_uri: str, layout: dict[str, str], raw_dir: str | None,
                selected: list[str], force: bool, started: float, current: dict[str, str]) -> dict[str, Any]:
    """The body of :func:`run_pipeline`: ``current["stage"]`` names the stage running, for the
    message of a stop."""
    # A stopped pipeline rerun with the same config reopens its run: the resumed stages (tune
    # reattaches its own stage run too) stay in one tree.
    with tracked_run(tracking_uri, config.tracking.experiment, "pipeline", params=flatten_config(config),
                     tags={STAGE_TAG: "pipeline", OUT_TAG: out_dir},
                     enabled=config.tracking.enabled, reattach=True) as parent_id:
        stage_run = stages.StageRun(tracking_uri, config.tracking.experiment, config.tracking.enabled, parent_id,
                                    fresh=force)
        for number, name in enumerate(selected, start=1):
            # Planned when its turn comes: an input may be made by the stage before (the kept ids)
            call = stages.plan_stage(name, config, pipeline_inputs(STAGES[name], layout, raw_dir),
                                     layout[STAGE_FOLDERS[name]])
            if not force and call.complete():
                logger.info("[%d/%d] %s: complete for these inputs and config, skipped", number,
                            len(selected), name)
            else:
                logger.info("[%d/%d] %s -> %s", number, len(selected), name, call.out)
                current["stage"] = name
                with console.stage_log(name):
                    stages.execute(call, stage_run)
            if STAGES[name].pipeline_check:
                STAGES[name].pipeline_check(config, call.out, selected)
        current["stage"] = ""
        result: dict[str, Any] = {}
        if "evaluate" in selected:
            from smpp_ray.evaluate import load_results

            result = load_results(layout["report"], tracking_uri or None)
        if parent_id:
            set_tags(tracking_uri, parent_id, _node_tags())
            final = result.get("final_metrics", {})
            log_metrics(tracking_uri, parent_id, {**final, "pipeline_seconds": time.time() - started})
    result["mlflow_run_id"] = parent_id
    result["tracking_uri"] = tracking_uri
    result["out_dir"] = out_dir
    return result
