"""The report's figures (matplotlib, Agg): residuals, calibration, per-category error, confusion,
training curves. Each returns base64 PNG sized to read at 1400 px (figures ~12 in at 110 dpi)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from smpp_ray.report.markup import png_of

WIDE = (12, 4.6)
COLOURS = {"blend": "#1f77b4", "lightgbm": "#2ca02c", "catboost": "#ff7f0e", "metadata-only baseline": "#7f7f7f"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def residuals_and_calibration(test: dict[str, pd.DataFrame]) -> str:
    """Left: histogram of predicted - true; right: mean true vs mean predicted per predicted decile."""
    plt = _pyplot()
    fig, (hist_ax, cal_ax) = plt.subplots(1, 2, figsize=WIDE)
    residuals = {m: (f["pred"] - f["label"]).to_numpy() for m, f in test.items()}
    everything = np.concatenate(list(residuals.values()))
    bins = np.linspace(everything.min(), everything.max(), 31) if len(everything) else 10
    lows, highs = [], []
    for model, frame in test.items():
        colour = COLOURS.get(model)
        hist_ax.hist(residuals[model], bins=bins, histtype="step", linewidth=2, color=colour,
                     label=f"{model} (mean {residuals[model].mean():+.3g})")
        mean_pred, mean_true = decile_calibration(frame["label"].to_numpy(), frame["pred"].to_numpy())
        cal_ax.plot(mean_pred, mean_true, marker="o", color=colour, label=model)
        lows += [mean_pred.min(initial=np.inf), mean_true.min(initial=np.inf)]
        highs += [mean_pred.max(initial=-np.inf), mean_true.max(initial=-np.inf)]
    hist_ax.axvline(0, color="black", linewidth=1)
    hist_ax.set(xlabel="residual: predicted - true (log views)", ylabel="test posts",
                title="Residuals on the test split")
    hist_ax.legend(fontsize=10)
    if lows:
        lo, hi = min(lows), max(highs)
        cal_ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    cal_ax.set(xlabel="mean predicted (per predicted decile)", ylabel="mean true",
               title="Calibration by predicted decile (test)")
    cal_ax.legend(fontsize=10)
    return png_of(fig)


def decile_calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(mean predicted, mean true) per quantile bin of the *prediction*, lowest first."""
    if len(y) == 0:
        return np.empty(0), np.empty(0)
    chunks = [c for c in np.array_split(np.argsort(p, kind="stable"), min(bins, len(y))) if len(c)]
    return np.array([p[c].mean() for c in chunks]), np.array([y[c].mean() for c in chunks])


def per_category_error(per_category: pd.DataFrame) -> str:
    """Horizontal bars of MAE per category (rows: category, most posts on top; columns: model MAEs
    and ``posts``), the post count in each label."""
    plt = _pyplot()
    models = [c for c in per_category.columns if c != "posts"]
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(per_category) * max(len(models), 1) + 1.5))
    y = np.arange(len(per_category))[::-1]
    height = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        ax.barh(y + ((len(models) - 1) / 2 - i) * height, per_category[model], height, label=model,
                color=COLOURS.get(model))
    ax.set_yticks(y, [f"{c} (n={n})" for c, n in zip(per_category.index, per_category["posts"], strict=True)])
    ax.set(xlabel="MAE (log views)", title="Test MAE per category (n = test posts)")
    ax.legend(fontsize=10, loc="lower right")
    return png_of(fig)


def category_confusion(matrix: np.ndarray, names: list[str]) -> str:
    """Row-normalised 11 x 11 confusion with the count in each non-empty cell."""
    plt = _pyplot()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(10, 8.5))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=10,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.grid(False)
    ax.set(xlabel="predicted category", ylabel="true category",
           title="Network's category on test (colour: share of the true row; numbers: posts)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return png_of(fig)


def training_curves(history: list[dict[str, Any]]) -> str | None:
    """Loss and validation accuracy per epoch, epochs 0-based as the training logs number them."""
    if not history:
        return None
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=WIDE)
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=label)
    for key, label in (("val_top1", "val top-1 (subcategories)"), ("val_top1_cat", "val top-1 (categories)")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            acc_ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=label)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch (0-based, as the logs say)")
        ax.set_xticks(sorted(set(epochs)))
        ax.legend(fontsize=10)
    loss_ax.set_title("Loss")
    acc_ax.set(title="Validation accuracy", ylim=(0, 1))
    return png_of(fig)


def search_front(trials: list[dict[str, Any]], front: list[dict[str, Any]], chosen: str | None) -> str:
    """Every trial's selected round as val SRC (x) against val MAE (y), the Pareto front joined,
    the chosen trial starred; the better corner is bottom right."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    scored = [t for t in trials if "best_val_src" in t]
    ax.scatter([t["best_val_src"] for t in scored], [t["best_val_mae"] for t in scored], s=18, color="#9e9e9e",
               label=f"trials ({len(scored)})")
    ax.plot([p["val_src"] for p in front], [p["val_mae"] for p in front], marker="o", color="#1f77b4",
            label=f"Pareto front ({len(front)})")
    best = [t for t in scored if t["trial_id"] == chosen]
    if best:
        ax.scatter([best[0]["best_val_src"]], [best[0]["best_val_mae"]], marker="*", s=260, color="#d62728",
                   zorder=3, label="chosen (tune.objective)")
    ax.set(xlabel="val SRC (higher is better)", ylabel="val MAE (lower is better)",
           title="Each trial at its selected round")
    ax.legend(fontsize=10)
    return png_of(fig)
