"""metrics.json: SRC, MAE and MSE per model and for the blend, per split, category and decile."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from smpp_ray import metrics

EVAL_SPLITS = ("val", "test")


def evaluate_predictions(predictions: pd.DataFrame, models: list[str]) -> dict[str, Any]:
    """Metrics of ``pred_<model>`` columns over the labelled rows of the val and test splits.

    ``{"overall": {split: {model: {src, mae, mse, n}}}, "per_category": {split: {model: {cat: ...}}},
    "per_decile": {split: {model: [...]}}}``; a split without labels has ``n == 0``.
    """
    out: dict[str, Any] = {"overall": {}, "per_category": {}, "per_decile": {}}
    for split in EVAL_SPLITS:
        rows = predictions[(predictions["split"] == split) & predictions["label"].notna()]
        y = rows["label"].to_numpy()
        out["overall"][split] = {m: metrics.regression_metrics(y, rows[f"pred_{m}"].to_numpy()) for m in models}
        out["per_category"][split] = {m: metrics.grouped_metrics(y, rows[f"pred_{m}"].to_numpy(),
                                                                  rows["category"].to_numpy()) for m in models}
        out["per_decile"][split] = {m: metrics.decile_metrics(y, rows[f"pred_{m}"].to_numpy()) for m in models}
    return out


def summary_metrics(evaluation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{model: {val_src, val_mae, val_mse, test_src, ...}}`` (the stage summary's shape)."""
    out: dict[str, dict[str, float]] = {}
    for split, per_model in evaluation["overall"].items():
        for model, values in per_model.items():
            for name in ("src", "mae", "mse"):
                out.setdefault(model, {})[f"{split}_{name}"] = values[name]
    return out


def _metric_name(text: str) -> str:
    # MLflow metric names allow letters, digits, _ - . space : / only (SMPD names hold '&').
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", text)


def mlflow_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """Flat metric names for the stage run: ``test_blend_src``, ``val_lightgbm_mae/Animal``, ..."""
    flat: dict[str, float] = {}
    for split, per_model in evaluation["overall"].items():
        for model, values in per_model.items():
            for name in ("src", "mae", "mse"):
                flat[f"{split}_{model}_{name}"] = values[name]
    for split, per_model in evaluation["per_category"].items():
        for model, per_cat in per_model.items():
            for category, values in per_cat.items():
                for name in ("src", "mae"):
                    flat[_metric_name(f"{split}_{model}_{name}/{category}")] = values[name]
    return flat
