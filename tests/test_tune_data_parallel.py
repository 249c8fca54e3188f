"""``tune.engine: ray_train``: LightGBM trials and refits fit data-parallel by Ray Train workers
reading Ray Data shards of features in a bucket (real Ray, real Ray Train, LightGBM's own socket
network on 127.0.0.1, the session's S3 server).

One search (one trial, LightGBM only) through :func:`tune_models` covers the whole path: the
trial's rounds reach Tune from the Train workers, the best configuration is refit data-parallel
(the family's and the fallback's), and the refit's predictions are a Ray Data job. Its quality is
checked against the single-node fit of the same configuration on the same rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smpp_ray import metrics
from smpp_ray.config import TuneConfig
from smpp_ray.gbdt import tune_models
from smpp_ray.gbdt.data import load_splits
from smpp_ray.gbdt.spaces import fixed_params
from smpp_ray.gbdt.synthetic import write_synthetic_features
from smpp_ray.gbdt.trainables import fit_model, predict

pytestmark = pytest.mark.slow

CONFIG = TuneConfig(models=("lightgbm",), num_samples=1, max_rounds=40, grace_rounds=10, report_every=10,
                    max_concurrent_trials=1, cpus_per_trial=1.0, engine="ray_train", train_workers=2,
                    registered_model_prefix="test-dp")


def test_a_data_parallel_search_matches_the_single_node_fit(ray_with_s3, s3_bucket, tmp_path):
    features = f"{s3_bucket}/features"
    write_synthetic_features(features, rows=3000, seed=0)
    result = tune_models(features, tmp_path / "out", tune_config=CONFIG, tracking=None)

    # The trial's rounds came from the Train workers: every report round, with the objective
    search = result["search"]["lightgbm"]
    (trial,) = [p for p in Path(search["experiment_path"]).iterdir() if p.is_dir()]
    rows = list(csv.DictReader((trial / "progress.csv").read_text().splitlines()))
    assert [int(r["rounds"]) for r in rows] == [1, 11, 21, 31, 40]
    assert all(np.isfinite(float(r["val_score"])) for r in rows)
    assert search["best_val_src"] > 0.8   # the synthetic signal is strong
    runs = tmp_path / "out" / "ray_results" / "train_runs"
    assert sorted(p.name.split("-")[0] for p in runs.iterdir()) == ["refit", "refit", "trial"]  # + the fallback

    # The refit (data-parallel) against the single-node fit of the same configuration and rounds
    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    spec, data = load_splits(features)
    params = {**fixed_params("lightgbm", seed=CONFIG.seed, threads=1), **result["best_params"]["lightgbm"]}
    single = fit_model("lightgbm", params, result["best_rounds"]["lightgbm"], data["train"].X, data["train"].y,
                       spec.categorical)
    for split in ("val", "test"):
        scored = predictions[predictions["split"] == split].set_index("pid")
        keys = data[split].keys["pid"].to_numpy()
        assert set(scored.index) == set(keys)   # every post of the split, once
        parallel = scored.loc[keys, "raw_lightgbm"].to_numpy()
        alone = predict(single, data[split].X)
        y = data[split].y
        assert metrics.src(y, parallel) == pytest.approx(metrics.src(y, alone), abs=0.02), split
        assert metrics.mae(y, parallel) == pytest.approx(metrics.mae(y, alone), rel=0.05), split
