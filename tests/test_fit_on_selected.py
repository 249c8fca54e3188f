"""``tune.fit_on_selected``: the regressors' train rows are the posts sample selection kept (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from smpp_ray.data.selection import kept_ids_location, write_kept_ids
from smpp_ray.gbdt.data import load_splits, read_split
from smpp_ray.gbdt.synthetic import write_synthetic_features


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    path = tmp_path_factory.mktemp("features")
    write_synthetic_features(path, rows=600, seed=0)
    return str(path)


def test_fit_on_selected_keeps_the_kept_train_posts_and_whole_val_and_test(features, tmp_path):
    train_pids = read_split(features, "train", ["pid"])["pid"].astype(str).tolist()
    kept = train_pids[::3]  # any subset: the file, not a rule, decides
    location = kept_ids_location(str(tmp_path / "run"))
    write_kept_ids(location, kept[::-1], np.linspace(0, 1, len(kept)),
                   {"keep": 0.33, "kept": len(kept), "total": len(train_pids), "scored_after_epoch": 0})

    spec_all, everything = load_splits(features)
    spec, selected = load_splits(features, selected_ids=location)
    assert spec == spec_all  # the vocabulary comes from all of train either way
    assert sorted(selected["train"].keys["pid"].astype(str)) == sorted(kept)
    assert len(selected["train"].y) == len(selected["train"].X) == len(kept) < len(everything["train"].y)
    rows = everything["train"].keys["pid"].astype(str).isin(set(kept)).to_numpy()
    pd.testing.assert_frame_equal(selected["train"].X, everything["train"].X[rows].reset_index(drop=True))
    np.testing.assert_array_equal(selected["train"].y, everything["train"].y[rows])
    for split in ("val", "test"):
        pd.testing.assert_frame_equal(selected[split].X, everything[split].X)


def test_kept_posts_missing_from_the_features_are_an_error(features, tmp_path):
    location = kept_ids_location(str(tmp_path / "run"))
    write_kept_ids(location, ["no-such-post"], np.zeros(1), {"keep": 0.5, "kept": 1, "total": 2,
                                                            "scored_after_epoch": 0})
    with pytest.raises(ValueError, match="1 of the 1 kept posts .* are not in the features' train split"):
        load_splits(features, selected_ids=location)


def test_refit_on_selected_fits_the_kept_rows_and_predicts_every_post(features, tmp_path):
    from smpp_ray.gbdt.refit import refit

    train_pids = read_split(features, "train", ["pid"])["pid"].astype(str).tolist()
    kept = train_pids[: len(train_pids) // 4]
    location = kept_ids_location(str(tmp_path / "run"))
    write_kept_ids(location, kept, np.zeros(len(kept)), {"keep": 0.25, "kept": len(kept), "total": len(train_pids),
                                                          "scored_after_epoch": 0})
    common = dict(fit_on=("train",), feature_groups=(), threads=1, seed=0)
    params = {"num_leaves": 7, "learning_rate": 0.1, "min_data_in_leaf": 5}
    whole = refit("lightgbm", params, 30, features, **common)
    selected = refit("lightgbm", params, 30, features, selected_ids=location, **common)
    # Every post of every split is still predicted, once
    for result in (whole, selected):
        counts = result["predictions"].groupby("split")["pid"].nunique().to_dict()
        assert counts == whole["predictions"].groupby("split")["pid"].nunique().to_dict()
        assert not result["predictions"].duplicated(["split", "pid"]).any()
    # ... by a model fitted on a quarter of train: its train predictions differ from the whole fit's
    a = whole["predictions"].query("split == 'train'")["pred"].to_numpy()
    b = selected["predictions"].query("split == 'train'")["pred"].to_numpy()
    assert not np.allclose(a, b)


def test_a_pipeline_takes_the_kept_ids_from_its_train_stage(tmp_path):
    from smpp_ray import storage
    from smpp_ray.config import Config, TuneConfig
    from smpp_ray.stage_table import kept_ids_input

    config = Config(tune=TuneConfig(fit_on_selected=True))
    with pytest.raises(ValueError, match="recorded no dataset-level sample selection"):
        kept_ids_input(config, str(tmp_path / "train"))
    storage.write_json(str(tmp_path / "train" / "summary.json"),
                       {"stage": "train", "status": "complete",
                        "metrics": {"selection": {"kept_ids": "s3://b/run/selection/kept_ids.parquet"}}})
    assert kept_ids_input(config, str(tmp_path / "train")) == \
        "s3://b/run/selection/kept_ids.parquet"
    # A summary of this version names it as an artifact, relative to the train folder
    storage.write_json(str(tmp_path / "train" / "summary.json"),
                       {"stage": "train", "status": "complete",
                        "artifacts": {"kept_ids": "ray_results/smpp-train/selection/kept_ids.parquet"}})
    assert kept_ids_input(config, str(tmp_path / "train")) == \
        str(tmp_path / "train" / "ray_results" / "smpp-train" / "selection" / "kept_ids.parquet")
    off = Config()
    assert kept_ids_input(off, str(tmp_path / "train")) == ""
    # The value reaches the tune stage as its input; the config is never written back
    assert config.tune.selected_ids == ""
