"""Scoring new posts with the session's smoke pipeline: `smpp predict` through the CLI, from the
feature state alone, rejects kept, the registered scorer model, and every subcommand via cli.main.

Held-back posts are the pipeline's own test posts written back out as unlabelled SMPD files, so
their scores must equal what the evaluation path gave them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smpp_ray.cli import EXIT_BAD_INPUT, EXIT_OK, main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "configs" / "smoke.yaml")
KINDS = ["text", "category", "temporalspatial_information", "additional_information", "user_data"]


def held_back_posts(raw: Path, pids: set[str], out: Path) -> list[str]:
    """The given posts of a raw SMPD folder as unlabelled ``test_`` files; returns their Pids in row order."""
    out.mkdir(parents=True)
    paths = (raw / "train_img_filepath.txt").read_text().splitlines()
    rows = None
    for kind in KINDS:
        records = json.loads((raw / f"train_{kind}.json").read_text())
        if rows is None:
            rows = [i for i, r in enumerate(records) if str(r["Pid"]) in pids]
        (out / f"test_{kind}.json").write_text(json.dumps([records[i] for i in rows]))
    (out / "test_img_filepath.txt").write_text("\n".join(paths[i] for i in rows) + "\n")
    for i in rows:
        (out / paths[i]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(raw / paths[i], out / paths[i])
    records = json.loads((raw / "train_text.json").read_text())
    return [str(records[i]["Pid"]) for i in rows]


@pytest.fixture(scope="module")
def evaluated(smoke_pipeline):
    _, out, _ = smoke_pipeline
    predictions = pd.read_parquet(out / "tune" / "predictions.parquet")
    return predictions[predictions["split"] == "test"].set_index("pid")


@pytest.fixture(scope="module")
def scorer_only(smoke_pipeline, tmp_path_factory):
    """A copy of the pipeline without its posts (raw/ and data/ gone): what predict may need."""
    _, out, _ = smoke_pipeline
    copy = tmp_path_factory.mktemp("scorer-only") / "pipeline"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("raw", "data", "ray_results", "mlruns.db", "mlartifacts"))
    return copy


@pytest.fixture(scope="module")
def new_posts(smoke_pipeline, evaluated, tmp_path_factory):
    _, out, _ = smoke_pipeline
    folder = tmp_path_factory.mktemp("new") / "posts"
    held_back_posts(out / "raw", set(evaluated.index), folder)
    return folder


def test_predict_through_the_cli_from_the_feature_state_alone(scorer_only, new_posts, evaluated, tmp_path, capsys):
    """No training or val post exists where predict runs, and the scores equal evaluation's."""
    scores_file = tmp_path / "scores.csv"
    code = main(["predict", "--pipeline", str(scorer_only), "--posts", str(new_posts), "--out", str(scores_file),
                 "--config", SMOKE, "--set", "tracking.enabled=false"])
    assert code == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == len(evaluated) and summary["rejected"] == 0 and summary["rejects"] is None
    scores = pd.read_csv(scores_file, dtype={"pid": str}).set_index("pid")
    assert set(scores.index) == set(evaluated.index)
    np.testing.assert_allclose(scores.loc[evaluated.index, "predicted_popularity"], evaluated["pred_blend"],
                               rtol=0, atol=1e-6)
    for family in ("lightgbm", "catboost"):
        np.testing.assert_allclose(scores.loc[evaluated.index, f"pred_{family}"], evaluated[f"pred_{family}"],
                                   rtol=0, atol=1e-6)
    taxonomy = json.loads((scorer_only / "features" / "feature_state" / "state.json").read_text())["taxonomy"]
    names = {s["name"]: s["category_id"] for s in taxonomy["subcategories"]}
    categories = {c["id"]: c["name"] for c in taxonomy["categories"]}
    assert set(scores["predicted_subcategory"]) <= set(names)
    assert set(scores["predicted_category"]) <= set(categories.values())


def test_bad_posts_are_rejects_and_counts_add_up(smoke_pipeline, new_posts, tmp_path):
    """Two broken rows (a corrupt Postdate, a missing image) are rejects with file, row and field;
    the rest is scored; a Parquet folder output holds one row per scored post."""
    _, out, _ = smoke_pipeline
    posts = tmp_path / "posts"
    shutil.copytree(new_posts, posts)
    spatial = json.loads((posts / "test_temporalspatial_information.json").read_text())
    spatial[1]["Postdate"] = "0000-00-00 00:00:00"
    (posts / "test_temporalspatial_information.json").write_text(json.dumps(spatial))
    image = (posts / "test_img_filepath.txt").read_text().splitlines()[3]
    (posts / image).unlink()
    code = main(["predict", "--pipeline", str(out), "--model", "lightgbm", "--posts", str(posts),
                 "--out", str(tmp_path / "scores"), "--config", SMOKE, "--set", "tracking.enabled=false"])
    assert code == EXIT_OK
    rejects = pd.read_csv(tmp_path / "scores.rejects.csv")
    assert sorted(rejects["row_index"]) == [1, 3]
    assert set(rejects["field"]) == {"Postdate", "image"}
    assert set(rejects["source_file"]) == {"test_temporalspatial_information.json", "test_img_filepath.txt"}
    scores = pd.read_parquet(tmp_path / "scores")
    assert len(scores) + len(rejects) == len(spatial)
    # --model lightgbm: the predicted popularity is LightGBM's own score
    np.testing.assert_array_equal(scores["predicted_popularity"], scores["pred_lightgbm"])


def test_predict_refuses_unclear_scorer_choices(smoke_pipeline, new_posts, tmp_path, caplog):
    _, out, _ = smoke_pipeline
    common = ["--posts", str(new_posts), "--out", str(tmp_path / "s.csv"), "--set", "tracking.enabled=false"]
    assert main(["predict", *common]) == EXIT_BAD_INPUT
    assert "exactly one of --pipeline" in caplog.text
    assert main(["predict", "--pipeline", str(out), "--model", "lightgbm", "--score", "catboost", *common]) \
        == EXIT_BAD_INPUT
    assert main(["predict", "--pipeline", str(tmp_path / "absent"), *common]) == EXIT_BAD_INPUT
    assert not (tmp_path / "s.csv").exists()


def test_the_registered_scorer_loads_and_predicts_without_the_pipeline(smoke_pipeline, evaluated, new_posts,
                                                                        tmp_path, capsys):
    """tune registered the whole scorer with the champion alias; mlflow.pyfunc loads it and
    scores a table of SMPD fields with image bytes, and `smpp predict --model models:/...` works."""
    import mlflow.pyfunc
    import pyarrow.parquet as pq

    from smpp_ray.scoring.pyfunc import ERROR_COLUMN, posts_to_smpd_frame
    from smpp_ray.tracking import client

    config, out, result = smoke_pipeline
    uri = result["tracking_uri"]
    registry = client(uri)
    version = registry.get_model_version_by_alias("smpp-scorer", "champion")
    tune_run = json.loads((out / "tune" / "summary.json").read_text())["mlflow_run_id"]
    assert version.run_id == tune_run
    assert registry.get_registered_model("smpp-scorer").description

    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/smpp-scorer@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.metadata.signature is not None and "image" in model.metadata.signature.inputs.input_names()
    test_posts = pq.read_table(out / "data" / "posts" / "split=test").to_pandas()
    frame = posts_to_smpd_frame(test_posts)
    frame.loc[2, "Postdate"] = "yesterday"  # one bad row: an error in its place, the others scored
    scored = model.predict(frame)
    assert len(scored) == len(frame) and list(scored["pid"]) == list(frame["Pid"])
    assert "Postdate" in scored.loc[2, ERROR_COLUMN] and np.isnan(scored.loc[2, "predicted_popularity"])
    good = scored.drop(index=2).set_index("pid")
    np.testing.assert_allclose(good["predicted_popularity"], evaluated.loc[good.index, "pred_blend"], atol=1e-6)
    assert good[ERROR_COLUMN].isna().all()

    code = main(["predict", "--model", "models:/smpp-scorer@champion", "--posts", str(new_posts),
                 "--out", str(tmp_path / "registry.csv"), "--config", SMOKE, "--set", f"tracking.tracking_uri={uri}"])
    assert code == EXIT_OK
    capsys.readouterr()
    scores = pd.read_csv(tmp_path / "registry.csv", dtype={"pid": str}).set_index("pid")
    np.testing.assert_allclose(scores.loc[evaluated.index, "predicted_popularity"], evaluated["pred_blend"], atol=1e-6)


def test_every_stage_subcommand_through_cli_main(smoke_pipeline, tmp_path, capsys):
    """synth and prepare run for real into new folders; the other stages, given the pipeline's own
    folders and config, find their output complete and return it unchanged (exit 0, summary printed)."""
    config, out, result = smoke_pipeline
    common = ["--config", SMOKE, "--set", "synth.test_posts=0", "--set", f"tracking.tracking_uri={result['tracking_uri']}"]
    assert main(["synth", "--out", str(tmp_path / "raw"), "--posts", "40", "--test-posts", "5", *common]) == EXIT_OK
    synth = json.loads(capsys.readouterr().out)
    assert synth["stage"] == "synth" and synth["metrics"]["posts"] == 40
    assert main(["prepare", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "data"), *common]) == EXIT_OK
    prepared = json.loads(capsys.readouterr().out)["metrics"]
    assert prepared["input_rows"] == 45 == prepared["written"] + prepared["rejected"]

    before = {s: json.loads((out / s / "summary.json").read_text()) for s in ("prototypes", "train", "features", "tune")}
    calls = {
        "prototypes": ["prototypes", "--data", str(out / "data"), "--out", str(out / "prototypes")],
        "train": ["train", "--data", str(out / "data"), "--prototypes", str(out / "prototypes"), "--out", str(out / "train")],
        "features": ["extract", "--data", str(out / "data"), "--checkpoint", str(out / "train"), "--out", str(out / "features")],
        "tune": ["tune", "--features", str(out / "features"), "--out", str(out / "tune")],
    }
    for folder, argv in calls.items():
        assert main([*argv, *common]) == EXIT_OK, argv
        printed = json.loads(capsys.readouterr().out)
        assert printed["out"] == str(out / folder)
        assert json.loads((out / folder / "summary.json").read_text()) == before[folder], f"{argv[0]} reran"
    assert main(["evaluate", "--pipeline", str(out), *common]) == EXIT_OK
    assert "blend" in capsys.readouterr().out
    assert main(["pipeline", "--out", str(out), *common]) == EXIT_OK
    assert "blend" in capsys.readouterr().out
