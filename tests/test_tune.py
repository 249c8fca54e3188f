"""Ray Tune search over LightGBM and CatBoost with MLflow tracking (real Ray, real MLflow store).

One module-scoped search (both families, 3 trials each, 40 rounds) on a synthetic features folder
with a known signal feeds most tests; the resume test runs its own interrupted search.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from smpp_ray import metrics
from smpp_ray.config import TuneConfig
from smpp_ray.gbdt import SearchInterrupted, tune_models
from smpp_ray.gbdt.data import FeatureSpec, group_folds, load_splits
from smpp_ray.gbdt.objective import dominates, pareto_front
from smpp_ray.gbdt.registry import load_flavour, registered_source
from smpp_ray.gbdt.synthetic import write_synthetic_features
from smpp_ray.gbdt.tracking_callback import TRIAL_TAG
from smpp_ray.tracking import PARENT_TAG, TrackingContext, client, create_run

pytestmark = pytest.mark.slow

SAMPLES = 3
# The multi-objective search here; the session pipeline runs the default (scalar) one.
CONFIG = TuneConfig(num_samples=SAMPLES, max_rounds=40, grace_rounds=10, report_every=3, max_concurrent_trials=2,
                    cpus_per_trial=1.0, registered_model_prefix="test", search_alg="optuna_multi")


def _stage(root: Path) -> TrackingContext:
    uri = f"sqlite:///{root / 'mlruns.db'}"
    return TrackingContext(uri, "tune-test", create_run(uri, "tune-test", "tune-stage"))


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("features")
    write_synthetic_features(path, rows=3000, seed=0)
    return path


#: The console lines (``smpp_ray.console.line``) the module's tune run printed.
CONSOLE: list[str] = []


class _Lines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        CONSOLE.append(record.getMessage())


@pytest.fixture(scope="module")
def tuned(ray_session, features, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    ctx = _stage(root)
    handler, console = _Lines(), logging.getLogger("smpp_ray.console")
    level = console.level
    console.addHandler(handler)
    console.setLevel(logging.INFO)  # outside the CLI nothing configures logging: INFO would be dropped
    try:
        result = tune_models(features, root / "out", tune_config=CONFIG, tracking=ctx)
    finally:
        console.removeHandler(handler)
        console.setLevel(level)
    return result, ctx, root / "out"


def test_trial_lines_report_each_trials_best_round_like_the_search(tuned):
    """The "best" a person reads on the last trial line is the value the search selected."""
    result, _, _ = tuned
    number = r"([0-9.-]+)"
    for family in ("lightgbm", "catboost"):
        pattern = re.compile(rf"{family} trial (\d+)/{SAMPLES} done: val_score {number} \(src {number}, mae {number}\), "
                             rf"best {number}")
        found = [pattern.fullmatch(line) for line in CONSOLE]
        lines = [(int(m[1]), float(m[2]), float(m[3]), float(m[4]), float(m[5])) for m in found if m]
        assert [line[0] for line in lines] == list(range(1, SAMPLES + 1)), CONSOLE
        assert lines[-1][4] == max(line[1] for line in lines)
        search = result["search"][family]
        assert lines[-1][4] == pytest.approx(search["best_val_score"], abs=5e-5), (family, lines)
        # each line's values are its trial's selected round (by val_score), not its last one
        experiment = Path(search["experiment_path"])
        progress = [list(csv.DictReader(f.read_text().splitlines())) for f in sorted(experiment.glob("*/progress.csv"))]
        chosen = [max(rows, key=lambda r: (float(r["val_score"]), -int(r["rounds"]))) for rows in progress]
        shown = np.array(sorted((line[1], line[2], line[3]) for line in lines))
        selected = np.array(sorted((float(r["val_score"]), float(r["val_src"]), float(r["val_mae"])) for r in chosen))
        np.testing.assert_allclose(shown, selected, atol=5e-5)


def _children(ctx: TrackingContext, parent: str) -> list:
    experiment = client(ctx.tracking_uri).get_experiment_by_name(ctx.experiment)
    return client(ctx.tracking_uri).search_runs([experiment.experiment_id],
                                                filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")


def _progress(experiment_path: str, trial_id: str) -> list[dict]:
    (folder,) = [p for p in Path(experiment_path).iterdir() if p.is_dir() and trial_id in p.name]
    with open(folder / "progress.csv") as f:
        return list(csv.DictReader(f))


def test_reported_metric_equals_spearman_of_saved_predictions(tuned):
    result, _, out = tuned
    predictions = pd.read_parquet(out / "predictions.parquet")
    val = predictions[predictions["split"] == "val"]
    for family in ("lightgbm", "catboost"):
        search = result["search"][family]
        rows = _progress(search["experiment_path"], search["best_trial_id"])
        reported = {int(r["rounds"]): float(r["val_src"]) for r in rows}
        assert sorted(reported) == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40][:len(reported)]
        rounds = result["best_rounds"][family]
        scores = {int(r["rounds"]): float(r["val_score"]) for r in rows}
        assert scores[rounds] == max(scores.values())   # the round tune.objective (src+mae) selects
        # Calibration keeps the order of the scores: the calibrated prediction has the raw one's SRC
        for column in (f"raw_{family}", f"pred_{family}"):
            recomputed = stats.spearmanr(val["label"], val[column]).statistic
            assert reported[rounds] == pytest.approx(recomputed, abs=1e-9), column
        mae_reported = float(next(r["val_mae"] for r in rows if int(r["rounds"]) == rounds))
        # CatBoost accumulates its MAE in single precision; SRC (ranks) matches exactly above.
        assert mae_reported == pytest.approx(metrics.mae(val["label"], val[f"raw_{family}"]), rel=1e-5)


def test_every_trial_is_a_child_run_of_its_search_run(tuned):
    result, ctx, _ = tuned
    c = client(ctx.tracking_uri)
    search_runs = _children(ctx, ctx.run_id)
    assert sorted(r.data.tags["smpp.family"] for r in search_runs) == ["catboost", "lightgbm"]
    for family in ("lightgbm", "catboost"):
        search = result["search"][family]
        trials = json.loads(Path(search["experiment_path"]).parent.parent.joinpath(f"search_{family}.json").read_text())
        runs = _children(ctx, search["search_run_id"])
        assert len(runs) == search["trials"] == SAMPLES
        assert sorted(r.data.tags[TRIAL_TAG] for r in runs) == sorted(t["trial_id"] for t in trials["trials"])
        for run in runs:
            assert run.info.status == "FINISHED"
            trial = next(t for t in trials["trials"] if t["trial_id"] == run.data.tags[TRIAL_TAG])
            assert float(run.data.params["learning_rate"]) == pytest.approx(trial["config"]["learning_rate"])
            history = c.get_metric_history(run.info.run_id, "val_src")
            assert sorted(m.step for m in history) == [r for r in range(1, trial["rounds_run"] + 1)
                                                       if (r - 1) % 3 == 0 or r == 40]
            assert run.data.metrics["best_val_src"] == pytest.approx(trial["best_val_src"])


def test_registered_models_reload_and_predict_identically(tuned, features):
    result, ctx, out = tuned
    _, data = load_splits(str(features))
    predictions = pd.read_parquet(out / "predictions.parquet")
    test_rows = predictions[predictions["split"] == "test"]
    for family in ("lightgbm", "catboost"):
        assert result["registered_models"][family]["name"] == f"test-{family}"
        model = load_flavour(family, registered_source(ctx.tracking_uri, f"test-{family}"))
        reloaded = np.asarray(model.predict(data["test"].X), dtype=np.float64)
        assert np.array_equal(data["test"].keys["pid"].to_numpy(), test_rows["pid"].to_numpy())
        assert np.array_equal(reloaded, test_rows[f"raw_{family}"].to_numpy())   # the booster, before calibration
        # The registry explains itself: a description, tagged versions, a READY logged model
        c = client(ctx.tracking_uri)
        assert family in c.get_registered_model(f"test-{family}").description
        version = c.get_model_version(f"test-{family}", result["registered_models"][family]["version"])
        assert version.tags["smpp.family"] == family
        assert 50 < result["search"][family]["peak_rss_mib"] < 8192  # a trial process: torch-free, < 8 GiB
        assert float(version.tags["smpp.val_src"]) == pytest.approx(result["search"][family]["best_val_src"], abs=0.2)
        logged = c.get_logged_model(result["registered_models"][family]["model_id"])
        assert "READY" in str(logged.status)
        assert logged.source_run_id == result["search"][family]["search_run_id"]
        assert int(logged.params["rounds"]) == result["best_rounds"][family]


def test_tuned_blend_beats_constant_and_single_feature_baselines(tuned, features):
    result, _, _ = tuned
    _, data = load_splits(str(features))
    y_train, y_test = data["train"].y, data["test"].y
    constant_mae = metrics.mae(y_test, np.full_like(y_test, np.median(y_train)))
    x_train, x_test = data["train"].X["user_followers"].to_numpy(), data["test"].X["user_followers"].to_numpy()
    slope, intercept = np.polyfit(x_train, y_train, 1)
    single = slope * x_test + intercept
    blend = result["metrics"]["blend"]
    assert blend["test_mae"] < constant_mae
    assert blend["test_mae"] < metrics.mae(y_test, single)
    assert blend["test_src"] > metrics.src(y_test, single) + 0.05
    for family in ("lightgbm", "catboost"):
        assert result["metrics"][family]["test_src"] > metrics.src(y_test, single)


def _selected(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (float(r["val_score"]), -int(r["rounds"])))


def test_the_multi_objective_search_learns_each_trials_selected_round_and_keeps_its_front(tuned):
    result, ctx, out = tuned
    c = client(ctx.tracking_uri)
    document = json.loads((out / "metrics.json").read_text())
    stage = c.get_run(ctx.run_id).data.metrics
    for family in ("lightgbm", "catboost"):
        search = result["search"][family]
        record = json.loads((out / f"search_{family}.json").read_text())
        # Recomputed from the trials' own progress files, not from the summary's numbers
        points = []
        for trial in record["trials"]:
            chosen = _selected(_progress(search["experiment_path"], trial["trial_id"]))
            points.append({"trial_id": trial["trial_id"], "val_src": float(chosen["val_src"]),
                           "val_mae": float(chosen["val_mae"])})
        front = record["pareto_front"]
        assert [p["trial_id"] for p in front] == [p["trial_id"] for p in pareto_front(points)]
        assert search["best_trial_id"] in [p["trial_id"] for p in front]  # src+mae: the best is undominated
        for point in points:
            assert point["trial_id"] in {p["trial_id"] for p in front} or any(dominates(p, point) for p in front)
        assert document["best"][family]["pareto_front"] == front
        assert stage[f"{family}_pareto_trials"] == len(front)
        run = c.get_run(search["search_run_id"])
        assert run.data.metrics["pareto_trials"] == len(front)
        assert f"search_{family}.json" in {a.path for a in c.list_artifacts(run.info.run_id)}
        # Tune drove the two-objective study, and told it each trial's selected round
        (state,) = Path(search["experiment_path"]).glob("searcher-state-*.pkl")
        study = pickle.loads(state.read_bytes())["_ot_study"]
        assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
        told = sorted(tuple(t.values) for t in study.trials if t.values is not None)
        np.testing.assert_allclose(told, sorted((p["val_src"], p["val_mae"]) for p in points), atol=1e-6)


def test_metrics_json_plots_and_stage_metrics(tuned):
    result, ctx, out = tuned
    document = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for model in ("lightgbm", "catboost", "blend"):
            assert set(document["overall"][split][model]) == {"src", "mae", "mse", "n"}
            assert sorted(document["per_category"][split][model]) == ["Animal", "Food", "Sports", "Travel"]
            assert len(document["per_decile"][split][model]) == 10
    weights = result["blend_weights"]
    assert sum(weights.values()) == pytest.approx(1.0)
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert list(predictions.columns) == ["pid", "split", "label", "category", "raw_lightgbm", "raw_catboost",
                                         "raw_blend", "pred_lightgbm", "pred_catboost", "pred_blend"]
    expected = weights["lightgbm"] * predictions["raw_lightgbm"] + weights["catboost"] * predictions["raw_catboost"]
    assert np.allclose(predictions["raw_blend"], expected)
    # The calibrated blend keeps the raw blend's order on every split and brings test MAE down
    for split in ("val", "test"):
        rows = predictions[predictions["split"] == split]
        assert metrics.src(rows["label"], rows["pred_blend"]) == pytest.approx(
            metrics.src(rows["label"], rows["raw_blend"]), abs=1e-12)
    assert document["overall"]["test"]["blend"]["mae"] <= document["uncalibrated"]["test"]["blend"]["mae"] * 1.02
    assert result["metrics"]["uncalibrated"]["blend"]["test_mae"] == document["uncalibrated"]["test"]["blend"]["mae"]
    for name in ("pred_vs_true", "mae_per_category", "feature_importance", "deciles"):
        png = Path(result["paths"][f"plot_{name}"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stage = client(ctx.tracking_uri).get_run(ctx.run_id).data.metrics
    assert stage["test_blend_src"] == pytest.approx(document["overall"]["test"]["blend"]["src"])
    assert stage["val_catboost_mae/Food"] == pytest.approx(document["per_category"]["val"]["catboost"]["Food"]["mae"])


def test_fallback_regressor_needs_no_image_and_its_metrics_are_its_predictions(tuned, features):
    """The fallback is LightGBM with the search's best configuration on every group but network;
    its reported val/test SRC and MAE equal those recomputed from its saved predictions, which the
    saved model reproduces; its prior is the mean training label."""
    result, ctx, out = tuned
    facts = json.loads((out / "fallback.json").read_text())
    assert facts["family"] == "lightgbm" and "network" not in facts["groups"]
    assert facts["params"] == result["best_params"]["lightgbm"] and facts["rounds"] == result["best_rounds"]["lightgbm"]
    spec = FeatureSpec.load(str(out / "fallback_feature_spec.json"))
    assert set(spec.features) == {"user_followers", "hour_feature", "text_signal", "device"}  # no noise_* (network)
    assert "network" not in set(spec.groups.values())
    predictions = pd.read_parquet(out / "fallback_predictions.parquet")
    for split in ("val", "test"):
        rows = predictions[predictions["split"] == split]
        assert facts[f"{split}_src"] == metrics.src(rows["label"], rows["pred"])
        assert facts[f"{split}_mae"] == metrics.mae(rows["label"], rows["pred"])
        assert result["metrics"]["fallback"][f"{split}_src"] == facts[f"{split}_src"]
    _, data = load_splits(str(features), tuple(facts["groups"]))
    model = load_flavour("lightgbm", str(out / "models" / "fallback"))
    assert model.feature_name() == list(spec.features)
    test_rows = predictions[predictions["split"] == "test"]
    assert np.array_equal(data["test"].keys["pid"].to_numpy(), test_rows["pid"].to_numpy())
    assert np.array_equal(np.asarray(model.predict(data["test"].X), dtype=np.float64), test_rows["pred"].to_numpy())
    assert facts["prior"] == pytest.approx(data["train"].y.mean(), abs=1e-12)
    # no image, less signal here: the network group is pure noise in this corpus, so about as good
    assert facts["test_src"] > 0.5
    stage = client(ctx.tracking_uri).get_run(ctx.run_id).data.metrics
    assert stage["val_fallback_src"] == pytest.approx(facts["val_src"])
    assert stage["test_fallback_mae"] == pytest.approx(facts["test_mae"])
    assert result["paths"]["model_fallback"] == str(out / "models" / "fallback")


def test_interrupted_search_resumes_to_the_requested_count(ray_session, features, tmp_path):
    ctx = _stage(tmp_path)
    config = TuneConfig(models=("lightgbm",), num_samples=4, max_rounds=20, grace_rounds=20, report_every=5,
                        max_concurrent_trials=1, interrupt_after_trials=2)
    with pytest.raises(SearchInterrupted, match="after 2 of 4"):
        tune_models(features, tmp_path / "out", tune_config=config, tracking=ctx)
    result = tune_models(features, tmp_path / "out",
                         tune_config=TuneConfig(**{**config.__dict__, "interrupt_after_trials": 0}), tracking=ctx)
    search = result["search"]["lightgbm"]
    assert search["restored"] and search["trials"] == 4
    trials = json.loads((tmp_path / "out" / "search_lightgbm.json").read_text())["trials"]
    assert len({t["trial_id"] for t in trials}) == 4
    assert len({json.dumps(t["config"], sort_keys=True) for t in trials}) == 4
    assert all(t["rounds_run"] == 20 for t in trials)  # grace = max: none stopped early, all ran fully
    runs = _children(ctx, search["search_run_id"])
    assert sorted(r.data.tags[TRIAL_TAG] for r in runs) == sorted(t["trial_id"] for t in trials)
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_failing_trials_are_failed_child_runs(ray_session, features, tmp_path):
    # A features folder whose val split lacks a manifest column: every trial fails reading it.
    broken = tmp_path / "features"
    shutil.copytree(features, broken)
    for part in (broken / "split=val").glob("*.parquet"):
        pd.read_parquet(part).drop(columns=["noise_0"]).to_parquet(part, index=False)
    ctx = _stage(tmp_path)
    # shared_data off: each trial reads the features itself and fails (with shared data the
    # driver's one read fails first, before any trial)
    config = TuneConfig(models=("lightgbm",), num_samples=2, max_rounds=5, grace_rounds=5, report_every=1,
                        max_concurrent_trials=2, shared_data=False)
    with pytest.raises(ValueError, match="noise_0"):
        tune_models(broken, tmp_path / "shared", tune_config=dataclasses.replace(config, shared_data=True))
    with pytest.raises(RuntimeError, match="no lightgbm trial .* reported val_score"):
        tune_models(broken, tmp_path / "out", tune_config=config, tracking=ctx)
    (search_run,) = _children(ctx, ctx.run_id)
    assert search_run.info.status == "FAILED"
    runs = _children(ctx, search_run.info.run_id)
    assert len(runs) == 2
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all("noise_0" in r.data.tags["smpp.error"] for r in runs)


def test_group_folds_keep_users_apart():
    uids = np.repeat(np.arange(12).astype(str), 5)
    folds = group_folds(uids, 3)
    assert len(folds) == 3
    for train_idx, val_idx in folds:
        assert not set(uids[train_idx]) & set(uids[val_idx])
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(60))
    with pytest.raises(ValueError, match="at least 3 users"):
        group_folds(np.array(["a", "b"] * 5), 3)


def test_unknown_feature_group_fails_before_any_trial(features, tmp_path):
    with pytest.raises(ValueError, match="unknown feature group 'audio'"):
        tune_models(features, tmp_path, tune_config=TuneConfig(feature_groups=("audio",)), tracking=None)


def test_a_tune_rerun_on_changed_features_searches_afresh(ray_session, tmp_path, capsys):
    """The stale-search case through the CLI: the search folder of a finished run on other
    features is not restored; the rerun's trials and metrics are the new features'."""
    from smpp_ray.cli import main

    features, out = tmp_path / "features", tmp_path / "tune"
    write_synthetic_features(features, rows=600, seed=1)
    argv = ["tune", "--features", str(features), "--out", str(out), "--set", "tracking.enabled=false",
            "--set", "tune.models=[lightgbm]", "--set", "tune.num_samples=2", "--set", "tune.max_rounds=10",
            "--set", "tune.grace_rounds=10", "--set", "tune.report_every=5"]
    assert main(argv) == 0
    first = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    shutil.rmtree(features)
    write_synthetic_features(features, rows=900, seed=2)   # the same folder, other posts
    assert main(argv) == 0
    printed = capsys.readouterr()
    second = json.loads((out / "summary.json").read_text())
    search = json.loads((out / "search_lightgbm.json").read_text())
    assert search["restored"] is False and len(search["trials"]) == 2
    assert "input 'features' changed" in printed.err
    # The refit is minutes at SMPD size: the console says when it starts and ends.
    assert "tune: refitting lightgbm" in printed.err and "tune: refits done in" in printed.err
    assert second["fingerprint"] != first["fingerprint"]
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == 900   # scored on the new features, every post once


def _flip_a_data_page(part: Path) -> None:
    """16 bytes inside the first column chunk's data page: Parquet without checksums reads them
    as values (a cell of ~4e22), with them the read fails."""
    import pyarrow.parquet as pq

    offset = pq.ParquetFile(part).metadata.row_group(0).column(3).data_page_offset + 24
    data = bytearray(part.read_bytes())
    data[offset:offset + 16] = bytes(b ^ 0xFF for b in data[offset:offset + 16])
    part.write_bytes(bytes(data))


def test_damaged_features_are_exit_2_naming_the_file_before_any_trial(features, tmp_path, capsys):
    from smpp_ray.cli import main

    damaged = tmp_path / "features"
    shutil.copytree(features, damaged)
    part = sorted((damaged / "split=val").glob("*.parquet"))[0]
    _flip_a_data_page(part)
    code = main(["tune", "--features", str(damaged), "--out", str(tmp_path / "tune"), "--set", "tracking.enabled=false",
                 "--set", "tune.models=[lightgbm]", "--set", "tune.num_samples=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{part}:" in err and "damaged" in err
    assert not (tmp_path / "tune" / "ray_results" / "lightgbm").exists()   # refused before any trial
