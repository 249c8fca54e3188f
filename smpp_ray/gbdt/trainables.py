"""Training one GBDT (shared by Tune trials and the refit) and the Tune trial functions.

Trials and refits call the same :func:`fit_model`, with the same seed and thread count, so the
refit of the best configuration reproduces the predictions the trial was scored on. Each trial
reads its own data from the features Parquet (the trainable receives a location, local or
``s3://``, never the frames).

Per-iteration reports feed ASHA: LightGBM through Ray's
``ray.tune.integration.lightgbm.TuneReportCheckpointCallback`` (a LightGBM ``feval`` computes
SRC each round), CatBoost through :class:`TuneReportCatBoostCallback` with a Python eval
metric that computes SRC. Both report ``val_src``, ``val_mae``, ``val_score`` (the
``tune.objective`` of the two, :mod:`smpp_ray.gbdt.objective`: what the search maximises) and
``rounds`` (the number of trees the values belong to; ASHA's time attribute) on rounds 1, 1 + k, 1 + 2k, ... and the
last, k = ``report_every``: a report is a round trip to the driver, which would dominate
rounds that take milliseconds. Every report also carries ``peak_rss_mib``, the trial process's
peak resident memory since the trial started (:func:`peak_rss_mib`), so a trial's last report
holds its peak.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import metrics
from smpp_ray.gbdt.data import group_folds, load_splits
from smpp_ray.gbdt.objective import SCORE, Objective
from smpp_ray.gbdt.spaces import fixed_params

logger = logging.getLogger(__name__)

REPORTED = ("val_src", "val_mae")
#: The memory metrics in every trial report: peak RSS of the trial's process and its private
#: memory now (USS: what it holds that no other process shares), MiB.
PEAK_RSS = "peak_rss_mib"
PRIVATE = "private_mib"


def _memory() -> dict[str, float]:
    private = private_mib()
    return {PEAK_RSS: peak_rss_mib(), **({PRIVATE: private} if private is not None else {})}


@dataclass(frozen=True)
class TrialSetup:
    """What a trial needs besides its hyperparameters (locations and sizes only: no data)."""

    family: str
    features_dir: str
    feature_groups: tuple[str, ...]
    validation: str
    folds: int
    max_rounds: int
    threads: int
    seed: int
    report_every: int = 1
    selected_ids: str = ""
    """The train stage's kept-ids file when ``tune.fit_on_selected`` (empty: all of train)."""
    objective: str = "src+mae"
    """``tune.objective``: what ``val_score`` is."""


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count from its current RSS; False where that is not possible.

    Tune reuses trial actors (``reuse_actors=True``), so without the reset a trial would report
    the peak of every trial its process ran before it. Linux resets the high-water mark that
    ``getrusage`` reads when ``5`` is written to ``/proc/self/clear_refs`` (Linux >= 4.0);
    elsewhere the figure stays the process's lifetime peak, an upper bound.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (``getrusage(RUSAGE_SELF).ru_maxrss``)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def private_mib() -> float | None:
    """Memory only this process holds (USS: private clean + dirty pages, MiB), from
    ``/proc/self/smaps_rollup``; pages shared with other processes (the object store's
    matrices, libraries) are not counted. None where the file does not exist."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kib = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except OSError:
        return None
    return kib / 1024


def is_report_round(rounds: int, every: int, total: int) -> bool:
    """Rounds 1, 1 + every, ... and the last: the rounds CatBoost's ``metric_period`` evaluates."""
    return (rounds - 1) % every == 0 or rounds == total


def with_score(values: dict[str, float], objective: Objective) -> dict[str, float]:
    """A report's values plus ``val_score``, the objective of its ``val_src`` and ``val_mae``."""
    return {**values, SCORE: objective.score(values["val_src"], values["val_mae"])}


def lightgbm_report_callback(metric_names: dict[str, str], every: int, objective: Objective) -> Any:
    """Ray's LightGBM Tune callback, reporting on :func:`is_report_round` rounds with ``rounds``."""
    from ray.tune.integration.lightgbm import TuneReportCheckpointCallback

    class _EveryRounds(TuneReportCheckpointCallback):
        def __call__(self, env: Any) -> None:
            rounds = env.iteration + 1
            if is_report_round(rounds, every, env.end_iteration):
                report = with_score(self._get_report_dict(self._get_eval_result(env)), objective)
                self._report_metrics({**report, "rounds": rounds, **_memory()})

    return _EveryRounds(metrics=metric_names, frequency=0, checkpoint_at_end=False)


def _lightgbm_src(preds: np.ndarray, data: Any) -> tuple[str, float, bool]:
    """LightGBM ``feval``: Spearman on the evaluation set, higher is better."""
    return "src", metrics.src(data.get_label(), preds), True


class CatBoostSRC:
    """CatBoost Python eval metric: Spearman of the evaluation set.

    CatBoost also evaluates the eval metric on the learning set every round; ranking the whole
    train split each round would dominate the trial's time, so rows whose count differs from the
    evaluation set's are not scored (their value is 0 and is never reported).
    """

    def __init__(self, eval_size: int) -> None:
        self.eval_size = eval_size

    def is_max_optimal(self) -> bool:
        return True

    def evaluate(self, approxes: Sequence[Sequence[float]], target: Sequence[float],
                 weight: Sequence[float] | None) -> tuple[float, float]:
        if len(target) != self.eval_size:
            return 0.0, 1.0
        return metrics.src(np.asarray(target), np.asarray(approxes[0])), 1.0

    def get_final_error(self, error: float, weight: float) -> float:
        return error


class TuneReportCatBoostCallback:
    """CatBoost ``after_iteration`` callback: report validation metrics to Tune when CatBoost
    computed them (every ``metric_period`` rounds and the last), with ``rounds``.

    Tune stops a trial (ASHA) by raising ``SystemExit`` inside the report. Raised through
    CatBoost's C++ training loop, an exception leaks the fit's training data: a reused trial
    actor grew by one train matrix per stopped trial (measured: +70 MiB per stop at 60k x 300
    features, an OOM kill after ~60 trials at SMPD size). So the callback keeps the exception,
    ends CatBoost's loop by returning False, and :meth:`raise_pending` raises it after the fit
    returned (:func:`fit_model` calls it)."""

    def __init__(self, metric_names: dict[str, str], objective: Objective, report: Any = None) -> None:
        self.metric_names = metric_names
        self.objective = objective
        self._report = report
        self._seen = 0
        self.pending: BaseException | None = None

    def after_iteration(self, info: Any) -> bool:
        validation = info.metrics["validation"]
        first = validation[next(iter(self.metric_names.values()))]
        if len(first) > self._seen:  # a new evaluation landed this round
            self._seen = len(first)
            values = {key: float(validation[name][-1]) for key, name in self.metric_names.items()}
            try:
                (self._report or _tune_report)({**with_score(values, self.objective), "rounds": int(info.iteration)})
            except BaseException as err:  # noqa: BLE001 - SystemExit included: re-raised by raise_pending
                self.pending = err
                return False
        return True

    def raise_pending(self) -> None:
        """Raise what the report raised during the fit, now that CatBoost has let go of its data."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            raise pending


def _tune_report(values: dict[str, float]) -> None:
    from ray import tune

    tune.report({**values, **_memory()})


class _RecordCatBoostCallback(TuneReportCatBoostCallback):
    """Keep the reports instead of sending them (grouped validation averages folds afterwards)."""

    def __init__(self, metric_names: dict[str, str], objective: Objective) -> None:
        self.rounds: list[dict[str, float]] = []
        super().__init__(metric_names, objective, report=self.rounds.append)


def fit_model(family: str, params: dict[str, Any], rounds: int, X: pd.DataFrame | np.ndarray, y: np.ndarray,
              categorical: Sequence[str], *, valid: tuple[pd.DataFrame | np.ndarray, np.ndarray] | None = None,
              callbacks: Sequence[Any] = (), report_every: int = 1, feature_names: Sequence[str] = ()) -> Any:
    """Train ``rounds`` boosting rounds of ``family`` (a ``lightgbm.Booster`` or ``CatBoostRegressor``).

    LightGBM also takes ``X`` as a float32 matrix whose columns are ``feature_names`` (the shared
    matrices of :mod:`smpp_ray.gbdt.shared`): it reads it in place, with no private copy."""
    if family == "lightgbm":
        import lightgbm as lgb

        names: Any = list(feature_names) if feature_names else "auto"
        train_set = lgb.Dataset(X, y, categorical_feature=list(categorical), free_raw_data=False,
                                feature_name=names)
        kwargs: dict[str, Any] = {}
        if valid is not None:
            kwargs = {"valid_sets": [lgb.Dataset(valid[0], valid[1], reference=train_set, feature_name=names)],
                      "valid_names": ["val"], "feval": _lightgbm_src}
        return lgb.train(params, train_set, num_boost_round=rounds, callbacks=list(callbacks), **kwargs)
    if family == "catboost":
        from catboost import CatBoostRegressor, Pool

        extra: dict[str, Any] = {}
        if valid is not None:
            # use_best_model=False: the model keeps all rounds, as the refit will.
            extra = {"eval_metric": CatBoostSRC(len(valid[1])), "custom_metric": ["MAE"], "use_best_model": False,
                     "metric_period": report_every}
        model = CatBoostRegressor(iterations=rounds, **params, **extra)
        # CatBoost warns on every fit with a Python metric when numba is absent; it is optional.
        warnings.filterwarnings("ignore", message="Failed to import numba")
        fit_kwargs: dict[str, Any] = {"callbacks": list(callbacks)} if callbacks else {}
        if valid is not None:
            fit_kwargs["eval_set"] = Pool(valid[0], valid[1], cat_features=list(categorical))
        model.fit(Pool(X, y, cat_features=list(categorical)), **fit_kwargs)
        for callback in callbacks:
            if isinstance(callback, TuneReportCatBoostCallback):
                callback.raise_pending()
        return model
    raise ValueError(f"unknown model family {family!r}; expected lightgbm or catboost")


def predict(model: Any, X: pd.DataFrame) -> np.ndarray:
    """Predictions of a fitted model as float64 (none for no rows: an empty split, e.g.
    ``data.test_fraction=0`` without unlabelled test posts; the boosters refuse an empty matrix)."""
    if len(X) == 0:
        return np.empty(0, dtype=np.float64)
    return np.asarray(model.predict(X), dtype=np.float64)


def _catboost_metric_names() -> dict[str, str]:
    return {"val_src": CatBoostSRC.__name__, "val_mae": "MAE"}


def _release_freed_memory() -> None:
    """Free what the last trial left in reference cycles, then hand the C heap's free pages back
    to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    # A cycle (an exception's traceback through a fit's frames) can hold a whole train matrix
    # until the collector's next full pass, which a long-lived actor may not reach for many trials
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_trial(config: dict[str, Any], setup: TrialSetup, data: Any = None) -> None:
    """The Tune trainable: one hyperparameter configuration, reported every boosting round.

    ``data``: the node-shared matrices (:mod:`smpp_ray.gbdt.shared`, ``tune.shared_data``); None
    reads the features Parquet in this trial."""
    # Tune reuses trial actors and runs each trial in a new thread: the LightGBM Datasets and
    # booster a finished trial freed (native memory, hundreds of MB at SMPD size) stay in that
    # thread's glibc arena, and the actor grows by a whole trial every trial (measured: +200 MiB
    # per trial at 60k rows x 300 features, flat with the trim; an OOM kill after ~50 trials at
    # SMPD size without it). gc.collect() alone does not help: nothing is referenced any more.
    _release_freed_memory()
    reset_peak_rss()
    params = {**fixed_params(setup.family, seed=setup.seed, threads=setup.threads), **config}
    if setup.validation not in ("time", "group"):
        raise ValueError(f"unknown validation {setup.validation!r}; expected time or group")
    if data is not None:
        _shared_validation(setup, params, data)
        return
    spec, splits = load_splits(setup.features_dir, setup.feature_groups, splits=("train", "val"),
                               selected_ids=setup.selected_ids)
    if setup.validation == "time":
        _time_validation(setup, params, spec.categorical, splits)
    else:
        _group_validation(setup, params, spec.categorical, splits)


def _shared_validation(setup: TrialSetup, params: dict[str, Any], data: Any) -> None:
    """Time or grouped validation on the node's shared matrices: LightGBM reads them in place,
    CatBoost from private frames (it needs integer categoricals)."""
    from smpp_ray.gbdt.shared import get_matrices

    spec, shared = get_matrices(data)
    categorical = list(spec.categorical)

    def inputs(part: Any) -> Any:
        return part.X if setup.family == "lightgbm" else part.frame(spec)

    if setup.validation == "time":
        train, val = shared["train"], shared["val"]
        _fit_on_val(setup, params, categorical, (inputs(train), train.y), (inputs(val), val.y), spec.features)
        return
    both = shared["train+val"]
    _cross_validate(setup, params, categorical, inputs(both), both.y, group_folds(both.uid, setup.folds),
                    spec.features)


def _time_validation(setup: TrialSetup, params: dict[str, Any], categorical: Sequence[str],
                     data: dict[str, Any]) -> None:
    _fit_on_val(setup, params, categorical, (data["train"].X, data["train"].y), (data["val"].X, data["val"].y))


def _fit_on_val(setup: TrialSetup, params: dict[str, Any], categorical: Sequence[str], train: tuple[Any, np.ndarray],
                val: tuple[Any, np.ndarray], feature_names: Sequence[str] = ()) -> None:
    """Fit on ``train`` (X, y), reporting the time-ordered val split's metrics to Tune."""
    objective = Objective.for_labels(setup.objective, train[1], val[1])
    if setup.family == "lightgbm":
        callback: Any = lightgbm_report_callback({"val_src": "val-src", "val_mae": "val-l1"}, setup.report_every,
                                                 objective)
    else:
        callback = TuneReportCatBoostCallback(_catboost_metric_names(), objective)
    fit_model(setup.family, params, setup.max_rounds, train[0], train[1], categorical, valid=val,
              callbacks=[callback], report_every=setup.report_every, feature_names=feature_names)


def _group_validation(setup: TrialSetup, params: dict[str, Any], categorical: Sequence[str],
                      data: dict[str, Any]) -> None:
    """GroupKFold by user over train+val; the reported value is the mean over folds per round."""
    X = pd.concat([data["train"].X, data["val"].X], ignore_index=True)
    y = np.concatenate([data["train"].y, data["val"].y])
    uids = np.concatenate([data["train"].keys["uid"].to_numpy(), data["val"].keys["uid"].to_numpy()])
    _cross_validate(setup, params, categorical, X, y, group_folds(uids, setup.folds))


def _cross_validate(setup: TrialSetup, params: dict[str, Any], categorical: Sequence[str], X: Any,
                    y: np.ndarray, folds: list, feature_names: Sequence[str] = ()) -> None:
    # One MAE scale for every fold's mean: the median of all labels against all of them
    objective = Objective.for_labels(setup.objective, y, y)
    if setup.family == "lightgbm":
        import lightgbm as lgb

        callback = lightgbm_report_callback({"val_src": "valid-src-mean", "val_mae": "valid-l1-mean"},
                                            setup.report_every, objective)
        names: Any = list(feature_names) if feature_names else "auto"
        lgb.cv(params, lgb.Dataset(X, y, categorical_feature=list(categorical), free_raw_data=False,
                                   feature_name=names),
               num_boost_round=setup.max_rounds, folds=folds, feval=_lightgbm_src, callbacks=[callback])
        return
    # CatBoost has no per-round cross-validation callback: fit the folds one after another,
    # then replay the per-round fold means to Tune (ASHA still ranks trials, saving less time).
    curves = []
    for train_idx, val_idx in folds:
        recorder = _RecordCatBoostCallback(_catboost_metric_names(), objective)
        fit_model("catboost", params, setup.max_rounds, X.iloc[train_idx], y[train_idx], categorical,
                  valid=(X.iloc[val_idx], y[val_idx]), callbacks=[recorder], report_every=setup.report_every)
        curves.append(recorder.rounds)
    for reports in zip(*curves, strict=True):
        means = {key: float(np.mean([r[key] for r in reports])) for key in REPORTED}
        _tune_report(with_score(means, objective) | {"rounds": reports[0]["rounds"]})
