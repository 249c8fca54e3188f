"""MLflow tracking: one parent run per pipeline, a child run per stage and per Tune trial.

Nesting uses the ``mlflow.parentRunId`` tag, which is what the MLflow UI groups by, so it works
across processes (a Ray worker, a Tune trial) where MLflow's active-run stack does not reach.
Everything goes through :class:`mlflow.MlflowClient` with an explicit tracking URI, so a Ray
worker logs to the same store as the driver.

A stopped run ends KILLED: inside :func:`stop_signals_end_runs` (the pipeline and every stage),
SIGTERM (what ``ray job stop`` sends) and SIGINT raise :class:`StopRequested`; each run's block
ends it KILLED, the outermost block ends every other run opened inside it (Tune trials, search
runs) KILLED too, and the process exits with 128 + the signal number. A rerun of the same work
(:func:`tracked_run` with ``reattach``) reopens the run it stopped instead of starting a second tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from smpp_ray import storage
from smpp_ray.provenance import run_source_tags

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "smpp.stage"
#: Tag of every stage and pipeline run: the folder it writes (how a rerun finds its earlier run).
OUT_TAG = "smpp.out_dir"
_MAX_PARAM_CHARS = 6000
#: The signals that stop a run: ``ray job stop`` (and a node shutting down) send SIGTERM, Ctrl+C SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Run id -> tracking URI of every run this process created or reopened and has not ended yet.
_OPEN_RUNS: dict[str, str] = {}


class StopRequested(SystemExit):
    """A stop signal reached the process. A SystemExit with code 128 + the signal number (what a
    shell and ``ray job`` report for a signal), so no ``except Exception`` turns it into a failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def ended_status(err: BaseException) -> str:
    """The status a run ends with when ``err`` leaves it: KILLED for a stop, else FAILED.

    A stop is also any error while a stop signal is pending: a library may turn our
    StopRequested into its own exception (Ray's ``ray.get`` re-raises it as ``SystemExit(1)``)."""
    stopped = isinstance(err, (StopRequested, KeyboardInterrupt)) or bool(_STOP.signum)
    return "KILLED" if stopped else "FAILED"


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


#: MLflow 3's UI opens an experiment on its GenAI overview unless told it holds model training
#: runs; with this tag it opens on the runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.note.content": "smpp_ray: one run per pipeline, a child run per stage, "
                                          "Tune trials as children of their search run."}


def experiment_id(tracking_uri: str, name: str) -> str:
    """Id of the named experiment, created (with artifacts beside a SQLite store) when missing."""
    c = client(tracking_uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        if "mlflow.experimentKind" not in found.tags:  # made before this tag existed, or by hand
            for key, value in EXPERIMENT_TAGS.items():
                c.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        artifact_location = "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    try:
        return c.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
    except Exception:  # another process created it between our lookup and create
        found = c.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def param_value(value: Any) -> str:
    """A param as MLflow stores it: text, cut to MLflow's length limit."""
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(str(k), param_value(v)) for k, v in params.items()]
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
    all_tags = {"mlflow.runName": name, **run_source_tags(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client(tracking_uri).create_run(experiment_id(tracking_uri, experiment), run_name=name,
                                          tags={k: str(v) for k, v in all_tags.items()})
    _OPEN_RUNS[run.info.run_id] = tracking_uri
    return run.info.run_id


def log_dataset_inputs(tracking_uri: str, run_id: str, datasets: Mapping[str, tuple[str, str]],
                       context: str) -> None:
    """Record each ``{name: (location, contents fingerprint)}`` the run reads as an MLflow dataset
    input (the UI's Datasets column); the digest is the fingerprint the stage already computed."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    entries = []
    for name, (location, fingerprint) in datasets.items():
        with warnings.catch_warnings():
            # MLflow registers the local-file source class twice and warns that a path "can be
            # interpreted in multiple ways" (both the same class): nothing a user can act on.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(location)
        dataset = MetaDataset(source=source, name=name, digest=fingerprint[:16])
        entries.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    if entries:
        client(tracking_uri).log_inputs(run_id, datasets=entries)


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark an ended run RUNNING again (a resumed search or trial); it ends like a new one."""
    client(tracking_uri).update_run(run_id, status="RUNNING")
    _OPEN_RUNS[run_id] = tracking_uri


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)
    _OPEN_RUNS.pop(run_id, None)


def end_open_runs(status: str, keep: frozenset[str] = frozenset()) -> list[str]:
    """End every run this process opened and has not ended, but those in ``keep`` (newest first:
    children before their parents); returns their ids. Best effort: a store that fails now must
    not hide the stop."""
    ended = []
    for run_id, uri in reversed(list(_OPEN_RUNS.items())):
        if run_id in keep:
            continue
        try:
            end_run(uri, run_id, status)
            ended.append(run_id)
        except Exception:  # noqa: BLE001 - the run stays RUNNING; say so and end the others
            logger.warning("could not mark MLflow run %s %s", run_id, status, exc_info=True)
            _OPEN_RUNS.pop(run_id, None)
    return ended


def find_reattachable_run(tracking_uri: str, experiment: str, tags: Mapping[str, Any],
                          parent_run_id: str | None, params: Mapping[str, Any]) -> str | None:
    """The newest run of the same work that did not finish (stopped, failed, or killed outright
    and left RUNNING): same ``tags``, same parent and exactly the same params; None when there is
    none. Params must match because MLflow params are immutable and the run must describe this
    attempt too."""
    found = client(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return None
    query = " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())
    runs = client(tracking_uri).search_runs([found.experiment_id], filter_string=query,
                                            order_by=["attributes.start_time DESC"], max_results=100)
    wanted = {str(k): param_value(v) for k, v in params.items()}
    for run in runs:
        if run.data.tags.get(PARENT_TAG) != (parent_run_id or None):
            continue
        if run.info.status == "FINISHED":
            return None  # the work completed since: a rerun of it is a new run
        return run.info.run_id if run.data.params == wanted else None
    return None


@contextlib.contextmanager
def tracked_run(tracking_uri: str, experiment: str, name: str, *, parent_run_id: str | None = None,
                params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
                enabled: bool = True, reattach: bool = False) -> Iterator[str | None]:
    """A run that ends FINISHED, or KILLED / FAILED (:func:`ended_status`, then re-raises) when
    the body raises.

    ``reattach``: resumable work (a tune stage, a pipeline) reopens its own unfinished run of an
    earlier attempt (:func:`find_reattachable_run`: same ``tags``, parent and params), so the
    resumed attempt's children land in the same tree. Yields the run id, or None when tracking
    is disabled, so callers write ``if run_id: log_metrics(...)`` instead of branching on config.
    """
    if not enabled:
        yield None
        return
    run_id = None
    if reattach:
        run_id = find_reattachable_run(tracking_uri, experiment, {"mlflow.runName": name, **(tags or {})},
                                       parent_run_id, params or {})
    if run_id:
        reopen_run(tracking_uri, run_id)
        logger.info("%s: resuming MLflow run %s of the earlier attempt", name, run_id)
    else:
        run_id = create_run(tracking_uri, experiment, name, parent_run_id=parent_run_id, tags=tags)
        if params:
            log_params(tracking_uri, run_id, params)
    try:
        yield run_id
    except BaseException as err:
        end_run(tracking_uri, run_id, ended_status(err))
        raise
    end_run(tracking_uri, run_id, "FINISHED")


class _StopState:
    """What the stop-signal handler of :func:`stop_signals_end_runs` needs (main thread only)."""

    def __init__(self) -> None:
        self.installed = False
        self.signum = 0
        self.graceful: Callable[[], bool] | None = None


_STOP = _StopState()


def _on_stop_signal(signum: int, _frame: Any) -> None:
    first = not _STOP.signum
    _STOP.signum = _STOP.signum or signum
    if first and _STOP.graceful is not None and _STOP.graceful():
        logger.warning("%s received: stopping once the running work has saved its state (send it again to "
                       "stop at once)", signal.Signals(signum).name)
        return
    raise StopRequested(signum)


@contextlib.contextmanager
def stop_signals_end_runs() -> Iterator[None]:
    """SIGTERM / SIGINT in the block raise :class:`StopRequested`; the outermost block then ends
    every run opened in it and still open (:func:`end_open_runs`) KILLED before the stop propagates.

    Nested blocks do nothing of their own (the outermost one holds the handlers). Off the main
    thread, where Python cannot install handlers, the block changes nothing.
    """
    if _STOP.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    # Runs opened before the block (by a caller that ends them itself) are not this work's to end
    before = frozenset(_OPEN_RUNS)
    previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    _STOP.installed, _STOP.signum = True, 0
    try:
        yield
    except BaseException as err:
        # Ray's blocking calls turn the handler's StopRequested into SystemExit(1): a pending
        # stop signal, not the exception's type, says this was a stop.
        stop = err if isinstance(err, StopRequested) else StopRequested(_STOP.signum) if _STOP.signum else None
        if stop is None:
            raise
        ended = end_open_runs("KILLED", keep=before)
        logger.error("stopped by %s%s", stop.signal_name,
                     f"; {len(ended)} open MLflow run(s) ended KILLED" if ended else "")
        if stop is err:
            raise
        raise stop from err
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STOP.installed, _STOP.signum, _STOP.graceful = False, 0, None


@contextlib.contextmanager
def graceful_stop(request: Callable[[], bool]) -> Iterator[bool]:
    """In the block, the first stop signal calls ``request`` instead of raising at once, so work
    that saves its state on a stop (Tune's experiment state) gets to; ``request`` returns False
    when it could not ask, and the stop raises as usual. The caller checks
    :func:`raise_if_stop_received` after the work returns. Yields whether stop signals are handled
    here at all (False outside :func:`stop_signals_end_runs`)."""
    if not _STOP.installed or threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous, _STOP.graceful = _STOP.graceful, request
    try:
        yield True
    finally:
        _STOP.graceful = previous


def raise_if_stop_received() -> None:
    """Raise :class:`StopRequested` when a stop signal arrived during a :func:`graceful_stop` block."""
    if _STOP.installed and _STOP.signum:
        raise StopRequested(_STOP.signum)


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


def find_runs(tracking_uri: str, experiment: str, tags: Mapping[str, Any], *, status: str = "") -> list[str]:
    """Ids of the runs of ``experiment`` carrying every tag in ``tags`` (oldest first), only those
    in ``status`` (e.g. ``RUNNING``) when given."""
    found = client(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())
    if status:
        query += f" and attributes.status = {_quote(status)}"
    runs = client(tracking_uri).search_runs([found.experiment_id], filter_string=query,
                                            order_by=["attributes.start_time ASC"], max_results=1000)
    return [run.info.run_id for run in runs]


def _quote(value: Any) -> str:
    """A tag value as a quoted literal of an MLflow filter string."""
    return "'" + str(value).replace("'", "\\'") + "'"
