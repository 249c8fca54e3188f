"""Rank-preserving calibration: a strictly increasing map from a model's score to the label scale.

The challenge ranks by SRC *and* MAE. SRC depends only on the order of the scores; MAE on their
values. A GBDT chosen for its ranking (or a blend of two) can rank well and still sit off the
label scale (shrunk towards the mean, shifted). The calibrator fixes the values and keeps the
order: it is fitted on validation scores and labels by isotonic regression (pool adjacent
violators) and applied as the piecewise-linear interpolation through the isotonic blocks'
(mean score, mean label) knots, extrapolated linearly past the ends.

Isotonic regression alone is a step function: it would tie posts the model ranked apart and so
change SRC. Interpolating between knots whose labels strictly increase (equal neighbours are
pooled too) makes the map strictly increasing, so every pair of scores keeps its order and SRC
is unchanged on any data (up to float rounding of scores closer than ~1e-12 of each other).

A validation split is small (the SMP Challenge's time split leaves a few thousand posts, a
held-out corpus a few hundred), and an isotonic fit follows its noise: each knot pools at least
:data:`MIN_POSTS_PER_KNOT` posts, and :func:`fit_if_it_helps` keeps a calibrator only when it
lowers MAE on held-out folds of the validation split (otherwise the identity: a GBDT trained on
the label is often on its scale already).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: At most this many knots are kept (neighbouring blocks are pooled beyond it): a calibrator of
#: a 30k-post validation split stays a few KB in blend.json.
MAX_KNOTS = 256
#: Each knot pools at least this many posts (a smoother map on a small validation split).
MIN_POSTS_PER_KNOT = 20
#: Folds of the check that a calibrator helps (:func:`fit_if_it_helps`).
CHECK_FOLDS = 5


@dataclass(frozen=True)
class MonotoneCalibrator:
    """``score -> label`` through the knots ``(x, y)``, both strictly increasing; identity when empty."""

    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    slope_below: float = 1.0
    slope_above: float = 1.0

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, max_knots: int = MAX_KNOTS) -> MonotoneCalibrator:
        """Fit on finite (score, label) pairs; ValueError when there are none."""
        scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
        finite = np.isfinite(scores) & np.isfinite(labels)
        if not finite.any():
            raise ValueError("calibration needs at least one finite (score, label) pair")
        unique, inverse = np.unique(scores[finite], return_inverse=True)
        weight = np.bincount(inverse).astype(np.float64)
        mean_label = np.bincount(inverse, weights=labels[finite]) / weight
        x, y, w = _pool_adjacent_violators(unique, mean_label, weight)
        x, y, w = _thin(x, y, w, max(1, min(max_knots, int(finite.sum()) // MIN_POSTS_PER_KNOT)))
        if len(x) == 1:
            # Nothing to order by: keep the mean and a slope too small to matter for MAE, so
            # distinct scores still map to distinct values
            spread = float(np.ptp(unique)) or 1.0
            slope = 1e-6 * (float(np.std(labels[finite])) or 1.0) / spread
            return cls((float(x[0]),), (float(y[0]),), slope, slope)
        return cls(tuple(map(float, x)), tuple(map(float, y)),
                   float((y[1] - y[0]) / (x[1] - x[0])), float((y[-1] - y[-2]) / (x[-1] - x[-2])))

    @property
    def is_identity(self) -> bool:
        return not self.x

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if self.is_identity:
            return scores.copy()
        x, y = np.asarray(self.x), np.asarray(self.y)
        out = np.interp(scores, x, y)
        below, above = scores < x[0], scores > x[-1]
        out[below] = y[0] + self.slope_below * (scores[below] - x[0])
        out[above] = y[-1] + self.slope_above * (scores[above] - x[-1])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"x": list(self.x), "y": list(self.y), "slope_below": self.slope_below,
                "slope_above": self.slope_above}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> MonotoneCalibrator:
        """The calibrator :meth:`to_dict` wrote; identity for None (a blend.json without one)."""
        if not values:
            return cls()
        x, y = tuple(float(v) for v in values["x"]), tuple(float(v) for v in values["y"])
        if len(x) != len(y) or not x or np.any(np.diff(x) <= 0) or np.any(np.diff(y) <= 0):
            raise ValueError("a calibrator needs as many knots in x as in y, both strictly increasing")
        return cls(x, y, float(values["slope_below"]), float(values["slope_above"]))


def _pool_adjacent_violators(x: np.ndarray, y: np.ndarray, w: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted isotonic regression of ``y`` on sorted ``x``, as blocks (mean x, mean y, weight)
    whose means strictly increase: a block not above its predecessor is pooled into it."""
    bx: list[float] = []
    by: list[float] = []
    bw: list[float] = []
    for xi, yi, wi in zip(x.tolist(), y.tolist(), w.tolist(), strict=True):
        bx.append(xi * wi)
        by.append(yi * wi)
        bw.append(wi)
        while len(bw) > 1 and by[-1] / bw[-1] <= by[-2] / bw[-2]:
            sx, sy, sw = bx.pop(), by.pop(), bw.pop()
            bx[-1] += sx
            by[-1] += sy
            bw[-1] += sw
    weights = np.asarray(bw)
    return np.asarray(bx) / weights, np.asarray(by) / weights, weights


def _thin(x: np.ndarray, y: np.ndarray, w: np.ndarray, max_knots: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool consecutive blocks into at most ``max_knots`` groups of about equal weight (weighted
    means of increasing sequences still increase)."""
    if len(x) <= max_knots:
        return x, y, w
    edges = np.searchsorted(np.cumsum(w), np.linspace(0, w.sum(), max_knots + 1)[1:-1], side="right")
    groups = np.split(np.arange(len(x)), np.unique(edges))
    groups = [g for g in groups if len(g)]
    gw = np.array([w[g].sum() for g in groups])
    gx = np.array([(x[g] * w[g]).sum() for g in groups]) / gw
    gy = np.array([(y[g] * w[g]).sum() for g in groups]) / gw
    return gx, gy, gw


def fit_if_it_helps(scores: np.ndarray, labels: np.ndarray, folds: int = CHECK_FOLDS
                    ) -> tuple[MonotoneCalibrator, dict[str, float | bool]]:
    """A calibrator fitted on all of (scores, labels) when, fitted on ``folds - 1`` interleaved
    folds, it lowers the MAE of the held-out fold on average; else the identity. Returns it and
    the check's figures (``cv_mae_raw``, ``cv_mae_calibrated``, ``kept``)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    keep = np.isfinite(scores) & np.isfinite(labels)
    scores, labels = scores[keep], labels[keep]
    if len(labels) < folds * MIN_POSTS_PER_KNOT:
        return MonotoneCalibrator(), {"cv_mae_raw": float("nan"), "cv_mae_calibrated": float("nan"), "kept": False}
    fold = np.arange(len(labels)) % folds
    raw = calibrated = 0.0
    for k in range(folds):
        held = fold == k
        mapped = MonotoneCalibrator.fit(scores[~held], labels[~held])(scores[held])
        raw += float(np.abs(labels[held] - scores[held]).sum())
        calibrated += float(np.abs(labels[held] - mapped).sum())
    facts: dict[str, float | bool] = {"cv_mae_raw": raw / len(labels), "cv_mae_calibrated": calibrated / len(labels)}
    facts["kept"] = calibrated < raw
    return (MonotoneCalibrator.fit(scores, labels) if facts["kept"] else MonotoneCalibrator()), facts
