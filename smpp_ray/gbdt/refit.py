"""Refit the best configuration of a family and predict every split, as a Ray task.

The refit runs where Tune's trials ran (a Ray task with ``cpus_per_trial`` CPUs), reading the
features Parquet itself from their location (local or ``s3://``); only the model and the
predictions come back to the driver.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray.gbdt.data import load_splits
from smpp_ray.gbdt.spaces import fixed_params
from smpp_ray.gbdt.trainables import fit_model, predict

logger = logging.getLogger(__name__)


def refit(family: str, config: dict[str, Any], rounds: int, features_dir: str, *, fit_on: tuple[str, ...],
          feature_groups: tuple[str, ...], threads: int, seed: int, selected_ids: str = "") -> dict[str, Any]:
    """Train ``family`` with ``config`` for ``rounds`` rounds on ``fit_on`` and predict all splits.

    Returns ``model``, ``spec`` (the :class:`FeatureSpec` as a dict), ``predictions`` (pid, split,
    label, category, pred), ``importance`` (feature -> share of the total, sums to 1) and
    ``sample`` (a few encoded val rows, the signature/input example of the logged model) and
    ``label_mean`` (the mean label of the rows it was fit on: the fallback's constant prior).
    ``selected_ids`` (``tune.fit_on_selected``) fits on the train posts sample selection kept;
    predictions still cover every post of every split.
    """
    spec, data = load_splits(features_dir, feature_groups)
    fit_data = dict(data)
    if selected_ids:
        _, kept = load_splits(features_dir, feature_groups, splits=("train",), selected_ids=selected_ids)
        fit_data["train"] = kept["train"]
    X = pd.concat([fit_data[s].X for s in fit_on], ignore_index=True)
    y = np.concatenate([fit_data[s].y for s in fit_on])
    params = {**fixed_params(family, seed=seed, threads=threads), **config}
    model = fit_model(family, params, rounds, X, y, spec.categorical)
    frames = []
    for split, part in data.items():
        frames.append(pd.DataFrame({"pid": part.keys["pid"].to_numpy(), "split": split, "label": part.y,
                                    "category": part.keys["category"].astype(str).to_numpy(),
                                    "pred": predict(model, part.X)}))
    if family == "lightgbm":
        raw = np.asarray(model.feature_importance(importance_type="gain"), dtype=np.float64)
    else:
        raw = np.asarray(model.get_feature_importance(), dtype=np.float64)
    total = raw.sum() or 1.0
    logger.info("refit %s on %s: %d rows, %d rounds", family, "+".join(fit_on), len(y), rounds)
    return {"model": model, "spec": spec.to_dict(), "predictions": pd.concat(frames, ignore_index=True),
            "importance": dict(zip(spec.features, (raw / total).tolist(), strict=True)), "sample": data["val"].X.head(5),
            "label_mean": float(np.mean(y))}


def refit_remote(family: str, config: dict[str, Any], rounds: int, features_dir: str, *, fit_on: tuple[str, ...],
                 feature_groups: tuple[str, ...], cpus: float, seed: int,
                 resources: dict[str, float] | None = None, selected_ids: str = "", name: str = "") -> Any:
    """Launch :func:`refit` as a Ray task holding ``cpus`` CPUs (and the trials' custom
    ``resources``, so it runs where they may); returns its ObjectRef. ``name`` names the task
    (default ``refit-<family>``; the fallback regressor's is ``refit-fallback``)."""
    import ray

    task = ray.remote(refit).options(num_cpus=cpus, resources=resources or {}, name=name or f"refit-{family}")
    return task.remote(family, config, rounds, features_dir, fit_on=fit_on, feature_groups=feature_groups,
                       threads=max(1, int(cpus)), seed=seed, selected_ids=selected_ids)
