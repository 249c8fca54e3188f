"""The whole pipeline in-process on the smoke config: real Ray, real MLflow store read back.

One pipeline run (module fixture, a few minutes on 2 cores) backs every test here: stage
summaries and skipping, the MLflow run tree, the results table and report, and `smpp predict`
on held-back posts giving the evaluation path's scores.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smpp_ray.config import load_config
from smpp_ray.pipeline import PIPELINE_STAGES, STAGE_FOLDERS, run_pipeline
from smpp_ray.tracking import PARENT_TAG, STAGE_TAG, client

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    config = load_config(ROOT / "jobs" / "configs" / "smoke.yaml", ["synth.test_posts=0"])
    # A relative --out, as `make demo` passes: Ray workers and Tune trials run in other folders.
    previous = os.getcwd()
    os.chdir(out.parent)
    try:
        result = run_pipeline(config, out.name)
    finally:
        os.chdir(previous)
    return config, out, result


def _runs(tracking_uri: str, experiment: str):
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=1000)


def test_every_stage_writes_a_complete_summary(pipeline_run):
    _, out, _ = pipeline_run
    for stage in PIPELINE_STAGES:
        summary = json.loads((out / STAGE_FOLDERS[stage] / "summary.json").read_text())
        assert summary["stage"] == stage and summary["status"] == "complete"
        assert summary["mlflow_run_id"] and summary["fingerprint"]
    prepare = json.loads((out / "data" / "summary.json").read_text())["metrics"]
    assert prepare["input_rows"] == prepare["written"] + prepare["rejected"]
    train = json.loads((out / "train" / "summary.json").read_text())
    assert Path(train["artifacts"]["best_checkpoint"], "trainable.pt").is_file()


def test_mlflow_holds_parent_run_with_one_child_per_stage(pipeline_run):
    config, _, result = pipeline_run
    runs = _runs(result["tracking_uri"], config.tracking.experiment)
    parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
    assert parent.data.tags[STAGE_TAG] == "pipeline" and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(PIPELINE_STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    train = next(r for r in children if r.data.tags[STAGE_TAG] == "train")
    history = client(result["tracking_uri"]).get_metric_history(train.info.run_id, "val_top1")
    assert len(history) >= config.train.epochs
    for name in ("test_src_lightgbm", "test_src_catboost", "test_src_blend", "test_src_metadata-only"):
        assert name in parent.data.metrics


def test_results_table_and_report(pipeline_run):
    _, out, result = pipeline_run
    table = result["table"].set_index("model")
    assert {"lightgbm", "catboost", "blend", "metadata-only baseline"} <= set(table.index)
    oracle = table.loc["oracle (noise-free score)", "src"]
    assert 0.6 < oracle < 0.95
    # The tuned models learn something real, and none beats what the labels' noise allows.
    assert table.loc["blend", "src"] > 0.3
    assert (table["src"].drop("oracle (noise-free score)") < oracle + 0.05).all()
    # The table's SRC is the one recomputed from the tune stage's saved test predictions.
    predictions = pd.read_parquet(out / "tune" / "predictions.parquet")
    test = predictions[predictions["split"] == "test"]
    from scipy.stats import spearmanr

    assert table.loc["blend", "src"] == pytest.approx(spearmanr(test["label"], test["pred_blend"]).statistic)
    html = Path(result["report"]).read_text()
    assert html.count("data:image/png;base64,") >= 5
    for section in ("Results on the test split", "Data", "Confusion of the 77-way proxy"):
        assert section in html


def test_rerun_skips_complete_stages(pipeline_run):
    config, out, result = pipeline_run
    before = {s: json.loads((out / STAGE_FOLDERS[s] / "summary.json").read_text())["mlflow_run_id"]
              for s in PIPELINE_STAGES}
    again = run_pipeline(config, out)
    after = {s: json.loads((out / STAGE_FOLDERS[s] / "summary.json").read_text())["mlflow_run_id"]
             for s in before}
    assert after == before
    runs = _runs(result["tracking_uri"], config.tracking.experiment)
    assert not [r for r in runs if r.data.tags.get(PARENT_TAG) == again["mlflow_run_id"]]
    # A skipped evaluate still gives the table (read back from its summary)
    assert again["table"]["src"].tolist() == pytest.approx(result["table"]["src"].tolist(), nan_ok=True)


def _held_back_posts(raw: Path, pids: set[str], out: Path) -> None:
    """The given posts of a raw SMPD folder as unlabelled `test_` files (what a user would score)."""
    out.mkdir(parents=True)
    kinds = ["text", "category", "temporalspatial_information", "additional_information", "user_data"]
    rows = None
    paths = (raw / "train_img_filepath.txt").read_text().splitlines()
    for kind in kinds:
        records = json.loads((raw / f"train_{kind}.json").read_text())
        if rows is None:
            rows = [i for i, r in enumerate(records) if str(r["Pid"]) in pids]
        (out / f"test_{kind}.json").write_text(json.dumps([records[i] for i in rows]))
    (out / "test_img_filepath.txt").write_text("\n".join(paths[i] for i in rows) + "\n")
    for i in rows:
        (out / paths[i]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(raw / paths[i], out / paths[i])


def test_predict_on_held_back_posts_matches_the_evaluation_path(pipeline_run, tmp_path):
    from smpp_ray.predict import predict_posts

    config, out, _ = pipeline_run
    evaluated = pd.read_parquet(out / "tune" / "predictions.parquet")
    evaluated = evaluated[evaluated["split"] == "test"].set_index("pid")
    _held_back_posts(out / "raw", set(evaluated.index), tmp_path / "new_posts")
    scores_file = predict_posts(out, tmp_path / "new_posts", tmp_path / "scores.csv", config=config)
    scores = pd.read_csv(scores_file, dtype={"pid": str}).set_index("pid")
    assert set(scores.index) == set(evaluated.index)
    np.testing.assert_allclose(scores.loc[evaluated.index, "predicted_popularity"], evaluated["pred_blend"],
                               rtol=0, atol=1e-6)
    taxonomy = json.loads((out / "data" / "manifest.json").read_text())["taxonomy"]
    assert set(scores["predicted_subcategory"]) <= {s["name"] for s in taxonomy["subcategories"]}
