"""Popularity metrics as the SMP Challenge scores them: SRC (Spearman), MAE and MSE.

Rows whose label is missing (NaN, e.g. unlabelled ``test_`` posts) are left out of every metric,
so a split without labels gives ``n == 0`` and NaN metrics rather than an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["src", "mae", "mse", "regression_metrics", "grouped_metrics", "decile_metrics"]


def _labelled(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"labels have shape {y.shape} but predictions have shape {p.shape}")
    keep = np.isfinite(y)
    return y[keep], p[keep]


def src(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``); NaN with < 2 rows or a constant input."""
    y, p = _labelled(y, p)
    if len(y) < 2 or np.all(y == y[0]) or np.all(p == p[0]):
        return math.nan
    return float(stats.spearmanr(y, p).statistic)


def mae(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Mean absolute error; NaN without labelled rows."""
    y, p = _labelled(y, p)
    return float(np.mean(np.abs(y - p))) if len(y) else math.nan


def mse(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Mean squared error; NaN without labelled rows."""
    y, p = _labelled(y, p)
    return float(np.mean((y - p) ** 2)) if len(y) else math.nan


def regression_metrics(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{"src", "mae", "mse", "n"}`` over the labelled rows."""
    labelled, _ = _labelled(y, p)
    return {"src": src(y, p), "mae": mae(y, p), "mse": mse(y, p), "n": int(len(labelled))}


def grouped_metrics(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """:func:`regression_metrics` per distinct value of ``groups`` (e.g. per category), sorted by name."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    return {str(g): regression_metrics(y[groups == g], p[groups == g]) for g in sorted(set(groups.tolist()))}


def decile_metrics(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Metrics per popularity decile of the *true* label (tail behaviour), lowest decile first.

    Deciles are quantile bins of the labelled rows; each entry carries its label range.
    """
    y, p = _labelled(y, p)
    if len(y) < bins:
        return []
    order = np.argsort(y, kind="stable")
    out: list[dict[str, float]] = []
    for index, chunk in enumerate(np.array_split(order, bins)):
        entry = regression_metrics(y[chunk], p[chunk])
        entry.update({"decile": index + 1, "label_min": float(y[chunk].min()), "label_max": float(y[chunk].max())})
        out.append(entry)
    return out
