"""The whole pipeline in-process on the smoke config: real Ray, real MLflow store read back.

The session's smoke pipeline (conftest ``smoke_pipeline``) backs every test here: stage
summaries and skipping, the MLflow run tree, the results table and report. Scoring new posts
with it is tested in test_predict.py and test_serve.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from smpp_ray.pipeline import PIPELINE_STAGES, STAGE_FOLDERS, run_pipeline
from smpp_ray.tracking import PARENT_TAG, STAGE_TAG, client

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(smoke_pipeline):
    return smoke_pipeline


def _runs(tracking_uri: str, experiment: str):
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=1000)


#: The session pipeline is given its corpus (--raw), as a user's is: the synth stage does not run.
RUN_STAGES = [s for s in PIPELINE_STAGES if s != "synth"]


def test_every_stage_writes_a_complete_summary(pipeline_run):
    _, out, _ = pipeline_run
    for stage in RUN_STAGES:
        summary = json.loads((out / STAGE_FOLDERS[stage] / "summary.json").read_text())
        assert summary["stage"] == stage and summary["status"] == "complete"
        assert summary["mlflow_run_id"] and summary["fingerprint"]
    prepare = json.loads((out / "data" / "summary.json").read_text())["metrics"]
    assert prepare["input_rows"] == prepare["written"] + prepare["rejected"]
    train = json.loads((out / "train" / "summary.json").read_text())
    best = train["artifacts"]["best_checkpoint"]   # relative: the pipeline folder can move
    assert best.startswith("ray_results/") and (out / "train" / best / "trainable.pt").is_file()


def test_a_moved_train_folder_names_its_own_checkpoint(pipeline_run, tmp_path):
    """Artifact references are relative: a copy scores with the copy's network, not the original's."""
    import shutil

    from smpp_ray.model.checkpoint import resolve_checkpoint

    _, out, _ = pipeline_run
    moved = tmp_path / "elsewhere" / "train"
    shutil.copytree(out / "train", moved, ignore=shutil.ignore_patterns("image_features"))
    found = resolve_checkpoint(str(moved))
    assert found.startswith(str(moved) + "/ray_results/") and Path(found, "trainable.pt").is_file()


def test_a_moved_feature_state_names_its_own_checkpoint_and_dataset(pipeline_run, tmp_path):
    """The feature state (what the tune stage registers the scorer from) records the pipeline's
    checkpoint and dataset relative to the features folder: a copied pipeline's state names the
    copy's, and a reference outside the pipeline stays absolute."""
    import shutil

    from smpp_ray.features.manifest import STATE_FOLDER
    from smpp_ray.features.state import FeatureState

    _, out, _ = pipeline_run
    recorded = json.loads((out / "features" / STATE_FOLDER / "state.json").read_text())
    assert recorded["checkpoint"].startswith("../train/ray_results/") and recorded["dataset"] == "../data"
    copy = tmp_path / "copy"
    (copy / "train").mkdir(parents=True)
    shutil.copytree(out / "features" / STATE_FOLDER, copy / "features" / STATE_FOLDER)
    state = FeatureState.load(str(copy / "features"))
    assert state.checkpoint == str(copy / "train" / recorded["checkpoint"].removeprefix("../train/"))
    assert state.dataset == str(copy / "data")
    original = FeatureState.load(str(out / "features"))
    assert Path(original.checkpoint, "trainable.pt").is_file() and original.dataset == str(out / "data")
    original.checkpoint = str(tmp_path / "outside" / "ckpt")
    original.save(str(copy / "features"))
    assert FeatureState.load(str(copy / "features")).checkpoint == str(tmp_path / "outside" / "ckpt")


def test_the_retrieval_bank_is_training_posts_and_evaluation_rows_retrieve_only_earlier_ones(pipeline_run):
    """The saved bank holds the prepared training posts only (no val/test pid), the regressors read
    the neighbour features, a row with exactly k earlier training posts has, as its k-neighbour
    label mean, the mean over those posts (smoke.yaml: neighbour_min_pool 1), and a row with fewer
    has none."""

    from smpp_ray.features.neighbours import POST_GROUP, USER_GROUP
    from smpp_ray.features.state import FeatureState
    from smpp_ray.gbdt.data import FeatureSpec

    config, out, _ = pipeline_run
    bank = FeatureState.load(str(out / "features")).neighbours
    assert bank is not None and bank.settings.ks == tuple(config.extract.neighbour_ks)
    posts = {split: pd.read_parquet(out / "data" / "posts" / f"split={split}", columns=["pid"])
             for split in ("train", "val", "test")}
    assert set(bank.pid) == set(posts["train"]["pid"])
    assert not set(bank.pid) & (set(posts["val"]["pid"]) | set(posts["test"]["pid"]))
    manifest = json.loads((out / "features" / "feature_manifest.json").read_text())
    assert {POST_GROUP, USER_GROUP} <= {c["group"] for c in manifest["columns"]}
    spec = FeatureSpec.load(str(out / "tune" / "feature_spec.json"))
    assert any(name.startswith("nb_") for name in spec.features)
    assert bank.settings.min_pool == 1
    checked, undefined = 0, 0
    for split in ("train", "val", "test"):
        rows = pd.read_parquet(out / "features" / f"split={split}")
        for _, row in rows.iterrows():
            earlier = bank.t < row["postdate"]
            for k in bank.settings.ks:
                for embedding in bank.settings.embeddings:
                    value = row[f"nb_{embedding}_k{k}_mean"]
                    if earlier.sum() == k:
                        assert value == pytest.approx(bank.label[earlier].mean(), abs=1e-9)
                        checked += 1
                    elif earlier.sum() < k:
                        assert pd.isna(value)
                        undefined += 1
    assert checked >= 3 and undefined >= 3


def test_mlflow_holds_parent_run_with_one_child_per_stage(pipeline_run):
    config, _, result = pipeline_run
    runs = _runs(result["tracking_uri"], config.tracking.experiment)
    parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
    assert parent.data.tags[STAGE_TAG] == "pipeline" and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(RUN_STAGES)
    assert all(r.info.status == "FINISHED" for r in children)
    train = next(r for r in children if r.data.tags[STAGE_TAG] == "train")
    history = client(result["tracking_uri"]).get_metric_history(train.info.run_id, "val_top1")
    assert len(history) >= config.train.epochs
    for name in ("test_lightgbm_src", "test_catboost_src", "test_blend_src", "test_metadata-only_src", "test_oracle_src"):
        assert name in parent.data.metrics


def test_each_quantity_has_one_metric_name_in_every_run(pipeline_run):
    """test_<model>_<metric> in the tune, evaluate and pipeline runs alike, with equal values;
    no dotted copies of them and no per-class count columns."""
    config, _, result = pipeline_run
    runs = _runs(result["tracking_uri"], config.tracking.experiment)
    by_stage = {r.data.tags[STAGE_TAG]: r.data.metrics for r in runs if STAGE_TAG in r.data.tags}
    every = {key for r in runs for key in r.data.metrics}  # trial runs too
    assert not [k for k in every if k.startswith(("blend.", "lightgbm.", "catboost.", "final.", "counts.",
                                                  "blend_weights.", "fallback."))], sorted(every)
    assert not [k for k in every if k.startswith("test_src_") or k.startswith("test_mae_")], sorted(every)
    for name in ("test_blend_src", "test_lightgbm_mae"):
        values = {stage: by_stage[stage][name] for stage in ("tune", "evaluate", "pipeline")}
        assert len(set(values.values())) == 1, values
    assert {"blend_weight_lightgbm", "blend_weight_catboost"} <= by_stage["tune"].keys()


def test_summary_metric_names_maps_each_section_once():
    from smpp_ray.stages import summary_metric_names

    named = summary_metric_names({"blend": {"test_mae": 1.0, "val_src": 0.5}, "blend_weights": {"catboost": 0.4},
                                  "final": {"test_oracle_src": 0.8}, "counts": {"category": {"Food": 3}},
                                  "rows": {"train": 10}, "lightgbm": {"best_params": {"num_leaves": 15}}})
    assert named == {"test_blend_mae": 1.0, "val_blend_src": 0.5, "blend_weight_catboost": 0.4,
                     "test_oracle_src": 0.8, "rows.train": 10.0, "lightgbm.best_params.num_leaves": 15.0}


def test_mlflow_experiment_and_runs_carry_provenance_and_dataset_inputs(pipeline_run):
    """The UI opens on runs (classic experiment kind); each run says who started it, how and from
    which commit; the stages that read a dataset list it as an input, digest = its contents."""
    import subprocess

    from smpp_ray import storage

    config, out, result = pipeline_run
    c = client(result["tracking_uri"])
    experiment = c.get_experiment_by_name(config.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = _runs(result["tracking_uri"], config.tracking.experiment)
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL", tags
        assert tags.get("mlflow.source.git.commit", "") == commit
    by_stage = {r.data.tags[STAGE_TAG]: r for r in runs if r.data.tags.get(PARENT_TAG) == result["mlflow_run_id"]}
    expected = {"prepare": {"smpd-raw"}, "prototypes": {"smpd-data"}, "train": {"smpd-data"},
                "extract": {"smpd-data"}, "tune": {"smpd-features"}}
    for stage, names in expected.items():
        inputs = by_stage[stage].inputs.dataset_inputs
        assert {i.dataset.name for i in inputs} == names, stage
        for entry in inputs:
            assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == stage
            location = by_stage[stage].data.tags[f"input.{entry.dataset.name.removeprefix('smpd-')}"]
            assert entry.dataset.digest == storage.fingerprint(location)[:16]


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
    for section in ("Results on the test split", "Data", "Confusion of the subcategory proxy"):
        assert section in html


def test_rerun_skips_complete_stages(pipeline_run):
    config, out, result = pipeline_run
    before = {s: json.loads((out / STAGE_FOLDERS[s] / "summary.json").read_text())["mlflow_run_id"]
              for s in RUN_STAGES}
    again = run_pipeline(config, out, raw_dir=str(out / "raw"))
    after = {s: json.loads((out / STAGE_FOLDERS[s] / "summary.json").read_text())["mlflow_run_id"]
             for s in before}
    assert after == before
    runs = _runs(result["tracking_uri"], config.tracking.experiment)
    assert not [r for r in runs if r.data.tags.get(PARENT_TAG) == again["mlflow_run_id"]]
    # A skipped evaluate still gives the table (read back from its summary)
    assert again["table"]["src"].tolist() == pytest.approx(result["table"]["src"].tolist(), nan_ok=True)


def test_results_end_with_the_mlflow_runs_page_of_the_experiment(pipeline_run, capsys):
    """MLflow 3 opens an experiment on its GenAI overview; the printed page is the runs table."""
    from smpp_ray.evaluate import load_results, print_results
    from smpp_ray.stage_table import pipeline_layout
    from smpp_ray.tracking import client

    config, out, result = pipeline_run
    experiment = client(result["tracking_uri"]).get_experiment_by_name(config.tracking.experiment).experiment_id
    shown = {**load_results(pipeline_layout(str(out))["report"]), "tracking_uri": result["tracking_uri"],
             "mlflow_run_id": result["mlflow_run_id"]}
    print_results(shown)
    text = capsys.readouterr().out
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:" in text
    assert f"then open http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning" in text


def test_a_damaged_checkpoint_is_refused_naming_the_file(pipeline_run, tmp_path):
    """4 KB flipped in the weights: loading fails on the digest meta.json records, instead of
    extracting features with silently changed weights."""
    import shutil

    from smpp_ray.model.checkpoint import (
        TRAINABLE_FILE,
        load_model_from_checkpoint,
        resolve_checkpoint,
    )

    _, out, _ = pipeline_run
    copy = tmp_path / "checkpoint"
    shutil.copytree(resolve_checkpoint(str(out / "train")), copy)
    load_model_from_checkpoint(str(copy))   # intact: loads
    weights = copy / TRAINABLE_FILE
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0x5A for b in data[middle:middle + 4096])
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{weights} does not match the digest"):
        load_model_from_checkpoint(str(copy))
