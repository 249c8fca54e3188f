"""Rank-preserving calibration, the search objective over SRC and MAE, and the blend chosen by it
(no Ray: the pieces the tune stage composes; ``tests/test_tune.py`` runs them in a search)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from smpp_ray import metrics
from smpp_ray.gbdt.blend import choose_blend, read_blend, write_blend
from smpp_ray.gbdt.calibration import MAX_KNOTS, MonotoneCalibrator, fit_if_it_helps
from smpp_ray.gbdt.objective import SCORE, Objective, best_round


def _biased(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a score that ranks them well but sits off their scale: shrunk, shifted, bent,
    with ties (rounded to 2 decimals) as a GBDT's leaves make them."""
    label = rng.normal(6.0, 2.0, n)
    score = np.round(np.tanh((label - 6.0) / 4.0 + 0.3 * rng.normal(0, 1, n)) * 0.8 + 1.0, 2)
    return label, score


def test_calibration_keeps_src_exactly_and_lowers_mae_on_held_out_posts():
    rng = np.random.default_rng(0)
    fit_labels, fit_scores = _biased(rng, 2000)
    calibrator = MonotoneCalibrator.fit(fit_scores, fit_labels)
    held_labels, held_scores = _biased(rng, 3000)
    # Scores outside the fitted range too: linear extrapolation keeps them in order
    held_scores[:20] = np.linspace(-1.0, 3.0, 20)
    calibrated = calibrator(held_scores)
    assert metrics.src(held_labels, calibrated) == metrics.src(held_labels, held_scores)   # exactly, ties kept
    order = np.argsort(held_scores, kind="stable")
    assert np.all(np.diff(calibrated[order])[np.diff(held_scores[order]) > 0] > 0)   # strictly increasing
    assert np.all(np.diff(calibrated[order])[np.diff(held_scores[order]) == 0] == 0)
    before, after = metrics.mae(held_labels, held_scores), metrics.mae(held_labels, calibrated)
    assert after < 0.5 * before, (before, after)
    assert len(calibrator.x) <= MAX_KNOTS


def test_a_calibrator_survives_blend_json_and_a_damaged_one_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    labels, scores = _biased(rng, 500)
    blend = choose_blend(labels, {"lightgbm": scores}, Objective("src+mae", 2.0), calibrate=True)
    location = str(tmp_path / "blend.json")
    write_blend(location, blend, objective="src+mae", rounds={"lightgbm": 40}, refit_on="train")
    again = read_blend(location)
    probe = np.linspace(-2, 4, 101)
    np.testing.assert_array_equal(again.score("blend", {"lightgbm": probe}), blend.score("blend", {"lightgbm": probe}))
    text = (tmp_path / "blend.json").read_text()
    (tmp_path / "blend.json").write_text(text.replace('"y": [', '"y": [99.0, ', 1))   # no longer increasing
    with pytest.raises(ValueError, match="blend.json: a calibrator is damaged"):
        read_blend(location)


def test_an_uninformative_score_maps_to_the_mean_and_keeps_its_order():
    labels = np.array([1.0, 5.0, 3.0, 7.0])
    scores = np.array([0.4, 0.3, 0.2, 0.1])   # anti-correlated: isotonic pools everything
    calibrator = MonotoneCalibrator.fit(scores, labels)
    mapped = calibrator(scores)
    assert np.allclose(mapped, labels.mean(), atol=1e-5)
    assert np.all(np.diff(mapped) < 0)   # still the score's order (SRC unchanged)
    with pytest.raises(ValueError, match="finite"):
        MonotoneCalibrator.fit(np.array([np.nan]), np.array([1.0]))


def _reports(rounds_values: list[tuple[int, float, float]], objective: Objective) -> list[dict]:
    return [{"rounds": r, "val_src": s, "val_mae": m, SCORE: objective.score(s, m)} for r, s, m in rounds_values]


def test_the_default_objective_skips_an_early_round_that_ranks_well_but_misses_the_scale():
    """The held-out case: round 11 (predictions barely off the mean) had the best val SRC."""
    curve = [(1, 0.60, 1.50), (11, 0.79, 1.45), (101, 0.78, 0.70), (201, 0.77, 0.69)]
    by_src = best_round(_reports(curve, Objective("src", 1.5)))
    by_both = best_round(_reports(curve, Objective("src+mae", 1.5)))
    by_mae = best_round(_reports(curve, Objective("mae", 1.5)))
    assert by_src["rounds"] == 11 and by_both["rounds"] == 101 and by_mae["rounds"] == 201
    # A minimum round count, where the trial reached it; a trial stopped before it keeps its best
    assert best_round(_reports(curve, Objective("src", 1.5)), min_rounds=150)["rounds"] == 201
    assert best_round(_reports(curve[:2], Objective("src", 1.5)), min_rounds=150)["rounds"] == 11
    with pytest.raises(ValueError, match="tune.objective"):
        Objective("rmse", 1.0)


def test_mae_skill_is_scaled_by_the_training_median():
    objective = Objective.for_labels("mae", np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0]))
    assert objective.mae_baseline == pytest.approx(1.0)   # |2-2| and |4-2| around the median 2
    assert objective.score(0.9, 0.25) == pytest.approx(0.75)
    assert Objective("src+mae", 1.0).score(0.8, 0.5) == pytest.approx(0.65)


def test_a_round_with_constant_predictions_is_scored_as_no_rank_skill():
    """A tree that has not split yet predicts one value: SRC is undefined (reported NaN), the
    objective counts it as 0 so the round stays comparable (a small val split once left every
    trial unscored and the stage failed)."""
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    constant = np.full(4, 2.5)
    objective = Objective.for_labels("src+mae", labels, labels)
    assert np.isnan(metrics.src(labels, constant))
    assert objective.of(labels, constant) == pytest.approx(0.5 * objective.mae_skill(1.0))
    assert Objective("src", 1.0).of(labels, constant) == 0.0
    assert np.isnan(Objective("src+mae", 1.0).score(0.5, float("nan")))   # no labels: still unscored


def test_the_blend_weight_follows_the_objective():
    """One family ranks a bit better but is off the scale; with calibration off, src picks it,
    src+mae moves weight to the family on the label scale."""
    rng = np.random.default_rng(3)
    label = rng.normal(6.0, 2.0, 3000)
    ranker = 0.1 * (label + 0.6 * rng.normal(0, 1, 3000))            # good order, shrunk to ~0.6
    scaled = label + 1.0 * rng.normal(0, 1, 3000)                      # worse order, on the scale
    preds = {"lightgbm": ranker, "catboost": scaled}
    train = rng.normal(6.0, 2.0, 3000)
    choose = functools.partial(choose_blend, label, preds, calibrate=False)
    by_src = choose(Objective.for_labels("src", train, label))
    by_both = choose(Objective.for_labels("src+mae", train, label))
    assert by_src.weights["lightgbm"] > by_both.weights["lightgbm"]
    blended = {name: b.score("blend", preds) for name, b in (("src", by_src), ("both", by_both))}
    assert metrics.mae(label, blended["both"]) < metrics.mae(label, blended["src"])
    # Calibration is chosen after the weight (not in-sample per candidate) and only where it helps
    calibrated = choose_blend(label, preds, Objective.for_labels("src+mae", train, label), calibrate=True)
    assert calibrated.weights == by_both.weights
    assert set(calibrated.checks) == {"lightgbm", "catboost", "blend"}
    assert calibrated.checks["lightgbm"]["kept"]   # the shrunk ranker is put on the scale
    assert metrics.mae(label, calibrated.score("lightgbm", preds)) < 0.5 * metrics.mae(label, ranker)
    assert metrics.mae(label, calibrated.score("blend", preds)) <= metrics.mae(label, blended["both"])


def test_a_calibrator_is_kept_only_where_it_lowers_held_out_mae():
    rng = np.random.default_rng(4)
    on_scale = rng.normal(6.0, 2.0, 150)   # a small split, a score already calibrated: E[label | score] = score
    label = on_scale + rng.normal(0, 1.0, 150)
    calibrator, facts = fit_if_it_helps(on_scale, label)
    assert not facts["kept"] and calibrator.is_identity
    assert facts["cv_mae_calibrated"] >= facts["cv_mae_raw"]
    shifted = 0.3 * on_scale + 1.0   # the same order, off the scale
    calibrator, facts = fit_if_it_helps(shifted, label)
    assert facts["kept"] and not calibrator.is_identity and facts["cv_mae_calibrated"] < facts["cv_mae_raw"]
    assert len(calibrator.x) <= 150 // 20   # each knot pools >= MIN_POSTS_PER_KNOT posts
