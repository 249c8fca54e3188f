"""smpp_ray.metrics against scipy / numpy references and its edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from smpp_ray import metrics


def test_matches_scipy_and_numpy():
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    p = y + rng.normal(size=200)
    assert metrics.src(y, p) == pytest.approx(stats.spearmanr(y, p).statistic, abs=1e-12)
    assert metrics.mae(y, p) == pytest.approx(np.mean(np.abs(y - p)))
    assert metrics.mse(y, p) == pytest.approx(np.mean((y - p) ** 2))
    assert metrics.regression_metrics(y, p)["n"] == 200


def test_unlabelled_rows_are_left_out():
    y = np.array([1.0, 2.0, np.nan, 4.0])
    p = np.array([1.0, 3.0, 100.0, 4.0])
    assert metrics.mae(y, p) == pytest.approx(1 / 3)
    assert metrics.regression_metrics(y, p)["n"] == 3
    empty = metrics.regression_metrics([np.nan, np.nan], [1.0, 2.0])
    assert empty["n"] == 0 and math.isnan(empty["mae"]) and math.isnan(empty["src"])


def test_constant_prediction_has_no_rank_correlation():
    assert math.isnan(metrics.src([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        metrics.mae([1.0, 2.0, 3.0], [1.0, 2.0])


def test_grouped_and_decile_metrics_partition_the_rows():
    rng = np.random.default_rng(1)
    y = rng.normal(size=100)
    p = y + 0.1 * rng.normal(size=100)
    groups = np.where(y > 0, "high", "low")
    per_group = metrics.grouped_metrics(y, p, groups)
    assert sorted(per_group) == ["high", "low"]
    assert sum(v["n"] for v in per_group.values()) == 100
    deciles = metrics.decile_metrics(y, p)
    assert [d["decile"] for d in deciles] == list(range(1, 11))
    assert sum(d["n"] for d in deciles) == 100
    # deciles are ordered by the true label: each one's range starts above the previous one's
    assert all(a["label_max"] <= b["label_min"] for a, b in zip(deciles, deciles[1:], strict=False))
