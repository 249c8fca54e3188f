"""The SRC/MAE Pareto front of a search and the multi-objective searcher (real Optuna, no Ray
runtime: the searcher is driven the way Tune drives it)."""

from __future__ import annotations

import numpy as np
import pytest

from smpp_ray.gbdt.objective import SCORE, Objective, dominates, pareto_front


def _points(rng: np.random.Generator, n: int) -> list[dict]:
    # Rounded, so that ties in SRC, in MAE and exact duplicates occur
    return [{"id": i, "val_src": float(s), "val_mae": float(m)}
            for i, (s, m) in enumerate(zip(np.round(rng.uniform(0, 1, n), 1), np.round(rng.uniform(0.5, 1.5, n), 1),
                                           strict=True))]


@pytest.mark.parametrize("seed", range(5))
def test_the_front_is_exactly_the_undominated_points(seed):
    points = _points(np.random.default_rng(seed), 60)
    front = pareto_front(points)
    undominated = [p for p in points if not any(dominates(q, p) for q in points)]
    # Every undominated point is on the front or an exact duplicate of one that is
    on_front = {(p["val_src"], p["val_mae"]) for p in front}
    assert on_front == {(p["val_src"], p["val_mae"]) for p in undominated}
    assert len(on_front) == len(front), "a duplicate point was kept twice"
    assert not any(dominates(a, b) for a in front for b in front)
    assert [p["val_src"] for p in front] == sorted((p["val_src"] for p in front), reverse=True)


def test_non_finite_points_stay_off_the_front():
    points = [{"val_src": float("nan"), "val_mae": 0.1}, {"val_src": 0.5, "val_mae": float("inf")},
              {"val_src": 0.4, "val_mae": 0.9}]
    assert pareto_front(points) == [points[2]]


@pytest.mark.parametrize("seed", range(3))
def test_the_trial_the_default_objective_chooses_is_on_the_front(seed):
    # Strictly increasing in SRC and decreasing in MAE, so its best is undominated (``src`` or
    # ``mae`` alone can tie with a point that beats it on the other metric)
    objective = Objective("src+mae", mae_baseline=1.0)
    points = _points(np.random.default_rng(seed), 80)
    best = max(points, key=lambda p: objective.score(p["val_src"], p["val_mae"]))
    assert (best["val_src"], best["val_mae"]) in {(p["val_src"], p["val_mae"]) for p in pareto_front(points)}


def test_the_multi_objective_searcher_learns_each_trials_selected_round():
    from ray import tune

    from smpp_ray.gbdt.multi_objective import ParetoOptunaSearch

    searcher = ParetoOptunaSearch(seed=0, min_rounds=10)
    # Tune hands its own scalar metric to the searcher; the study must keep its two objectives
    assert searcher.set_search_properties("val_score", "max", {"x": tune.uniform(0, 1)})
    objective = Objective("src+mae", mae_baseline=1.0)
    # (rounds, src, mae): round 5 has the best score but is below min_rounds; round 20 is selected
    # by the objective; round 30 is the last report, which Tune would hand over as it is
    # "c": its last round, the one Tune hands to on_trial_complete only, is its best
    curves = {"a": [(5, 0.9, 0.2), (20, 0.6, 0.5), (30, 0.3, 0.9)],
              "b": [(10, 0.2, 0.3), (20, 0.1, 0.5)],
              "c": [(10, 0.3, 0.8), (20, 0.5, 0.6)]}
    for trial_id, curve in curves.items():
        assert set(searcher.suggest(trial_id)) == {"x"}
        reports = [{"rounds": rounds, "val_src": src, "val_mae": mae, SCORE: objective.score(src, mae),
                    "training_iteration": rounds} for rounds, src, mae in curve]
        for report in reports[:-1]:   # as Tune does: the report that ends a trial goes to completion only
            searcher.on_trial_result(trial_id, report)
        searcher.on_trial_complete(trial_id, reports[-1])
    study = searcher._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.values for t in study.trials] == [[0.6, 0.5], [0.2, 0.3], [0.5, 0.6]]
    # "a" and "b" are on the study's own front ("c" has a worse MAE than "a" and a lower SRC)
    assert sorted(t.number for t in study.best_trials) == [0, 1]


def test_a_trial_without_a_scored_round_is_not_a_point_on_the_front():
    from optuna.trial import TrialState
    from ray import tune

    from smpp_ray.gbdt.multi_objective import ParetoOptunaSearch

    searcher = ParetoOptunaSearch(seed=0)
    searcher.set_search_properties(None, None, {"x": tune.uniform(0, 1)})
    searcher.suggest("c")
    searcher.on_trial_result("c", {"rounds": 5, "val_src": float("nan"), "val_mae": 0.4, SCORE: float("nan")})
    searcher.on_trial_complete("c", {"rounds": 5, "val_src": float("nan"), "val_mae": 0.4})
    assert searcher._ot_study.trials[0].state == TrialState.FAIL
