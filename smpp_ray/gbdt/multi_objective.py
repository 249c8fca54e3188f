"""``tune.search_alg: optuna_multi``: Optuna's multi-objective TPE over the two metrics the
challenge ranks, val SRC (maximised) and val MAE (minimised).

A scalar search converges on one trade-off (``tune.objective``'s); this one spreads its trials
along the Pareto front of the two, so the front in the report is well sampled. Which trial and
round become the model is still decided by ``tune.objective`` (:func:`smpp_ray.gbdt.search._summarise`),
and ASHA still stops weak trials by ``val_score``.

Optuna learns from one (SRC, MAE) pair per trial. Tune would hand it the trial's *last* report;
this searcher hands it the trial's *selected* round (:func:`~smpp_ray.gbdt.objective.best_round`,
the round the summary would pick), so what the search learns from is what the trial is worth.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from smpp_ray.gbdt.objective import SCORE, best_round

#: The objectives and their directions, in Optuna's order.
METRICS = ["val_src", "val_mae"]
MODES = ["max", "min"]


class ParetoOptunaSearch(OptunaSearch):
    """:class:`OptunaSearch` on (``val_src``, ``val_mae``) of each trial's selected round.

    Its reports live in ``__dict__``, which OptunaSearch's ``save``/``restore`` pickle, so a
    restored search keeps the reports of trials that were running."""

    def __init__(self, *, seed: int, min_rounds: int = 0) -> None:
        super().__init__(metric=list(METRICS), mode=list(MODES), seed=seed)
        self._min_rounds = min_rounds
        self._reports: dict[str, list[dict[str, float]]] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        # Tune passes its own scalar metric (val_score, for ASHA); the study keeps both of its own.
        return super().set_search_properties(None, None, config, **spec)

    def _record(self, trial_id: str, result: dict[str, Any] | None) -> None:
        if result and SCORE in result:
            reports = self._reports.setdefault(trial_id, [])
            if not reports or reports[-1].get("rounds") != result.get("rounds"):
                reports.append({key: float(result[key]) for key in ("rounds", *METRICS, SCORE) if key in result})

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._record(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        # Tune does not pass a trial's last report (the one that ends it) to on_trial_result,
        # only here: it may be the selected round.
        self._record(trial_id, result)
        chosen = best_round(self._reports.pop(trial_id, []), self._min_rounds)
        if error or chosen is None:
            # A failed trial, or one without a scored round (constant predictions throughout),
            # is no point on the front (the summary leaves both out too). Optuna cannot prune in
            # a multi-objective study, so it is told as failed (told nothing, it would stay
            # "running" in the study for good).
            result, error = None, True
        else:
            result = {**(result or {}), **{key: chosen[key] for key in METRICS}}
        super().on_trial_complete(trial_id, result=result, error=error)
