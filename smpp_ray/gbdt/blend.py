"""Blending the families: a convex weight chosen on the validation split by ``tune.objective``,
and the rank-preserving calibrators (:mod:`smpp_ray.gbdt.calibration`) of each family's score
and of the blend, fitted on the same split where they lower its held-out MAE."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smpp_ray import metrics, storage
from smpp_ray.gbdt.calibration import MonotoneCalibrator, fit_if_it_helps
from smpp_ray.gbdt.objective import Objective
from smpp_ray.summary import json_safe


@dataclass(frozen=True)
class Blend:
    """The blend's weights over the families' raw scores and the calibrator of each model's score
    (``calibrators[family]`` and ``calibrators["blend"]``; identity when calibration is off)."""

    weights: dict[str, float]
    calibrators: dict[str, MonotoneCalibrator]
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model, the held-out check that decided its calibrator (``fit_if_it_helps``'s figures)."""

    def raw(self, raw_scores: dict[str, np.ndarray]) -> np.ndarray:
        """The weighted sum of the families' raw scores."""
        return apply_weights(raw_scores, self.weights)

    def score(self, model: str, raw_scores: dict[str, np.ndarray]) -> np.ndarray:
        """The calibrated score of ``model`` (a family or ``blend``) from the families' raw scores."""
        raw = self.raw(raw_scores) if model == "blend" else np.asarray(raw_scores[model], dtype=np.float64)
        return self.calibrators.get(model, MonotoneCalibrator())(raw)


#: The tune output's file this module owns: ``weights``, ``calibration`` (model -> calibrator),
#: ``objective``, ``chosen_on``, ``rounds``, ``refit_on``.


def write_blend(location: str, blend: Blend, *, objective: str, rounds: dict[str, int], refit_on: str) -> str:
    calibration = {model: c.to_dict() for model, c in blend.calibrators.items() if not c.is_identity}
    return storage.write_json(location, {"weights": blend.weights, "calibration": calibration,
                                         "calibration_check": json_safe(blend.checks), "objective": objective,
                                         "chosen_on": "val", "rounds": rounds, "refit_on": refit_on}, indent=1)


def read_blend(location: str) -> Blend:
    """The blend :func:`write_blend` wrote (a blend.json without ``calibration``: identity maps)."""
    values: dict[str, Any] = storage.read_json(location)
    calibration = values.get("calibration") or {}
    try:
        calibrators = {model: MonotoneCalibrator.from_dict(c) for model, c in calibration.items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{location}: a calibrator is damaged ({err})") from err
    return Blend({f: float(w) for f, w in values["weights"].items()}, calibrators)


def choose_blend(y: np.ndarray, raw_scores: dict[str, np.ndarray], objective: Objective, *, calibrate: bool,
                 step: float = 0.05) -> Blend:
    """Weights (summing to 1) that maximise ``objective`` of the blend on ``y`` (ties: the lower
    MAE), then, with ``calibrate``, each model's and the blend's calibrator where it helps.

    One family gets weight 1. Two search ``w * first + (1 - w) * second`` over a grid of ``step``.
    The weight is chosen on the raw scores: a calibrator fitted on the same split would score
    every candidate in-sample.
    """
    names = list(raw_scores)
    if len(names) not in (1, 2):
        raise ValueError(f"blending supports one or two families, got {names!r}")
    y = np.asarray(y, dtype=np.float64)
    raw = {name: np.asarray(raw_scores[name], dtype=np.float64) for name in names}
    weights = {names[0]: 1.0}
    if len(names) == 2:
        best: tuple[float, float, float] | None = None
        for w in np.round(np.arange(0.0, 1.0 + 1e-9, step), 6):
            blended = w * raw[names[0]] + (1 - w) * raw[names[1]]
            key = (objective.of(y, blended), -metrics.mae(y, blended))
            if best is None or key > best[:2]:
                best = (*key, float(w))
        assert best is not None
        weights = {names[0]: best[2], names[1]: round(1.0 - best[2], 6)}
    scores = {**raw, "blend": apply_weights(raw, weights)}
    calibrators: dict[str, MonotoneCalibrator] = {}
    checks: dict[str, dict[str, Any]] = {}
    if calibrate:
        for model, values in scores.items():
            calibrators[model], checks[model] = fit_if_it_helps(values, y)
    return Blend(weights, calibrators, checks)


def apply_weights(preds: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted sum of the families' predictions."""
    return sum(weights[n] * np.asarray(preds[n], dtype=np.float64) for n in weights)
