"""LightGBM fit data-parallel across nodes (``tune.engine: ray_train``): for feature sets that do
not fit one node's memory.

One fit is one Ray Train run of :class:`ray.train.lightgbm.LightGBMTrainer`: each of
``tune.train_workers`` workers reads its own shard of the training rows from the features
Parquet through Ray Data (no process ever holds the whole training matrix), encodes it with the
search's :class:`~smpp_ray.gbdt.data.FeatureSpec` (vocabularies from the train split's
categorical columns alone, read on the driver: small), and LightGBM's ``data_parallel`` tree
learner builds every tree from the workers' summed histograms over its own socket network. Every
worker also reads the whole validation split, so all of them compute the same val SRC and MAE
(the model is the same on every worker), and rank 0's values are what Tune sees.

Inside a Tune search each trial runs such a fit and reports its rounds as the single-node trials
do (``val_src``, ``val_mae``, ``val_score``, ``rounds``); the refit of the best configuration is one
more fit, and its predictions are a Ray Data job over each split with the booster. CatBoost has no
data-parallel mode here: with this engine its family still fits on one node.

Only time validation (train vs val) is supported: grouped cross-validation would need every fold
on every worker.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import storage
from smpp_ray.features.manifest import FeatureSet
from smpp_ray.gbdt.data import SPLIT_KEYS, FeatureSpec, build_spec, encode, read_split
from smpp_ray.gbdt.objective import Objective
from smpp_ray.gbdt.spaces import fixed_params

logger = logging.getLogger(__name__)

#: The booster's file in the checkpoint rank 0 reports at the end of a fit.
MODEL_FILE = "model.txt"


@dataclass(frozen=True)
class DataParallelFit:
    """Where the data is and how the fit is spread."""

    features_dir: str
    spec: dict[str, Any]
    """The :class:`FeatureSpec` as a dict (it travels to the workers)."""
    workers: int
    cpus_per_worker: float
    storage_path: str
    """Where Ray Train keeps the run (any location every node reaches)."""
    report_every: int = 1
    objective: str = "src+mae"


def feature_spec(features_dir: str, feature_groups: tuple[str, ...]) -> FeatureSpec:
    """The spec of a data-parallel search: vocabularies from the train split's categorical columns
    only (the numeric columns, the bulk, are never read on the driver)."""
    from smpp_ray.gbdt.data import categorical_columns, select_columns

    manifest = FeatureSet(features_dir).manifest()
    chosen = select_columns(manifest, feature_groups)
    categorical = categorical_columns(manifest, chosen)
    train = read_split(features_dir, "train", list(categorical))
    for name in chosen:   # build_spec checks the columns exist; the numeric ones stay unread
        if name not in train.columns:
            train[name] = np.zeros(len(train), dtype=np.float32)
    return build_spec(manifest, train, feature_groups)


def _split_dataset(features_dir: str, split: str, spec: FeatureSpec) -> Any:
    import ray.data

    fs, path = storage.resolve(FeatureSet(features_dir).split(split))
    return ray.data.read_parquet(path, filesystem=fs).select_columns(list(dict.fromkeys([*SPLIT_KEYS, *spec.features])))


def fit_data_parallel(family_params: dict[str, Any], rounds: int, fit: DataParallelFit, *,
                      fit_on: tuple[str, ...] = ("train",), validate: bool = False, name: str = "fit") -> Any:
    """Train LightGBM with ``family_params`` for ``rounds`` rounds on the ``fit_on`` splits across
    ``fit.workers`` Ray Train workers.

    ``validate`` (a Tune trial): evaluate the val split every ``fit.report_every`` rounds and
    report to the trial this runs in; returns None (a trial's model is not kept: the best
    configuration is refit). Otherwise returns the ``lightgbm.Booster`` rank 0 saved."""
    import ray.train
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.lightgbm import LightGBMTrainer

    from smpp_ray.runtime import quiet_ray_data_progress

    quiet_ray_data_progress()   # this process may be a Tune trial's: its Data context is its own
    spec = FeatureSpec.from_dict(fit.spec)
    train = _split_dataset(fit.features_dir, fit_on[0], spec)
    for split in fit_on[1:]:
        train = train.union(_split_dataset(fit.features_dir, split, spec))
    datasets = {"train": train}
    callbacks: list[Any] = []
    if validate:
        from ray.tune.integration.ray_train import TuneReportCallback

        datasets["val"] = _split_dataset(fit.features_dir, "val", spec)
        callbacks.append(TuneReportCallback())
    fs, root = storage.resolve(fit.storage_path)
    trainer = LightGBMTrainer(
        _train_loop,
        train_loop_config={"params": family_params, "rounds": rounds, "spec": fit.spec, "validate": validate,
                           "report_every": fit.report_every, "objective": fit.objective},
        # SPREAD: the point of this engine is memory beyond one node's, so the workers go to
        # different nodes where there are several (they still share one where there is one)
        scaling_config=ScalingConfig(num_workers=fit.workers, resources_per_worker={"CPU": fit.cpus_per_worker},
                                     placement_strategy="SPREAD"),
        datasets=datasets,
        # Train rows are split between the workers; every worker reads the whole val split.
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name=name, storage_path=root, storage_filesystem=fs, callbacks=callbacks,
                             failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    result = trainer.fit()
    if validate:
        return None
    if result.checkpoint is None:
        raise RuntimeError(f"the data-parallel LightGBM fit {name!r} ended without a model")
    import lightgbm as lgb

    with result.checkpoint.as_directory() as folder:
        return lgb.Booster(model_file=os.path.join(folder, MODEL_FILE))


def _worker_frame(shard: Any, spec: FeatureSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """This worker's rows of a dataset shard, encoded, in time order (as the single-node reader)."""
    frame = shard.materialize().to_pandas()
    frame = frame.sort_values(["postdate", "pid"], kind="stable").reset_index(drop=True)
    return encode(frame, spec), frame["label"].to_numpy(dtype=np.float64)


#: LightGBM's evaluation names -> the reported metrics (``l1`` is the fixed ``metric``, ``src`` the feval).
_VAL_METRICS = {"src": "val_src", "l1": "val_mae"}


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard, LightGBM's data-parallel learner, reports, the model.

    Every worker reports on the same rounds (a report is collective across the workers)."""
    import lightgbm as lgb
    import ray.train
    from ray.train.lightgbm import get_network_params

    from smpp_ray.gbdt.trainables import _lightgbm_src, is_report_round, with_score

    spec = FeatureSpec.from_dict(config["spec"])
    X, y = _worker_frame(ray.train.get_dataset_shard("train"), spec)
    params = {**config["params"], "tree_learner": "data_parallel", "pre_partition": True, **get_network_params()}
    train_set = lgb.Dataset(X, y, categorical_feature=list(spec.categorical), free_raw_data=False)
    rounds, every = int(config["rounds"]), int(config["report_every"])
    if not config["validate"]:
        booster = lgb.train(params, train_set, num_boost_round=rounds)
        with tempfile.TemporaryDirectory(prefix="smpp-lgb-") as folder:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                booster.save_model(os.path.join(folder, MODEL_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"rounds": rounds}, checkpoint=checkpoint)
        return
    val_X, val_y = _worker_frame(ray.train.get_dataset_shard("val"), spec)
    # The MAE scale: the median of this worker's training labels (a random shard of train, so it
    # estimates the split's), on the whole val split every worker holds
    objective = Objective.for_labels(config["objective"], y, val_y)

    def report(env: Any) -> None:
        done = env.iteration + 1
        if is_report_round(done, every, env.end_iteration):
            values = {_VAL_METRICS[metric]: float(value) for _, metric, value, _ in env.evaluation_result_list
                      if metric in _VAL_METRICS}
            ray.train.report({**with_score(values, objective), "rounds": done})

    lgb.train(params, train_set, num_boost_round=rounds, valid_sets=[lgb.Dataset(val_X, val_y, reference=train_set)],
              valid_names=["val"], feval=_lightgbm_src, callbacks=[report])


def run_data_parallel_trial(config: dict[str, Any], setup: Any, fit: DataParallelFit) -> None:
    """The Tune trainable of ``tune.engine: ray_train``: one configuration, fit data-parallel,
    its rounds reported to this trial (``setup`` is the search's :class:`TrialSetup`)."""
    from ray import tune

    params = lightgbm_params(config, seed=setup.seed, threads=setup.threads)
    fit_data_parallel(params, setup.max_rounds, fit, validate=True, name=f"trial-{tune.get_context().get_trial_id()}")


def refit_data_parallel(config: dict[str, Any], rounds: int, features_dir: str, *, fit_on: tuple[str, ...],
                        feature_groups: tuple[str, ...], workers: int, cpus_per_worker: float, seed: int,
                        storage_path: str, name: str) -> dict[str, Any]:
    """:func:`smpp_ray.gbdt.refit.refit`'s result (model, spec, predictions, importance, sample,
    label_mean) from a data-parallel fit: no process holds a whole split's features."""
    spec = feature_spec(features_dir, feature_groups)
    fit = DataParallelFit(features_dir, spec.to_dict(), workers=workers, cpus_per_worker=cpus_per_worker,
                          storage_path=storage_path)
    booster = fit_data_parallel(lightgbm_params(config, seed=seed, threads=max(1, int(cpus_per_worker))), rounds,
                                fit, fit_on=fit_on, name=name)
    predictions = predict_splits(booster, features_dir, spec)
    raw = np.asarray(booster.feature_importance(importance_type="gain"), dtype=np.float64)
    total = raw.sum() or 1.0
    fitted = predictions[predictions["split"].isin(fit_on)]
    sample = encode(_split_dataset(features_dir, "val", spec).limit(5).to_pandas(), spec)
    logger.info("refit lightgbm data-parallel (%d workers) on %s: %d rows, %d rounds", workers, "+".join(fit_on),
                len(fitted), rounds)
    return {"model": booster, "spec": spec.to_dict(), "predictions": predictions,
            "importance": dict(zip(spec.features, (raw / total).tolist(), strict=True)), "sample": sample,
            "label_mean": float(fitted["label"].mean())}


def predict_splits(booster: Any, features_dir: str, spec: FeatureSpec,
                   splits: tuple[str, ...] = ("train", "val", "test")) -> pd.DataFrame:
    """pid, split, label, category and pred of every post of ``splits`` (each split in time
    order, as the single-node refit gives them), scored by Ray Data tasks: each reads and encodes
    its own blocks, and only these columns reach the caller."""
    model = booster.model_to_string()   # Ray Data puts fn_kwargs in the object store once
    frames = []
    for split in splits:
        location = FeatureSet(features_dir).split(split)
        if not storage.list_parquet_files(location):
            continue
        scored = _split_dataset(features_dir, split, spec).map_batches(
            _predict_batch, batch_format="pandas", fn_kwargs={"model": model, "spec": spec.to_dict(), "split": split})
        frame = scored.to_pandas().sort_values(["postdate", "pid"], kind="stable")
        frames.append(frame.drop(columns="postdate"))
    if not frames:
        return pd.DataFrame(columns=["pid", "split", "label", "category", "pred"])
    return pd.concat(frames, ignore_index=True)


def _predict_batch(batch: pd.DataFrame, *, model: str, spec: dict[str, Any], split: str) -> pd.DataFrame:
    import lightgbm as lgb

    booster = lgb.Booster(model_str=model)
    pred = booster.predict(encode(batch, FeatureSpec.from_dict(spec))) if len(batch) else np.empty(0)
    return pd.DataFrame({"pid": batch["pid"].to_numpy(), "postdate": batch["postdate"].to_numpy(), "split": split,
                         "label": batch["label"].to_numpy(dtype=np.float64),
                         "category": batch["category"].astype(str).to_numpy(),
                         "pred": np.asarray(pred, dtype=np.float64)})


def lightgbm_params(config: dict[str, Any], *, seed: int, threads: int) -> dict[str, Any]:
    """The parameters a data-parallel trial or refit trains with: the family's fixed ones and the
    searched configuration (as the single-node path)."""
    return {**fixed_params("lightgbm", seed=seed, threads=threads), **config}
