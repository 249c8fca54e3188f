"""A Tune callback, on the driver, that makes every trial a nested MLflow run.

Ray's stock ``MLflowLoggerCallback`` creates flat runs. Here each trial is a child run (tag
``mlflow.parentRunId``) of the model family's search run, with the trial's hyperparameters as
params, ``val_src`` / ``val_mae`` / ``val_score`` per reported boosting round (step = rounds) as metric
history, the selected round's values (``best_*``), and status FINISHED or FAILED. Metrics are buffered and written with ``log_batch`` every ``flush_every`` rounds, so
MLflow costs a handful of calls per trial rather than one per round.

Resumed searches: a trial is looked up by its Tune trial id and experiment folder (tags) before
a run is created, so a trial that restarts after ``Tuner.restore`` reuses its run instead of
making a duplicate.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from smpp_ray import tracking
from smpp_ray.config import flatten_config_dict
from smpp_ray.gbdt.objective import SCORE, best_round

logger = logging.getLogger(__name__)

TRIAL_TAG = "smpp.trial_id"
SEARCH_TAG = "smpp.search_path"
FAMILY_TAG = "smpp.family"


class MlflowTrialCallback(Callback):
    """Log each Tune trial as a child MLflow run of ``parent_run_id``."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, *, family: str,
                 search_path: str, metric_keys: tuple[str, ...] = ("val_src", "val_mae", SCORE),
                 flush_every: int = 100, min_rounds: int = 0, resumed: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.family = family
        self.search_path = search_path
        self.metric_keys = metric_keys
        self.flush_every = flush_every
        self.min_rounds = min_rounds
        # Only a restored search can meet a trial that already has a run: a fresh one skips the
        # lookup (a search query per trial, growing with the store, at 1,000 trials the most
        # expensive MLflow call of a trial)
        self.resumed = resumed
        self.run_ids: dict[str, str] = {}
        self._pending: dict[str, list[Any]] = {}
        self._reports: dict[str, list[dict[str, float]]] = {}
        self.seconds = 0.0
        """Wall time spent in MLflow calls (the benchmark reports it as a share of the stage)."""

    # Tune hooks -------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        started = time.perf_counter()
        run_id = self._existing_run(trial.trial_id) if self.resumed else None
        if run_id:
            tracking.reopen_run(self.tracking_uri, run_id)
            logger.info("trial %s resumes MLflow run %s", trial.trial_id, run_id)
        else:
            run_id = tracking.create_run(
                self.tracking_uri, self.experiment, f"{self.family}-{trial.trial_id}",
                parent_run_id=self.parent_run_id,
                tags={TRIAL_TAG: trial.trial_id, SEARCH_TAG: self.search_path, FAMILY_TAG: self.family})
            tracking.log_params(self.tracking_uri, run_id, {"family": self.family, **flatten_config_dict(trial.config)})
        self.run_ids[trial.trial_id] = run_id
        self._pending[trial.trial_id] = []
        self._reports[trial.trial_id] = []
        self.seconds += time.perf_counter() - started

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        if trial.trial_id not in self.run_ids:
            return
        step = int(result.get("rounds", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        pending = self._pending.setdefault(trial.trial_id, [])
        for key in self.metric_keys:
            value = result.get(key)
            if value is not None and math.isfinite(float(value)):
                pending.append(Metric(key, float(value), now, step))
        if SCORE in result:
            self._reports.setdefault(trial.trial_id, []).append(
                {"rounds": step, **{k: float(result[k]) for k in ("val_src", "val_mae", SCORE) if k in result}})
        if len(pending) >= self.flush_every * len(self.metric_keys):
            self._flush(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FAILED")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Trials still open here were cut by an interruption: keep their metrics, mark them KILLED;
        # a restored search reopens the same runs.
        for trial_id in list(self.run_ids):
            self._flush(trial_id)
            self._end(trial_id, "KILLED")

    # helpers ----------------------------------------------------------------------------------
    def _finish(self, trial: Any, status: str) -> None:
        """The trial's buffered metrics, its selected round (``best_*``) and its tags in one
        ``log_batch``, then the end: two store writes per finished trial (a search of 1,000 short
        trials spends most of its MLflow time on per-call round trips)."""
        from mlflow.entities import Metric, RunTag

        trial_id = trial.trial_id
        if trial_id not in self.run_ids:
            return
        started = time.perf_counter()
        run_id = self.run_ids[trial_id]
        metrics = self._pending.pop(trial_id, None) or []
        best = best_round(self._reports.pop(trial_id, []), self.min_rounds)
        if best is not None:  # the round the search selects (smpp_ray.gbdt.search._summarise)
            now = int(time.time() * 1000)
            values = {"best_val_score": best[SCORE], "best_val_src": best.get("val_src", math.nan),
                      "best_val_mae": best.get("val_mae", math.nan), "best_round": best["rounds"]}
            metrics += [Metric(k, float(v), now, 0) for k, v in values.items() if math.isfinite(float(v))]
        tags = {"smpp.rounds": (trial.last_result or {}).get("rounds", 0)}
        if status == "FAILED":
            tags["smpp.error"] = _error_text(trial)
        client = tracking.client(self.tracking_uri)
        client.log_batch(run_id, metrics=metrics[:1000], tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for start in range(1000, len(metrics), 1000):   # MLflow caps a batch at 1,000 metrics
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        self.seconds += time.perf_counter() - started
        self._end(trial_id, status)

    def _end(self, trial_id: str, status: str) -> None:
        started = time.perf_counter()
        tracking.end_run(self.tracking_uri, self.run_ids.pop(trial_id), status)
        self._pending.pop(trial_id, None)
        self._reports.pop(trial_id, None)
        self.seconds += time.perf_counter() - started

    def _flush(self, trial_id: str) -> None:
        pending = self._pending.get(trial_id)
        if not pending:
            return
        started = time.perf_counter()
        client = tracking.client(self.tracking_uri)
        for start in range(0, len(pending), 1000):
            client.log_batch(self.run_ids[trial_id], metrics=pending[start:start + 1000])
        self._pending[trial_id] = []
        self.seconds += time.perf_counter() - started

    def _existing_run(self, trial_id: str) -> str | None:
        found = tracking.find_runs(self.tracking_uri, self.experiment,
                                   {TRIAL_TAG: trial_id, SEARCH_TAG: self.search_path})
        return found[0] if found else None

    # Tune saves callback state with the experiment; the runs are found again by tag instead,
    # and clients are not picklable, so there is no state to keep.
    def get_state(self) -> dict | None:
        return None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(run_ids={}, _pending={}, _reports={})
        return state


def _error_text(trial: Any) -> str:
    """The last lines of the trial's error trace (Tune writes it to the trial folder)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    return text.strip()[-1000:] or f"trial {trial.trial_id} raised (no error file)"


