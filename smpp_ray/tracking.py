"""MLflow tracking: one parent run per pipeline, a child run per stage and per Tune trial.

Nesting uses the ``mlflow.parentRunId`` tag, which is what the MLflow UI groups by, so it works
across processes (a Ray worker, a Tune trial) where MLflow's active-run stack does not reach.
Everything goes through :class:`mlflow.MlflowClient` with an explicit tracking URI: no process-
global state, so a Ray worker logs to the same store as the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from smpp_ray import storage

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "smpp.stage"
_MAX_PARAM_CHARS = 6000


def resolve_tracking_uri(configured: str, out_dir: str) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite store beside the stage outputs.

    A SQLite file cannot live in object storage, and on a cluster only the driver could write
    it: an ``s3://`` or ``gs://`` output needs a tracking server (which also stores the
    artifacts, e.g. ``mlflow server --artifacts-destination s3://...``).
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = storage.normalize(out_dir)
    if storage.is_uri(root):
        raise ValueError(f"output {root!r} is in object storage, where a local SQLite MLflow store cannot live: "
                         "set MLFLOW_TRACKING_URI (or tracking.tracking_uri) to an MLflow server, e.g. the one "
                         "`cluster/local.sh up` starts, or pass --set tracking.enabled=false")
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlruns.db')}"


def client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str) -> str:
    """Id of the named experiment, created (with artifacts beside a SQLite store) when missing."""
    c = client(tracking_uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        artifact_location = "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    try:
        return c.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it between our lookup and create
        found = c.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(str(k), _param_value(v)) for k, v in params.items()]
    c = client(tracking_uri)
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=items[start:start + 100])


def metric_name(key: object) -> str:
    """MLflow allows only alphanumerics and ``_-. :/`` in names; class names like "Girls,Fashion" don't."""
    return re.sub(r"[^\w\-. :/]", "_", str(key))


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """All metrics of one step in a single ``log_batch`` call (non-finite values are skipped)."""
    import math

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), now, int(step)) for k, v in metrics.items()
             if v is not None and math.isfinite(float(v))]
    c = client(tracking_uri)
    for start in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[start:start + 1000])


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    c = client(tracking_uri)
    c.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def create_run(tracking_uri: str, experiment: str, name: str, *, parent_run_id: str | None = None,
               tags: Mapping[str, Any] | None = None) -> str:
    """Create a RUNNING run (a child of ``parent_run_id`` when given) and return its id."""
    all_tags = {"mlflow.runName": name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client(tracking_uri).create_run(experiment_id(tracking_uri, experiment), run_name=name,
                                          tags={k: str(v) for k, v in all_tags.items()})
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


@contextlib.contextmanager
def tracked_run(tracking_uri: str, experiment: str, name: str, *, parent_run_id: str | None = None,
                params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
                enabled: bool = True) -> Iterator[str | None]:
    """A run that ends FINISHED, or FAILED (then re-raises) when the body raises.

    Yields the run id, or None when tracking is disabled, so callers write
    ``if run_id: log_metrics(...)`` instead of branching on config.
    """
    if not enabled:
        yield None
        return
    run_id = create_run(tracking_uri, experiment, name, parent_run_id=parent_run_id, tags=tags)
    if params:
        log_params(tracking_uri, run_id, params)
    try:
        yield run_id
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise
    end_run(tracking_uri, run_id, "FINISHED")


def log_artifact(tracking_uri: str, run_id: str, location: str, artifact_path: str | None = None) -> None:
    """Log a file or folder at any location (fetched to this node's cache first when remote);
    MLflow stores it in the run's artifact store (a tracking server proxies it)."""
    local = storage.local_copy(location)
    c = client(tracking_uri)
    if os.path.isdir(local):
        c.log_artifacts(run_id, local, artifact_path)
    else:
        c.log_artifact(run_id, local, artifact_path)


@dataclass(frozen=True)
class TrackingContext:
    """Where a stage logs: the store, the experiment, and the stage's own run (children nest under it)."""

    tracking_uri: str
    experiment: str
    run_id: str


def find_runs(tracking_uri: str, experiment: str, tags: Mapping[str, Any]) -> list[str]:
    """Ids of the runs of ``experiment`` carrying every tag in ``tags`` (oldest first)."""
    def quote(value: Any) -> str:
        return "'" + str(value).replace("'", "\\'") + "'"

    found = client(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(f"tags.`{k}` = {quote(v)}" for k, v in tags.items())
    runs = client(tracking_uri).search_runs([found.experiment_id], filter_string=query,
                                            order_by=["attributes.start_time ASC"], max_results=1000)
    return [run.info.run_id for run in runs]
