"""One Ray Tune search per model family, resumable, with every trial tracked in MLflow.

``run_search`` builds (or, when its experiment folder already exists, restores) a
``ray.tune.Tuner``: a seeded Optuna or random search over :mod:`smpp_ray.gbdt.spaces`, ASHA on
``val_score`` (``tune.objective`` of val SRC and MAE, :mod:`smpp_ray.gbdt.objective`) per
boosting round, ``max_concurrent_trials`` and CPUs per trial from the config.
A search cut short (Ctrl+C, ``ray job stop``) raises :class:`SearchInterrupted`; calling again
with the same output folder restores it with ``Tuner.restore``: finished trials are kept, cut
trials restart under their own trial id, and only the missing trials are sampled.

The experiment lives at a storage location (``tune.RunConfig(storage_path=...)`` with the
filesystem of :func:`smpp_ray.storage.resolve`): on ``s3://`` the driver syncs it there and a
restore on another machine reads it back from there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ray import tune
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from smpp_ray import storage, tracking
from smpp_ray.config import TuneConfig, parse_resources
from smpp_ray.gbdt.objective import SCORE, best_round, pareto_front
from smpp_ray.gbdt.shared import load_matrices
from smpp_ray.gbdt.spaces import search_space
from smpp_ray.gbdt.tracking_callback import FAMILY_TAG, SEARCH_TAG, MlflowTrialCallback
from smpp_ray.gbdt.trainables import TrialSetup, run_trial
from smpp_ray.tracking import TrackingContext

logger = logging.getLogger(__name__)

METRIC = SCORE


class SearchInterrupted(RuntimeError):
    """The search stopped before its trials completed; rerun with the same out_dir to resume."""


@dataclass
class SearchResult:
    """The outcome of one family's search."""

    family: str
    best_config: dict[str, Any]
    best_rounds: int
    best_val_src: float
    best_val_mae: float
    best_val_score: float
    best_trial_id: str
    trials: list[dict[str, Any]]
    experiment_path: str
    search_run_id: str | None
    wall_seconds: float
    mlflow_seconds: float = 0.0
    restored: bool = False
    statuses: dict[str, str] = field(default_factory=dict)
    #: The trials no other trial beats on both val SRC and val MAE (each at its selected round),
    #: by SRC from highest: ``trial_id``, ``round``, ``val_src``, ``val_mae``, ``val_score``, ``config``.
    pareto_front: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _TrialLedger(Callback):
    """Records the final status of every trial (the ResultGrid does not expose it)."""

    def __init__(self) -> None:
        self.statuses: dict[str, str] = {}

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.statuses = {t.trial_id: str(t.status) for t in trials}


class _TrialProgress(Callback):
    """One console line per finished trial:
    ``lightgbm trial 5/8 done: val_score 0.61 (src 0.70, mae 0.91), best 0.64``.

    A trial's values are its selected round's (:func:`smpp_ray.gbdt.objective.best_round`, the
    one :func:`_summarise` selects), so the last trial line's "best" is the search's best.
    """

    def __init__(self, family: str, total: int, min_rounds: int) -> None:
        self.family, self.total, self.min_rounds = family, total, min_rounds
        self.done = 0
        self.best = float("-inf")
        self.reports: dict[str, list[dict[str, float]]] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if METRIC in result:
            self.reports.setdefault(trial.trial_id, []).append(
                {k: float(result[k]) for k in ("rounds", "val_src", "val_mae", METRIC) if k in result})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "failed")

    def _line(self, trial: Any, how: str) -> None:
        from smpp_ray.console import line

        self.done += 1
        chosen = best_round(self.reports.pop(trial.trial_id, []), self.min_rounds)
        if chosen is None:
            shown = f"no {METRIC}"
        else:
            self.best = max(self.best, chosen[METRIC])
            shown = (f"{METRIC} {chosen[METRIC]:.4f} (src {chosen.get('val_src', float('nan')):.4f}, "
                     f"mae {chosen.get('val_mae', float('nan')):.4f})")
        best = f", best {self.best:.4f}" if self.best > float("-inf") else ""
        line(f"{self.family} trial {self.done}/{self.total} {how}: {shown}{best}")


class _InterruptAfter(Callback):
    """Testing aid: after ``count`` trials complete, interrupt the search as Ctrl+C would."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.completed = 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed += 1
        if self.completed == self.count:
            logger.warning("interrupting the search after %d completed trials (tune.interrupt_after_trials)", self.count)
            signal.raise_signal(signal.SIGINT)


def _search_alg(config: TuneConfig) -> Any:
    if config.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=config.seed)
    if config.search_alg == "optuna_multi":
        from smpp_ray.gbdt.multi_objective import ParetoOptunaSearch

        return ParetoOptunaSearch(seed=config.seed, min_rounds=config.min_rounds)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator (it is not a
    # Searcher it can wrap), so the random search carries the limit itself.
    return BasicVariantGenerator(random_state=config.seed, max_concurrent=config.max_concurrent_trials)


def _scheduler(config: TuneConfig, data_parallel: bool = False) -> Any:
    """ASHA on boosting rounds; none for data-parallel trials.

    A trial ASHA stops is killed mid-run. A data-parallel trial's Ray Train run then never
    returns its placement group itself: Ray Train's cleaner releases it only where it can query
    the State API (a Ray with its dashboard), so on a local Ray without one, every stopped trial
    would keep its workers' CPUs and the next fit's Ray Data reads would wait forever. Those
    trials run to their last round instead (the search algorithm still chooses what to try)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if data_parallel:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="rounds", max_t=config.max_rounds,
                         grace_period=config.grace_rounds, reduction_factor=3)


def _search_run(tracking_ctx: TrackingContext, family: str, search_path: str) -> str:
    """The family's search run under the stage run: reused when a resumed search finds it."""
    found = tracking.find_runs(tracking_ctx.tracking_uri, tracking_ctx.experiment,
                               {FAMILY_TAG: family, SEARCH_TAG: search_path, tracking.PARENT_TAG: tracking_ctx.run_id})
    if found:
        tracking.reopen_run(tracking_ctx.tracking_uri, found[0])
        return found[0]
    return tracking.create_run(tracking_ctx.tracking_uri, tracking_ctx.experiment, f"search-{family}",
                               parent_run_id=tracking_ctx.run_id, tags={FAMILY_TAG: family, SEARCH_TAG: search_path})


#: At most about this many reports per trial. Each report is a round trip to the driver, whose
#: result processing (searcher, scheduler, MLflow callback) then queues behind long trials that
#: report every few rounds, and that backlog is Tune overhead between trials.
MAX_REPORTS_PER_TRIAL = 200


def effective_report_every(config: TuneConfig) -> int:
    """``tune.report_every``, coarsened for long trials, never past ASHA's first rung."""
    return min(config.grace_rounds, max(config.report_every, config.max_rounds // MAX_REPORTS_PER_TRIAL))


def run_search(family: str, features_dir: str, storage_dir: str, *, tune_config: TuneConfig,
               tracking_ctx: TrackingContext | None, selected_ids: str = "") -> SearchResult:
    """Run (or resume) the search of ``family`` with its Tune experiment at
    ``storage_dir/<family>`` (any location); raises :class:`SearchInterrupted` when cut short.
    ``selected_ids``: the kept-ids file whose train posts the trials fit on ('' for all)."""
    storage_dir = storage.normalize(storage_dir)
    experiment_path = storage.join(storage_dir, family)
    fs, fs_root = storage.resolve(storage_dir)
    fs_experiment = f"{fs_root}/{family}"
    setup = TrialSetup(family=family, features_dir=storage.normalize(features_dir), feature_groups=tune_config.feature_groups,
                       validation=tune_config.validation, folds=tune_config.folds, max_rounds=tune_config.max_rounds,
                       threads=max(1, int(tune_config.cpus_per_trial)), seed=tune_config.seed,
                       report_every=effective_report_every(tune_config),
                       selected_ids=selected_ids,
                       objective=tune_config.objective)
    resources = {"cpu": tune_config.cpus_per_trial, **parse_resources(tune_config.trial_resources, "tune.trial_resources")}
    shared: dict[str, Any] = {}
    data_parallel = tune_config.engine == "ray_train" and family == "lightgbm"
    if data_parallel:
        trainable = _data_parallel_trainable(setup, tune_config, storage_dir, resources)
    else:
        if tune_config.shared_data:
            # Read and encoded once here; with_parameters puts the arrays in the object store, and
            # every trial on a node maps the same read-only copy (smpp_ray.gbdt.shared)
            shared["data"] = load_matrices(setup.features_dir, setup.feature_groups, validation=setup.validation,
                                           selected_ids=setup.selected_ids)
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup, **shared), resources)
        shared.clear()   # the object store holds the arrays now; the driver keeps no copy
    space = search_space(family)

    search_run_id = None
    ledger = _TrialLedger()
    # progress.csv / result.json are the per-round record the best round is read back from (also
    # after a restore); they are named explicitly because TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1
    # (set in tests and quiet deployments) drops Tune's automatic loggers.
    callbacks: list[Callback] = [ledger, _TrialProgress(family, tune_config.num_samples, tune_config.min_rounds),
                                 CSVLoggerCallback(),
                                 JsonLoggerCallback()]
    restored = tune.Tuner.can_restore(fs_experiment, storage_filesystem=fs)
    mlflow_cb = None
    if tracking_ctx is not None:
        search_run_id = _search_run(tracking_ctx, family, experiment_path)
        tracking.log_params(tracking_ctx.tracking_uri, search_run_id,
                            {"family": family, "num_samples": tune_config.num_samples, "search_alg": tune_config.search_alg,
                             "max_rounds": tune_config.max_rounds, "grace_rounds": tune_config.grace_rounds,
                             "validation": tune_config.validation, "seed": tune_config.seed,
                             "objective": tune_config.objective, "min_rounds": tune_config.min_rounds})
        mlflow_cb = MlflowTrialCallback(tracking_ctx.tracking_uri, tracking_ctx.experiment, search_run_id,
                                        family=family, search_path=experiment_path, min_rounds=tune_config.min_rounds,
                                        resumed=restored)
        callbacks.append(mlflow_cb)
    if tune_config.interrupt_after_trials:
        callbacks.append(_InterruptAfter(tune_config.interrupt_after_trials))

    if restored:
        logger.info("restoring the %s search from %s", family, experiment_path)
        tuner = tune.Tuner.restore(fs_experiment, trainable, param_space=space, resume_unfinished=True,
                                   storage_filesystem=fs)
        # Tuner.restore brings back the RunConfig pickled at the first launch, callbacks included
        # (an old parent run, a spent interruption hook); this launch's callbacks replace them.
        tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", search_alg=_search_alg(tune_config), scheduler=_scheduler(tune_config, data_parallel),
                num_samples=tune_config.num_samples,
                max_concurrent_trials=tune_config.max_concurrent_trials if tune_config.search_alg != "random" else None,
                time_budget_s=tune_config.time_budget_s or None,
                # Trials of a family share resources: reusing their actors saves a worker start-up
                # (seconds on a busy node) per trial, the bulk of Tune's overhead for short trials.
                # Not a data-parallel trial's: its function trainable cannot be reset after a Ray
                # Train run (and a start-up is small beside that run's).
                reuse_actors=not data_parallel),
            run_config=tune.RunConfig(name=family, storage_path=fs_root, storage_filesystem=fs, callbacks=callbacks,
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0)))
    started = time.perf_counter()
    try:
        grid = _fit_stopping_gracefully(tuner)
        wall = time.perf_counter() - started
        _check_complete(family, ledger.statuses, wall, tune_config, experiment_path)
        result = _summarise(family, grid, ledger.statuses, experiment_path, search_run_id, wall, restored,
                            tune_config.min_rounds)
    except BaseException as err:
        if search_run_id and tracking_ctx is not None:
            status = "KILLED" if isinstance(err, SearchInterrupted) else tracking.ended_status(err)
            tracking.end_run(tracking_ctx.tracking_uri, search_run_id, status)
        raise
    if mlflow_cb is not None:
        result.mlflow_seconds = mlflow_cb.seconds
    if search_run_id and tracking_ctx is not None:
        tracking.log_params(tracking_ctx.tracking_uri, search_run_id,
                            {f"best.{k}": v for k, v in result.best_config.items()} | {"best.rounds": result.best_rounds})
        tracking.log_metrics(tracking_ctx.tracking_uri, search_run_id,
                             {"best_val_src": result.best_val_src, "best_val_mae": result.best_val_mae,
                              "best_val_score": result.best_val_score, "trials": len(result.trials), "search_seconds": wall,
                              "pareto_trials": len(result.pareto_front)})
        tracking.end_run(tracking_ctx.tracking_uri, search_run_id, "FINISHED")
    return result


#: What a data-parallel trial itself holds: it only drives its Ray Train run, whose workers hold
#: the CPUs (a whole CPU per trial would leave a node's CPUs to trials that do no work).
DRIVER_CPUS = 0.01


def _data_parallel_trainable(setup: TrialSetup, tune_config: TuneConfig, storage_dir: str,
                             resources: dict[str, float]) -> Any:
    """The trainable of ``tune.engine: ray_train`` (:mod:`smpp_ray.gbdt.distributed`): the spec
    is made here once, from the train split's categorical columns only."""
    from smpp_ray.gbdt.distributed import DataParallelFit, feature_spec, run_data_parallel_trial

    fit = DataParallelFit(setup.features_dir, feature_spec(setup.features_dir, setup.feature_groups).to_dict(),
                          workers=tune_config.train_workers, cpus_per_worker=tune_config.cpus_per_trial,
                          storage_path=train_runs_location(storage_dir), report_every=setup.report_every,
                          objective=setup.objective)
    logger.info("lightgbm trials fit data-parallel: %d Ray Train workers x %s CPUs each", fit.workers,
                fit.cpus_per_worker)
    import ray

    held = tune_config.max_concurrent_trials * fit.workers * fit.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cpus < held + 1:   # an autoscaling cluster may grow: a warning, not a refusal
        logger.warning("data-parallel trials hold %s CPUs (tune.max_concurrent_trials x tune.train_workers x "
                       "tune.cpus_per_trial) of the cluster's %s: Ray Data needs at least one more CPU to read "
                       "their shards, or the trials wait forever", held, cpus)
    return tune.with_resources(tune.with_parameters(run_data_parallel_trial, setup=setup, fit=fit),
                               {**resources, "cpu": DRIVER_CPUS})


def train_runs_location(storage_dir: str) -> str:
    """Where the data-parallel fits keep their Ray Train runs (beside the searches)."""
    return storage.join(storage_dir, "train_runs")


def _ask_tune_to_stop() -> bool:
    """Ask the running ``Tuner.fit`` to stop as on its first Ctrl+C (it saves the experiment state
    one last time, so a rerun resumes from this moment): Tune listens for SIGUSR1 while it runs.
    False before Tune installed that handler (SIGUSR1's default would kill the process)."""
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
        return False
    signal.raise_signal(signal.SIGUSR1)
    return True


def _fit_stopping_gracefully(tuner: Any) -> Any:
    """``tuner.fit()``; a stop signal (SIGTERM, SIGINT; :func:`smpp_ray.tracking.stop_signals_end_runs`)
    stops Tune gracefully and then raises :class:`~smpp_ray.tracking.StopRequested`.

    Tune's own SIGINT handler is turned off while ours handles the signal, so SIGINT and SIGTERM
    (``ray job stop``) take the same path: cut trials end KILLED in MLflow (the callback's
    ``on_experiment_end``) and the stage exits with 128 + the signal.
    """
    with tracking.graceful_stop(_ask_tune_to_stop) as handled:
        previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        if handled:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        try:
            grid = tuner.fit()
        finally:
            if handled:
                if previous is None:
                    os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
                else:
                    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous
        tracking.raise_if_stop_received()
    return grid


def _check_complete(family: str, statuses: dict[str, str], wall: float, config: TuneConfig, path: str) -> None:
    """Raise :class:`SearchInterrupted` unless every trial ended (or the time budget ran out)."""
    finished = [k for k, v in statuses.items() if v in ("TERMINATED", "ERROR")]
    cut = [k for k in statuses if k not in finished]
    budget_spent = config.time_budget_s > 0 and wall >= 0.95 * config.time_budget_s
    if cut or (len(finished) < config.num_samples and not budget_spent):
        raise SearchInterrupted(
            f"the {family} search in {path} stopped after {len(finished)} of {config.num_samples} "
            f"trials ({len(cut)} cut short); rerun with the same out_dir to resume it")


def _summarise(family: str, grid: Any, statuses: dict[str, str], experiment_path: str,
               search_run_id: str | None, wall: float, restored: bool, min_rounds: int = 0) -> SearchResult:
    """Best round of the best trial: :data:`METRIC` is maximised over trials *and* rounds (rounds
    >= ``min_rounds`` where a trial reached them; early stopping on val)."""
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for result in grid:
        frame = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or str(result.path).rstrip("/").rpartition("/")[2]
        entry: dict[str, Any] = {"trial_id": trial_id, "config": result.config, "status": statuses.get(trial_id, "UNKNOWN"),
                                 "error": str(result.error) if result.error else None}
        chosen = None
        if frame is not None and METRIC in frame:
            # A trial whose trees never split predicts a constant: SRC and so val_score are NaN
            # in every round, and it has no best round (but it did run its rounds)
            entry.update(rounds_run=int(frame["rounds"].max()),
                         peak_rss_mib=float(frame["peak_rss_mib"].max()) if "peak_rss_mib" in frame else None,
                         private_mib=float(frame["private_mib"].max()) if "private_mib" in frame else None)
            chosen = best_round(frame[["rounds", "val_src", "val_mae", METRIC]].to_dict("records"), min_rounds)
        if chosen is not None:
            entry.update(best_val_score=float(chosen[METRIC]), best_val_src=float(chosen["val_src"]),
                         best_val_mae=float(chosen["val_mae"]), best_round=int(chosen["rounds"]))
            if result.error is None and (best is None or entry["best_val_score"] > best["best_val_score"]):
                best = entry
        trials.append(entry)
    if best is None:
        errors = [t["error"] for t in trials if t["error"]]
        raise RuntimeError(f"no {family} trial in {experiment_path} reported {METRIC}; first error: "
                           f"{errors[0] if errors else 'none'}")
    front = pareto_front([{"trial_id": t["trial_id"], "round": t["best_round"], "val_src": t["best_val_src"],
                           "val_mae": t["best_val_mae"], "val_score": t["best_val_score"], "config": t["config"]}
                          for t in trials if "best_round" in t and t["error"] is None])
    logger.info("%s search: %d trials, best %s=%.4f (src %.4f, mae %.4f) at round %d (%s); %d on the SRC/MAE "
                "Pareto front", family, len(trials), METRIC, best["best_val_score"], best["best_val_src"],
                best["best_val_mae"], best["best_round"], json.dumps(best["config"], default=str), len(front))
    return SearchResult(family=family, best_config=dict(best["config"]), best_rounds=best["best_round"],
                        best_val_src=best["best_val_src"], best_val_mae=best["best_val_mae"],
                        best_val_score=best["best_val_score"],
                        best_trial_id=best["trial_id"], trials=trials, experiment_path=experiment_path,
                        search_run_id=search_run_id, wall_seconds=wall, statuses=statuses,
                        restored=restored, pareto_front=front)

