"""What the search, the best round, the best trial and the blend weights optimise on validation.

The SMP Challenge ranks a team by its rank on SRC plus its rank on MAE. A rank needs the other
teams, so the search optimises a scalar proxy that weights the two equally on comparable scales:

- ``src``: Spearman's rank correlation (higher is better);
- ``mae``: the MAE skill, ``1 - MAE / MAE_0``, where ``MAE_0`` is the validation MAE of
  predicting the training labels' median for every post (0: no better than the constant, 1:
  perfect);
- ``src+mae`` (default): the mean of the two. A round whose predictions barely leave the mean
  ranks well by SRC but has an MAE skill near 0, so it no longer wins.

Every value is "higher is better", so Tune's metric (``val_score``), ASHA and the search
algorithm take it as it is. Beside the one choice, :func:`pareto_front` keeps the trials no other
trial beats on both metrics, for the report and MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from smpp_ray import metrics

OBJECTIVES = ("src", "mae", "src+mae")
ObjectiveName = Literal["src", "mae", "src+mae"]

#: The value trials report and the search maximises.
SCORE = "val_score"


@dataclass(frozen=True)
class Objective:
    """``name`` and the constant predictor's validation MAE that scales the MAE skill."""

    name: str
    mae_baseline: float

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown tune.objective {self.name!r}; expected one of {', '.join(OBJECTIVES)}")

    @classmethod
    def for_labels(cls, name: str, train_labels: np.ndarray, val_labels: np.ndarray) -> Objective:
        """The objective with ``MAE_0`` of the training median on ``val_labels``."""
        train_labels = np.asarray(train_labels, dtype=np.float64)
        val_labels = np.asarray(val_labels, dtype=np.float64)
        baseline = metrics.mae(val_labels, np.full_like(val_labels, np.median(train_labels)))
        return cls(name, float(baseline) if baseline > 0 else 1.0)

    def mae_skill(self, mae: float) -> float:
        return 1.0 - mae / self.mae_baseline

    def score(self, src: float, mae: float) -> float:
        """The scalar to maximise; NaN when the MAE it needs is NaN.

        An undefined SRC counts as 0, no rank skill: it is undefined when the predictions are
        constant (a model whose trees have not split yet, early rounds on a small split), and such
        a round must still be comparable with the others rather than leave a trial unscored."""
        rank = float(src) if np.isfinite(src) else 0.0
        if self.name == "src":
            return rank
        if self.name == "mae":
            return self.mae_skill(mae)
        return 0.5 * (rank + self.mae_skill(mae))

    def of(self, labels: np.ndarray, predictions: np.ndarray) -> float:
        """The objective of ``predictions`` against ``labels``."""
        return self.score(metrics.src(labels, predictions), metrics.mae(labels, predictions))


def best_round(reports: list[dict[str, float]], min_rounds: int = 0) -> dict[str, float] | None:
    """The report with the highest finite ``val_score`` among rounds >= ``min_rounds`` (among all
    rounds when no report reached it: a trial ASHA stopped early still has a best round); ties go
    to the earlier round (fewer trees). None when no report has a finite score."""
    scored = [r for r in reports if np.isfinite(r.get(SCORE, np.nan))]
    eligible = [r for r in scored if r["rounds"] >= min_rounds] or scored
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r[SCORE], -r["rounds"]))


def dominates(a: dict[str, float], b: dict[str, float]) -> bool:
    """``a`` is at least as good as ``b`` on both challenge metrics (SRC higher, MAE lower) and
    strictly better on one."""
    return (a["val_src"] >= b["val_src"] and a["val_mae"] <= b["val_mae"]
            and (a["val_src"] > b["val_src"] or a["val_mae"] < b["val_mae"]))


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point dominates (:func:`dominates`), by SRC from highest: the trade-off
    between the two metrics the challenge ranks, which one scalar objective hides. Points with a
    non-finite SRC or MAE are left out; of exact duplicates the first is kept."""
    finite = [p for p in points if np.isfinite(p["val_src"]) and np.isfinite(p["val_mae"])]
    front: list[dict[str, Any]] = []
    for point in sorted(finite, key=lambda p: (-p["val_src"], p["val_mae"])):
        # Sorted by SRC descending (MAE ascending on ties), a point is on the front exactly when
        # its MAE is below every MAE kept so far.
        if not front or point["val_mae"] < front[-1]["val_mae"]:
            front.append(point)
    return front
