"""Scoring new posts with the session's smoke pipeline: `smpp predict` through the CLI, from the
feature state alone, rejects kept, the SMP Challenge submission (fallback regressor and prior for
the posts the network cannot score), the registered scorer model, and every subcommand via cli.main.

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
    """A copy of the pipeline without its posts (raw/ and data/ gone) and without the run states
    (ray_results/) but the best checkpoint: what predict may need. The summary names the checkpoint
    relative to the train folder, so the copy scores with its own copy of the network."""
    _, out, _ = smoke_pipeline
    copy = tmp_path_factory.mktemp("scorer-only") / "pipeline"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("raw", "data", "ray_results", "mlruns.db", "mlartifacts"))
    best = json.loads((out / "train" / "summary.json").read_text())["artifacts"]["best_checkpoint"]
    shutil.copytree(out / "train" / best, copy / "train" / best)
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
    assert main(["predict", "--pipeline", str(out), "--posts", str(new_posts), "--out", str(tmp_path / "s.parquet"),
                 "--format", "smp-challenge", "--set", "tracking.enabled=false"]) == EXIT_BAD_INPUT
    assert "must end in .csv" in caplog.text and not (tmp_path / "s.parquet").exists()
    # the pipeline's own raw folder holds train_ files: refused before prepare reads a post
    assert main(["predict", "--pipeline", str(out), "--posts", str(out / "raw"), "--out", str(tmp_path / "s.csv"),
                 "--format", "smp-challenge", "--set", "tracking.enabled=false"]) == EXIT_BAD_INPUT
    assert "also holds train_ files (train_" in caplog.text and not (tmp_path / "s.csv").exists()


def test_predict_never_deletes_what_it_did_not_write(smoke_pipeline, new_posts, tmp_path, caplog):
    """A folder --out is replaced whole: one holding a user's files, the pipeline folder or the
    posts folder is refused (exit 2) before any work, and every file in it survives byte for byte."""
    _, out, _ = smoke_pipeline
    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    watched = {p: p.read_bytes() for p in [mine / "notes.txt", out / "tune" / "blend.json",
                                           *sorted(new_posts.glob("test_*"))]}
    common = ["--pipeline", str(out), "--posts", str(new_posts), "--set", "tracking.enabled=false"]
    for target, words in ((mine, "files predict did not write (notes.txt)"), (out, "is the scorer"),
                          (out / "scores", "is the scorer"), (new_posts, "is --posts")):
        caplog.clear()
        assert main(["predict", *common, "--out", str(target)]) == EXIT_BAD_INPUT
        assert words in caplog.text, caplog.text[-500:]
    assert {p: p.read_bytes() for p in watched} == watched
    assert not (out / "scores").exists()


@pytest.mark.parametrize("part", ["tune/models/catboost/model.cb", "features/feature_state/arrays.npz",
                                  "tune/blend.json"])
def test_a_damaged_scorer_part_is_refused_naming_the_file(scorer_only, new_posts, tmp_path, part, caplog):
    """Every part a scorer reads carries a digest written with it: a model file with flipped
    bytes, a damaged feature-state array, or a blend weight edited by hand (still valid JSON) is
    exit 2 naming the file, before any post is scored; the intact copy scores."""
    copy = tmp_path / "pipeline"
    shutil.copytree(scorer_only, copy)
    damaged = copy / part
    if damaged.suffix == ".json":
        blend = json.loads(damaged.read_text())
        family = next(iter(blend["weights"]))
        blend["weights"][family] = round(1.0 - blend["weights"][family], 6)
        damaged.write_text(json.dumps(blend))
    else:
        data = bytearray(damaged.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
        damaged.write_bytes(bytes(data))
    scores = tmp_path / "scores.csv"
    assert main(["predict", "--pipeline", str(copy), "--posts", str(new_posts), "--out", str(scores),
                 "--config", SMOKE, "--set", "tracking.enabled=false"]) == EXIT_BAD_INPUT
    assert f"{damaged} does not match the digest smpp_digests.json records" in caplog.text, caplog.text[-800:]
    assert not scores.exists()


def test_a_folder_output_is_replaced_only_once_complete(ray_session, tmp_path):
    """Scores written as Parquet parts go to a fresh folder first: a run that fails while
    scoring leaves the previous scores whole (byte for byte), and a finished one leaves only its
    own parts (none of the previous run's survives, even one the new run does not rewrite)."""
    import pyarrow as pa

    from smpp_ray.predict import _write_scores

    out = tmp_path / "scores"
    out.mkdir()
    previous = {name: f"previous {name}".encode() for name in ("part-a.parquet", "part-zz.parquet")}
    for name, content in previous.items():
        (out / name).write_bytes(content)
    schema = pa.schema([("pid", pa.string()), ("predicted_popularity", pa.float64())])

    def scores(batch: pd.DataFrame, fail_from: int) -> pd.DataFrame:
        if int(batch["id"].max()) >= fail_from:
            raise RuntimeError("scoring failed midway")
        return pd.DataFrame({"pid": batch["id"].astype(str), "predicted_popularity": batch["id"] / 10.0})

    def dataset(fail_from: int):
        return ray_session.data.range(400, override_num_blocks=8).map_batches(
            scores, batch_format="pandas", batch_size=50, fn_kwargs={"fail_from": fail_from})

    with pytest.raises(Exception, match="scoring failed midway"):
        _write_scores(dataset(fail_from=300), str(out), schema)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert _write_scores(dataset(fail_from=10**6), str(out), schema) == 400
    written = pd.read_parquet(out)
    assert sorted(written["pid"].astype(int)) == list(range(400))
    assert not set(previous) & {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name not in ("scores",)]  # no staging folder left


def _break_image(posts: Path, row: int) -> None:
    """Truncate the image of a raw row: a JPEG header and nothing to decode."""
    image = posts / (posts / "test_img_filepath.txt").read_text().splitlines()[row]
    image.write_bytes(image.read_bytes()[:60])


def _set_field(posts: Path, kind: str, row: int, **values: object) -> None:
    """Change (or with None, remove) fields of one row of a raw test_ JSON file."""
    path = posts / f"test_{kind}.json"
    records = json.loads(path.read_text())
    records[row].update(values)
    records[row] = {k: v for k, v in records[row].items() if v is not None}
    path.write_text(json.dumps(records))


def _fallback_by_hand(pipeline: Path, pid: str) -> float:
    """The fallback model's score of a pipeline test post, computed here from the saved pieces:
    the prepared post, the feature state, the fallback feature spec and model (no scoring module)."""
    import pyarrow.parquet as pq

    from smpp_ray.features.state import FeatureState
    from smpp_ray.gbdt.data import FeatureSpec, encode
    from smpp_ray.gbdt.registry import load_flavour

    posts = pq.read_table(pipeline / "data" / "posts" / "split=test").to_pandas()
    meta = posts[posts["pid"] == pid].drop(columns=["image"]).reset_index(drop=True)
    features, _ = FeatureState.load(str(pipeline / "features")).new_post_features(meta)
    facts = json.loads((pipeline / "tune" / "fallback.json").read_text())
    spec = FeatureSpec.load(str(pipeline / "tune" / "fallback_feature_spec.json"))
    model = load_flavour(facts["family"], str(pipeline / "tune" / "models" / "fallback"))
    return float(model.predict(encode(features, spec))[0])


CORRUPT_ROW, BAD_ROW = 2, 5


@pytest.fixture(scope="module")
def challenge_posts(new_posts, tmp_path_factory) -> Path:
    """The held-back posts as a challenge test folder: one truncated image, one bad Postdate."""
    posts = tmp_path_factory.mktemp("challenge") / "posts"
    shutil.copytree(new_posts, posts)
    _break_image(posts, CORRUPT_ROW)
    _set_field(posts, "temporalspatial_information", BAD_ROW, Postdate="0000-00-00 00:00:00")
    return posts


def test_smp_challenge_submission_scores_every_test_row(smoke_pipeline, challenge_posts, evaluated, tmp_path,
                                                        capsys):
    """Exact header, post<Pid> in test_text.json order, one finite score per row: the network's for
    good posts (= evaluation's blend), the fallback model's for the truncated image (= the tune
    stage's fallback prediction = the model applied by hand), the label prior for the bad Postdate;
    the side file names both with field and reason."""
    _, out, _ = smoke_pipeline
    submission = tmp_path / "submission.csv"
    code = main(["predict", "--pipeline", str(out), "--posts", str(challenge_posts), "--out", str(submission),
                 "--format", "smp-challenge", "--config", SMOKE, "--set", "tracking.enabled=false"])
    assert code == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    pids = [str(r["Pid"]) for r in json.loads((challenge_posts / "test_text.json").read_text())]
    assert summary["input_rows"] == len(pids) == summary["scored"] + summary["fallback_scored"] \
        + summary["prior_scored"]
    assert (summary["scored"], summary["fallback_scored"], summary["prior_scored"]) == (len(pids) - 2, 1, 1)
    assert submission.read_text().splitlines()[0] == "post_id,popularity_score"
    table = pd.read_csv(submission, dtype={"post_id": str})
    assert list(table.columns) == ["post_id", "popularity_score"]
    assert list(table["post_id"]) == [f"post{pid}" for pid in pids]
    assert np.isfinite(table["popularity_score"]).all()
    scores = dict(zip(pids, table["popularity_score"], strict=True))

    good = [pid for i, pid in enumerate(pids) if i not in (CORRUPT_ROW, BAD_ROW)]
    np.testing.assert_allclose([scores[p] for p in good], evaluated.loc[good, "pred_blend"], rtol=0, atol=1e-6)
    corrupt, bad = pids[CORRUPT_ROW], pids[BAD_ROW]
    tuned = pd.read_parquet(out / "tune" / "fallback_predictions.parquet").astype({"pid": str}).set_index("pid")
    assert scores[corrupt] == pytest.approx(tuned.loc[corrupt, "pred"], abs=1e-6)
    assert scores[corrupt] == pytest.approx(_fallback_by_hand(out, corrupt), abs=1e-9)
    prior = json.loads((out / "tune" / "fallback.json").read_text())["prior"]
    train = pd.read_parquet(out / "tune" / "predictions.parquet").query("split == 'train'")
    assert scores[bad] == prior == pytest.approx(train["label"].mean(), abs=1e-12)  # smoke: refit_on train

    side = pd.read_csv(tmp_path / "submission.fallback.csv", dtype={"pid": str})
    assert list(side.columns) == ["pid", "row_index", "scored_by", "field", "reason"]
    assert side[["pid", "row_index", "scored_by", "field"]].values.tolist() == [
        [corrupt, CORRUPT_ROW, "fallback", "image"], [bad, BAD_ROW, "prior", "Postdate"]]
    assert "decoded" in side["reason"][0] and "0000-00-00" in side["reason"][1]
    assert summary["fallback_file"] == str(tmp_path / "submission.fallback.csv")
    assert not (tmp_path / "submission.work").exists()


def test_smp_challenge_refuses_an_incomplete_submission(smoke_pipeline, scorer_only, new_posts, tmp_path, caplog):
    """A row without a readable Pid cannot be named: exit 2 naming the row, the side file says why,
    no submission. A scorer without a fallback (an older tune stage) cannot score a corrupt image:
    exit 2 naming what is missing."""
    _, out, _ = smoke_pipeline
    posts = tmp_path / "posts"
    shutil.copytree(new_posts, posts)
    _set_field(posts, "text", 0, Pid=None)
    submission = tmp_path / "submission.csv"
    common = ["--posts", str(posts), "--out", str(submission), "--format", "smp-challenge", "--config", SMOKE,
              "--set", "tracking.enabled=false"]
    assert main(["predict", "--pipeline", str(out), *common]) == EXIT_BAD_INPUT
    assert "no readable Pid" in caplog.text and "row 0 (Pid:" in caplog.text
    assert not submission.exists()
    side = pd.read_csv(tmp_path / "submission.fallback.csv")
    assert side[["row_index", "scored_by", "field"]].values.tolist() == [[0, "none", "Pid"]]
    assert side["pid"].isna().all()

    old = tmp_path / "old-scorer"
    shutil.copytree(scorer_only, old)
    # An older tune stage wrote neither the fallback nor the digest manifest
    for name in ("fallback.json", "fallback_feature_spec.json", "fallback_predictions.parquet", "smpp_digests.json"):
        (old / "tune" / name).unlink()
    shutil.rmtree(old / "tune" / "models" / "fallback")
    _set_field(posts, "text", 0, Pid=json.loads((new_posts / "test_text.json").read_text())[0]["Pid"])
    _break_image(posts, 1)
    caplog.clear()
    assert main(["predict", "--pipeline", str(old), *common]) == EXIT_BAD_INPUT
    assert "no fallback regressor or label prior" in caplog.text and "row 1 (image:" in caplog.text
    assert not submission.exists()


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
    frame.at[4, "image"] = frame.at[4, "image"][:60]  # a truncated image: the bundled fallback scores it
    scored = model.predict(frame)
    assert len(scored) == len(frame) and list(scored["pid"]) == list(frame["Pid"])
    assert "Postdate" in scored.loc[2, ERROR_COLUMN] and np.isnan(scored.loc[2, "predicted_popularity"])
    assert scored.loc[4, "scored_by"] == "fallback" and scored.loc[4, "reason"].startswith("image: ")
    fallback = pd.read_parquet(out / "tune" / "fallback_predictions.parquet").astype({"pid": str}).set_index("pid")
    assert scored.loc[4, "predicted_popularity"] == pytest.approx(fallback.loc[frame.at[4, "Pid"], "pred"], abs=1e-6)
    good = scored.drop(index=[2, 4]).set_index("pid")
    np.testing.assert_allclose(good["predicted_popularity"], evaluated.loc[good.index, "pred_blend"], atol=1e-6)
    assert good[ERROR_COLUMN].isna().all() and (good["scored_by"] == "network").all()
    assert scored[ERROR_COLUMN].notna().sum() == 1

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
    assert main(["pipeline", "--out", str(out), "--raw", str(out / "raw"), *common]) == EXIT_OK
    assert "blend" in capsys.readouterr().out
