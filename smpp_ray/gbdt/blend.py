"""Blending the families: a convex weight chosen on the validation split."""

from __future__ import annotations

import numpy as np

from smpp_ray import metrics


def choose_weights(y: np.ndarray, preds: dict[str, np.ndarray], step: float = 0.05) -> dict[str, float]:
    """Weights (summing to 1) that maximise SRC of the blend on ``y``; ties go to the lower MAE.

    One family gets weight 1. Two families search ``w * first + (1 - w) * second`` over a grid
    of ``step``; predictions are on the label scale, so the blend stays on it (MAE is meaningful).
    """
    names = list(preds)
    if len(names) == 1:
        return {names[0]: 1.0}
    if len(names) != 2:
        raise ValueError(f"blending supports one or two families, got {names!r}")
    first, second = (np.asarray(preds[n], dtype=np.float64) for n in names)
    best: tuple[float, float, float] | None = None
    for w in np.round(np.arange(0.0, 1.0 + 1e-9, step), 6):
        blended = w * first + (1 - w) * second
        key = (metrics.src(y, blended), -metrics.mae(y, blended))
        if best is None or key > best[:2]:
            best = (*key, float(w))
    assert best is not None
    return {names[0]: best[2], names[1]: round(1.0 - best[2], 6)}


def apply_weights(preds: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted sum of the families' predictions."""
    return sum(weights[n] * np.asarray(preds[n], dtype=np.float64) for n in weights)
