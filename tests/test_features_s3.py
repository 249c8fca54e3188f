"""extract and tune with every location in a real S3 server (moto on 127.0.0.1).

A prepared dataset is uploaded to a bucket; tabular features are extracted from it into the
bucket (the same rows as a local extraction of the same dataset), and a small search reads
those features from S3 and writes its experiment, models, blend and metrics there. Nothing a
Tune trial or a refit task reads is on the driver's disk.

Ray workers see the S3 endpoint and credentials only through the ``AWS_*`` variables as they
were when Ray started, so the session's ``ray_session`` starts after the ``s3_endpoint`` server
(tests/conftest.py) and ``ray_with_s3`` checks from a worker that they arrived.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_features_tabular import make_posts, write_dataset

from smpp_ray import storage
from smpp_ray.config import ExtractConfig, TuneConfig
from smpp_ray.data.schema import SPLITS
from smpp_ray.features import FeatureSet, extract_features, select_columns
from smpp_ray.features.state import FeatureState
from smpp_ray.gbdt import SearchInterrupted, tune_models
from smpp_ray.gbdt.data import FeatureSpec, encode, load_splits, read_split
from smpp_ray.gbdt.registry import load_flavour, registered_source
from smpp_ray.tracking import TrackingContext, create_run

pytestmark = pytest.mark.slow

POSTS = 600
EXTRACT = ExtractConfig(user_description_components=2)
TUNE = TuneConfig(num_samples=2, max_rounds=12, grace_rounds=12, report_every=4, max_concurrent_trials=1,
                  cpus_per_trial=1.0, registered_model_prefix="s3test")


@pytest.fixture(scope="module")
def bucket(module_bucket) -> str:
    return module_bucket


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> Path:
    return write_dataset(make_posts(POSTS, seed=5, users=12), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def s3_features(ray_with_s3, bucket, local_dataset) -> tuple[str, dict]:
    data = storage.upload_dir(str(local_dataset), storage.join(bucket, "data"))
    features = storage.join(bucket, "features")
    return features, extract_features(data, None, features, extract_config=EXTRACT)


@pytest.fixture(scope="module")
def tuned(s3_features, bucket, tmp_path_factory):
    """The search on S3 features into S3, tracked in a local MLflow store."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    ctx = TrackingContext(uri, "s3-test", create_run(uri, "s3-test", "tune-stage"))
    out = storage.join(bucket, "tune")
    return tune_models(s3_features[0], out, tune_config=TUNE, tracking=ctx), ctx, out


def _frame(features: str, split: str) -> pd.DataFrame:
    return read_split(features, split).set_index("pid").sort_index()


def test_tabular_extraction_into_s3_equals_a_local_one(s3_features, local_dataset, tmp_path):
    features, result = s3_features
    local = extract_features(str(local_dataset), None, str(tmp_path), extract_config=EXTRACT)
    assert result["rows"] == local["rows"] and sum(result["rows"].values()) == POSTS
    assert result["features_dir"] == features and features.startswith("s3://")
    assert FeatureSet(features).manifest() == FeatureSet(str(tmp_path)).manifest()
    for split in SPLITS:
        pd.testing.assert_frame_equal(_frame(features, split), _frame(str(tmp_path), split))
    names = {storage.name(f) for f in storage.list_files(features, recursive=False)}
    assert "feature_manifest.json" in names
    state = FeatureState.load(features)  # read back from the bucket
    assert state.checkpoint is None and state.tabular.corpus_start == FeatureState.load(str(tmp_path)).tabular.corpus_start


def test_tune_on_s3_features_writes_every_output_to_s3(tuned, bucket):
    result, _, out = tuned
    assert all(str(p).startswith(f"{out}") for p in result["paths"].values()), result["paths"]
    files = {f[len(out) + 1:] for f in storage.list_files(out)}
    for family in ("lightgbm", "catboost"):
        assert {f"models/{family}/MLmodel", f"search_{family}.json"} <= files
        assert result["search"][family]["experiment_path"] == storage.join(out, "ray_results", family)
        assert any(f.startswith(f"ray_results/{family}/experiment_state") for f in files), sorted(files)
        assert result["search"][family]["trials"] == TUNE.num_samples
    assert {"metrics.json", "blend.json", "feature_spec.json", "predictions.parquet",
            "plots/pred_vs_true.png", "plots/feature_importance.png"} <= files
    metrics = json.loads(storage.read_text(result["paths"]["metrics"]))
    assert metrics["blend"]["weights"] == result["blend_weights"]
    assert json.loads(storage.read_text(result["paths"]["blend"]))["weights"] == result["blend_weights"]


def test_models_load_from_s3_and_predict_what_the_stage_predicted(tuned, s3_features):
    result, ctx, out = tuned
    predictions = pq.read_table(io.BytesIO(storage.read_bytes(result["paths"]["predictions"]))).to_pandas()
    test_rows = predictions[predictions["split"] == "test"]
    spec = FeatureSpec.load(result["paths"]["feature_spec"])
    frame = read_split(s3_features[0], "test")
    assert frame["pid"].tolist() == test_rows["pid"].tolist()
    X = encode(frame, spec)
    _, data = load_splits(s3_features[0])
    pd.testing.assert_frame_equal(X.reset_index(drop=True), data["test"].X.reset_index(drop=True))
    for family in ("lightgbm", "catboost"):
        expected = test_rows[f"pred_{family}"].to_numpy()
        model = load_flavour(family, storage.join(out, "models", family))
        assert np.array_equal(np.asarray(model.predict(X), dtype=np.float64), expected)
        registered = load_flavour(family, registered_source(ctx.tracking_uri, f"s3test-{family}"))
        assert np.array_equal(np.asarray(registered.predict(X), dtype=np.float64), expected)
    assert set(select_columns(FeatureSet(s3_features[0]).manifest())) == set(spec.features)


def test_interrupted_search_on_s3_resumes_from_the_bucket(s3_features, bucket):
    out = storage.join(bucket, "resumed")
    config = TuneConfig(models=("lightgbm",), num_samples=2, max_rounds=8, grace_rounds=8, report_every=4,
                        max_concurrent_trials=1, interrupt_after_trials=1)
    with pytest.raises(SearchInterrupted, match="after 1 of 2"):
        tune_models(s3_features[0], out, tune_config=config)
    experiment = storage.join(out, "ray_results", "lightgbm")
    assert any(storage.name(f).startswith("experiment_state") for f in storage.list_files(experiment, recursive=False))
    result = tune_models(s3_features[0], out, tune_config=TuneConfig(**{**config.__dict__, "interrupt_after_trials": 0}))
    search = result["search"]["lightgbm"]
    assert search["restored"] and search["trials"] == 2
    trials = storage.read_json(storage.join(out, "search_lightgbm.json"))["trials"]
    assert len({t["trial_id"] for t in trials}) == 2 and all(t["rounds_run"] == 8 for t in trials)
