"""``tune_models``: search both families, refit the best of each, blend, evaluate, log, register the families,
and fit the fallback regressor that scores posts without a usable image (:mod:`smpp_ray.gbdt.fallback`).

It writes the tune folder that :class:`smpp_ray.gbdt.output.TuneOutput` lays out (any location: a
local path or ``s3://...``; every file through :mod:`smpp_ray.storage`, the models from a local
scratch folder); the scorer is registered by the stage (:mod:`smpp_ray.scoring.registration`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import console, digests, metrics, storage, tracking
from smpp_ray.config import TuneConfig, parse_resources
from smpp_ray.features.manifest import FeatureSet
from smpp_ray.gbdt.blend import Blend, choose_blend, write_blend
from smpp_ray.gbdt.data import FeatureSpec, check_split_sizes, verify_features
from smpp_ray.gbdt.distributed import refit_data_parallel
from smpp_ray.gbdt.evaluate import (
    EVAL_SPLITS,
    evaluate_predictions,
    mlflow_metrics,
    summary_metrics,
)
from smpp_ray.gbdt.fallback import (
    IMAGE_GROUPS,
    FallbackFacts,
    FallbackLocations,
    fallback_family,
    fallback_groups,
)
from smpp_ray.gbdt.objective import Objective
from smpp_ray.gbdt.output import TuneOutput
from smpp_ray.gbdt.plots import write_plots
from smpp_ray.gbdt.refit import refit_remote
from smpp_ray.gbdt.registry import log_and_register, save_flavour
from smpp_ray.gbdt.search import SearchResult, run_search, train_runs_location
from smpp_ray.tracking import TrackingContext

logger = logging.getLogger(__name__)


def search_location(out_dir: str) -> str:
    """Where the tune stage's Ray Tune experiments live (one folder per model family)."""
    return TuneOutput.at(out_dir).ray_results


def tune_models(features_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, tune_config: TuneConfig,
                tracking: TrackingContext | None = None, selected_ids: str = "") -> dict[str, Any]:
    """Search, refit, blend and evaluate; see the module docstring for what lands in ``out_dir``.

    ``features_dir`` and ``out_dir`` are locations (local paths or URIs); trials and refit tasks
    read the features from ``features_dir`` themselves, and the Tune experiments live under
    ``out_dir/ray_results``, so nothing they need is on the driver's disk only.

    Needs a running Ray (``smpp_ray.runtime.init_ray``). ``tracking`` is the stage's MLflow run
    (created by the caller); None skips MLflow. Rerunning with the same ``out_dir`` resumes an
    interrupted search and overwrites the refit outputs.

    Returns ``metrics`` ({model: {val_src, val_mae, val_mse, test_src, test_mae, test_mse}} for
    each family, ``blend`` and ``fallback`` (when a feature group needs no image)), ``fallback``
    (the :class:`FallbackFacts` as a dict), ``best_params``, ``best_rounds``, ``search`` (per family: trials,
    best_val_src, experiment_path, search_run_id, seconds), ``blend_weights``,
    ``registered_models`` (empty without tracking), ``timings`` and ``paths`` (full locations).
    """
    started = time.perf_counter()
    features_dir = storage.normalize(features_dir)
    out = storage.normalize(out_dir)
    FeatureSet(features_dir).columns(tune_config.feature_groups)  # fail before any trial
    check_split_sizes(verify_features(features_dir), tune_config.min_val_posts, f"features {features_dir}")
    if tune_config.fit_on_selected and not selected_ids:
        raise ValueError("tune.fit_on_selected needs the kept ids of a train stage with sample selection "
                         "(selected_ids: its selection/kept_ids.parquet)")
    selected_ids = selected_ids if tune_config.fit_on_selected else ""
    models = list(tune_config.models)

    searches: dict[str, SearchResult] = {}
    for family in models:
        searches[family] = run_search(family, features_dir, search_location(out), tune_config=tune_config,
                                      tracking_ctx=tracking, selected_ids=selected_ids)
        storage.write_text(TuneOutput(out).search(family),
                           json.dumps(searches[family].to_dict(), indent=1, default=str))
    search_seconds = time.perf_counter() - started

    refit_started = time.perf_counter()
    plan = _fallback_plan(features_dir, searches, tune_config)
    fits = [*models, *(["fallback"] if plan.family is not None else [])]
    console.line(f"tune: refitting {', '.join(fits)} on train"
                 + (" (val predictions), then on train+val (the final models)" if tune_config.refit_on == "train+val"
                    else ""))
    honest, final, fallback_fits = _refit_all(searches, features_dir, tune_config, plan, search_location(out),
                                                    selected_ids)
    predictions, blend = _predictions(honest, final, models, tune_config)
    weights = blend.weights
    refit_seconds = time.perf_counter() - refit_started
    # One line for what follows too: the demo's whole console stays within one screen (60 lines).
    console.line(f"tune: refits done in {refit_seconds:.0f} s; blend weights "
                 + ", ".join(f"{m} {w:.2f}" for m, w in weights.items())
                 + ("; logging and registering the models in MLflow" if tracking is not None else ""))

    evaluation = evaluate_predictions(predictions, [*models, "blend"])
    uncalibrated = _uncalibrated(predictions, [*models, "blend"])
    spec = FeatureSpec.from_dict(final[models[0]]["spec"])
    fallback, fallback_metrics = _fallback_outcome(plan, fallback_fits, final[models[0]]["label_mean"], tune_config)
    paths = _write_outputs(out, predictions, evaluation, final, spec, searches, blend, tune_config,
                           uncalibrated=uncalibrated, fallback={"facts": fallback, "fits": fallback_fits, "metrics": fallback_metrics})

    registered: dict[str, dict[str, str]] = {}
    mlflow_started = time.perf_counter()
    if tracking is not None:
        registered = _log_to_mlflow(tracking, out, searches, evaluation, weights, paths, tune_config,
                                    fallback_metrics)
    mlflow_seconds = time.perf_counter() - mlflow_started + sum(s.mlflow_seconds for s in searches.values())

    summary: dict[str, Any] = summary_metrics(evaluation)
    if fallback_metrics:
        summary["fallback"] = {f"{split}_{name}": fallback_metrics[split][name]
                               for split in EVAL_SPLITS for name in ("src", "mae", "mse")}
    # The evaluate stage's results table shows these on the console.
    console.details(__name__).info("tune: %s", {m: {k: round(v, 4) for k, v in values.items()} for m, values in summary.items()})
    if tune_config.calibrate:  # before/after: val after calibration is in-sample, test is honest
        summary["uncalibrated"] = summary_metrics({"overall": uncalibrated})
    return {
        "metrics": summary,
        "best_params": {f: s.best_config for f, s in searches.items()},
        "best_rounds": {f: s.best_rounds for f, s in searches.items()},
        "search": {f: {"trials": len(s.trials), "best_val_src": s.best_val_src, "best_val_mae": s.best_val_mae,
                       "best_val_score": s.best_val_score, "best_trial_id": s.best_trial_id,
                       "experiment_path": s.experiment_path, "search_run_id": s.search_run_id,
                       "restored": s.restored, "seconds": s.wall_seconds,
                       # the largest trial process's peak (shared pages included) and its
                       # private memory: what max_concurrent_trials multiplies on a node
                       "peak_rss_mib": max((t["peak_rss_mib"] for t in s.trials if t.get("peak_rss_mib") is not None),
                                           default=None),
                       "private_mib": max((t["private_mib"] for t in s.trials if t.get("private_mib") is not None),
                                          default=None)} for f, s in searches.items()},
        "blend_weights": weights,
        "calibration_check": blend.checks,
        "fallback": fallback.to_dict(),
        "registered_models": registered,
        "timings": {"total_s": time.perf_counter() - started, "search_s": search_seconds,
                    "refit_s": refit_seconds, "mlflow_s": mlflow_seconds},
        "paths": paths,
    }


@dataclass(frozen=True)
class _FallbackPlan:
    """What the fallback regressor is fit with; ``family`` None: no group needs no image (prior only)."""

    family: str | None
    groups: tuple[str, ...]
    config: dict[str, Any]
    rounds: int


#: The fallback's key among the refit tasks (no family is called so).
_FALLBACK = "fallback"


def _fallback_plan(features_dir: str, searches: dict[str, SearchResult], config: TuneConfig) -> _FallbackPlan:
    """The best configuration of the preferred family on the groups that need no image."""
    family = fallback_family(list(searches))
    search = searches[family]
    groups = fallback_groups(config.feature_groups)
    try:
        usable = bool(groups) and bool(FeatureSet(features_dir).columns(groups))
    except ValueError:  # no column of these groups in the manifest
        usable = False
    if not usable:
        logger.info("tune: no feature column outside the image's groups %s (groups left: %s); the fallback is "
                    "the label prior only", list(IMAGE_GROUPS), list(groups))
        return _FallbackPlan(None, groups, search.best_config, search.best_rounds)
    return _FallbackPlan(family, groups, search.best_config, search.best_rounds)


def _refit_all(searches: dict[str, SearchResult], features_dir: str, config: TuneConfig, fallback: _FallbackPlan,
               searches_dir: str, selected_ids: str) -> tuple[dict[str, dict], dict[str, dict], tuple[dict, dict] | None]:
    """Refits on train (val predictions for the blend weight and honest val metrics), then on
    train+val when configured (the final models; test predictions come from them). The fallback
    regressor is one more task of each kind, run beside the families'; its (honest, final) pair
    comes back apart (None when there is no fallback model)."""
    import ray

    jobs = {f: (f, s.best_config, s.best_rounds, config.feature_groups) for f, s in searches.items()}
    if fallback.family is not None:
        jobs[_FALLBACK] = (fallback.family, fallback.config, fallback.rounds, fallback.groups)

    def data_parallel(family: str) -> bool:
        return config.engine == "ray_train" and family == "lightgbm"

    def launch(fit_on: tuple[str, ...]) -> dict[str, Any]:
        return {name: refit_remote(family, best, rounds, features_dir, fit_on=fit_on, feature_groups=groups,
                                   cpus=config.cpus_per_trial, seed=config.seed,
                                   resources=parse_resources(config.trial_resources, "tune.trial_resources"),
                                   selected_ids=selected_ids,
                                   name=f"refit-{name}")
                for name, (family, best, rounds, groups) in jobs.items() if not data_parallel(family)}

    def fit_across_workers(fit_on: tuple[str, ...]) -> dict[str, dict]:
        # One at a time, from here: each fit's workers and Ray Data reads take CPUs across the
        # cluster, and two side by side can leave the reads none (a stalled split).
        return {name: refit_data_parallel(best, rounds, features_dir, fit_on=fit_on, feature_groups=groups,
                                          workers=config.train_workers, cpus_per_worker=config.cpus_per_trial,
                                          seed=config.seed, storage_path=train_runs_location(searches_dir),
                                          name=f"refit-{name}-{'+'.join(fit_on)}")
                for name, (family, best, rounds, groups) in jobs.items() if data_parallel(family)}

    refs = launch(("train",))
    final_refs = launch(("train", "val")) if config.refit_on == "train+val" else None
    honest_parallel = fit_across_workers(("train",))
    final_parallel = fit_across_workers(("train", "val")) if config.refit_on == "train+val" else honest_parallel
    honest = {**dict(zip(refs, ray.get(list(refs.values())), strict=True)), **honest_parallel}
    final = ({**dict(zip(final_refs, ray.get(list(final_refs.values())), strict=True)), **final_parallel}
             if final_refs is not None else dict(honest))
    fits = (honest.pop(_FALLBACK), final.pop(_FALLBACK)) if fallback.family is not None else None
    return honest, final, fits


def _fallback_outcome(plan: _FallbackPlan, fits: tuple[dict, dict] | None, family_label_mean: float,
                      config: TuneConfig) -> tuple[FallbackFacts, dict[str, dict[str, float]]]:
    """The fallback's facts and its {split: {src, mae, mse, n}} metrics (empty without a model):
    val from the train-only refit, as the families' val metrics are."""
    if fits is None:
        return FallbackFacts(None, plan.groups, float(family_label_mean), refit_on=config.refit_on), {}
    frame = _fallback_predictions(fits)
    values = {}
    for split in EVAL_SPLITS:
        rows = frame[(frame["split"] == split) & frame["label"].notna()]
        values[split] = metrics.regression_metrics(rows["label"].to_numpy(), rows["pred"].to_numpy())
    facts = FallbackFacts(plan.family, plan.groups, float(fits[1]["label_mean"]), plan.rounds, dict(plan.config),
                          config.refit_on, values["val"]["src"], values["val"]["mae"], values["test"]["src"],
                          values["test"]["mae"])
    # The log's, not the console's: its figures are in fallback.json, summary.json and MLflow.
    console.details(__name__).info("tune: fallback %s on %s: val_src %.4f, val_mae %.4f, prior %.4f", plan.family,
                                   list(plan.groups), values["val"]["src"], values["val"]["mae"], facts.prior)
    return facts, values


def _fallback_predictions(fits: tuple[dict, dict]) -> pd.DataFrame:
    """pid, split, label, category, pred: val from the train-only refit, train/test from the final one."""
    h, f = fits[0]["predictions"], fits[1]["predictions"]
    return f[["pid", "split", "label", "category"]].assign(
        pred=np.where(f["split"] == "val", h["pred"], f["pred"]))  # same rows, same order


def _predictions(honest: dict[str, dict], final: dict[str, dict], models: list[str], config: TuneConfig
                 ) -> tuple[pd.DataFrame, Blend]:
    """One row per post: val predictions from the train-only refit, train/test from the final
    model, as ``raw_<model>``; the blend and the calibrators are chosen on val and give
    ``pred_<model>``, the scores users get."""
    frame = None
    for family in models:
        h, f = honest[family]["predictions"], final[family]["predictions"]
        pred = np.where(f["split"] == "val", h["pred"], f["pred"])  # same rows, same order
        column = f[["pid", "split", "label", "category"]].assign(**{f"raw_{family}": pred})
        frame = column if frame is None else frame.merge(column, on=["pid", "split", "label", "category"], how="inner",
                                                         validate="one_to_one")
    assert frame is not None
    val, train = frame[frame["split"] == "val"], frame[frame["split"] == "train"]
    objective = Objective.for_labels(config.objective, train["label"].dropna().to_numpy(),
                                     val["label"].to_numpy())
    blend = choose_blend(val["label"].to_numpy(), {m: val[f"raw_{m}"].to_numpy() for m in models}, objective,
                         calibrate=config.calibrate)
    raw = {m: frame[f"raw_{m}"].to_numpy() for m in models}
    frame["raw_blend"] = blend.raw(raw)
    for model in [*models, "blend"]:
        frame[f"pred_{model}"] = blend.score(model, raw)
    return frame, blend


def _uncalibrated(predictions: pd.DataFrame, models: list[str]) -> dict[str, Any]:
    """``{split: {model: {src, mae, mse, n}}}`` of the raw scores (what calibration changed)."""
    raw = predictions.drop(columns=[f"pred_{m}" for m in models]).rename(columns={f"raw_{m}": f"pred_{m}" for m in models})
    return evaluate_predictions(raw, models)["overall"]


def _write_outputs(out: str, predictions: pd.DataFrame, evaluation: dict[str, Any], final: dict[str, dict],
                   spec: FeatureSpec, searches: dict[str, SearchResult], blend: Blend,
                   config: TuneConfig, *, uncalibrated: dict[str, Any], fallback: dict[str, Any]) -> dict[str, str]:
    """Every output file under ``out``; returns their locations (``paths`` of the result)."""
    where = TuneOutput(out)
    paths = {"out_dir": out, "metrics": where.metrics, "predictions": where.predictions,
             "feature_spec": where.feature_spec, "blend": where.blend}
    buffer = io.BytesIO()
    predictions.to_parquet(buffer, index=False)
    storage.write_bytes(paths["predictions"], buffer.getvalue())
    spec.save(paths["feature_spec"])
    write_blend(paths["blend"], blend, objective=config.objective,
                rounds={f: s.best_rounds for f, s in searches.items()}, refit_on=config.refit_on)
    for family, refit in final.items():
        paths[f"model_{family}"] = save_flavour(family, refit["model"], where.model(family),
                                                refit["sample"])
    importance = {f: r["importance"] for f, r in final.items()}
    plots = write_plots(predictions, evaluation, importance, spec.groups, [*final, "blend"], where.plots)
    paths.update({f"plot_{k}": v for k, v in plots.items()})
    document = {
        **evaluation,
        "blend": {"weights": blend.weights, "chosen_on": "val", "objective": config.objective},
        "calibrated": config.calibrate,
        # Val after calibration is in-sample (the calibrators were fitted on val); test is honest.
        "uncalibrated": uncalibrated,
        "best": {f: {"params": s.best_config, "rounds": s.best_rounds, "search_val_src": s.best_val_src,
                     "search_val_mae": s.best_val_mae, "search_val_score": s.best_val_score,
                     "trials": len(s.trials), "pareto_front": s.pareto_front} for f, s in searches.items()},
        "refit_on": config.refit_on,
        "validation": config.validation,
        "importance": importance,
        "fallback": {**fallback["facts"].to_dict(), "overall": fallback["metrics"]},
    }
    paths.update(_write_fallback(out, fallback["facts"], fallback["fits"]))
    # json.dumps, not storage.write_json: metrics of a split without labels are NaN, kept as such.
    storage.write_text(paths["metrics"], json.dumps(document, indent=1, default=_nan_safe))
    # What a scorer reads from this folder besides the models (which carry their own manifests).
    digests.write_manifest(out, [storage.relative_within(out, out, paths[key])
                                 for key in ("blend", "feature_spec", "fallback", "fallback_feature_spec")
                                 if key in paths])
    return paths


def _write_fallback(out: str, facts: FallbackFacts, fits: tuple[dict, dict] | None) -> dict[str, str]:
    """The fallback's files (:mod:`smpp_ray.gbdt.fallback`); a prior-only fallback removes an earlier model."""
    where = FallbackLocations.of(out)
    paths = {"fallback": where.facts}
    if fits is None:
        for stale in (where.model, where.feature_spec, where.predictions):
            storage.remove(stale)
    else:
        final = fits[1]
        paths["model_fallback"] = save_flavour(facts.family, final["model"], where.model, final["sample"])
        paths["fallback_feature_spec"] = FeatureSpec.from_dict(final["spec"]).save(where.feature_spec)
        buffer = io.BytesIO()
        _fallback_predictions(fits).to_parquet(buffer, index=False)
        paths["fallback_predictions"] = storage.write_bytes(where.predictions, buffer.getvalue())
    facts.save(where.facts)  # last: a fallback.json names a complete model
    return paths


def _nan_safe(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {value!r} to JSON")


def _log_to_mlflow(ctx: TrackingContext, out: str, searches: dict[str, SearchResult], evaluation: dict[str, Any],
                   weights: dict[str, float], paths: dict[str, str], config: TuneConfig,
                   fallback_metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, str]]:
    """Models to each family's search run (registered), metrics and artifacts to the stage run
    (the fallback's as ``<split>_fallback_<metric>``, the families' naming)."""
    from smpp_ray.provenance import git_commit

    registered = {}
    overall = evaluation.get("overall", {})
    for family, search in searches.items():
        run_id = search.search_run_id or ctx.run_id
        scores = {f"{split}_{name}": overall.get(split, {}).get(family, {}).get(name)
                  for split in ("val", "test") for name in ("src", "mae")}
        tags = {"smpp.family": family, "smpp.refit_on": config.refit_on, "smpp.best_trial": search.best_trial_id,
                **{f"smpp.{k}": f"{v:.4f}" for k, v in scores.items() if isinstance(v, float)},
                **({"smpp.git_commit": git_commit()} if git_commit() else {})}
        tracking.log_artifact(ctx.tracking_uri, run_id, TuneOutput(out).search(family))
        registered[family] = log_and_register(
            ctx.tracking_uri, run_id, paths[f"model_{family}"], f"{config.registered_model_prefix}-{family}",
            description=f"smpp_ray {family} popularity regressor on the extracted features (the tune stage's "
                        "best trial, refit); its inputs are the features of feature_spec.json",
            tags=tags, params={**search.best_config, "rounds": search.best_rounds})
    flat = mlflow_metrics(evaluation)
    flat.update({f"blend_weight_{f}": w for f, w in weights.items()})
    flat.update({f"{f}_pareto_trials": len(s.pareto_front) for f, s in searches.items()})
    flat.update({f"{split}_fallback_{name}": values[name] for split, values in fallback_metrics.items()
                 for name in ("src", "mae", "mse")})
    tracking.log_metrics(ctx.tracking_uri, ctx.run_id, flat)
    for key in ("metrics", "predictions", "feature_spec", "blend", "fallback", "fallback_feature_spec"):
        if key in paths:
            tracking.log_artifact(ctx.tracking_uri, ctx.run_id, paths[key])
    tracking.log_artifact(ctx.tracking_uri, ctx.run_id, TuneOutput(out).plots, "plots")
    return registered
