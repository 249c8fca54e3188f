"""PNG plots of the tune stage (matplotlib, Agg backend: no display needed), written to any
location (rendered in memory, then one write through :mod:`smpp_ray.storage`)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import storage
from smpp_ray.features.manifest import GROUPS

GROUP_COLOURS = dict(zip(GROUPS, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
                              "#8c8c8c", "#ccb974", "#64b5cd"), strict=True))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, location: str) -> str:
    """Render ``fig`` as PNG to ``location`` and close it; returns the location."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    _pyplot().close(fig)
    return storage.write_bytes(location, buffer.getvalue())


def plot_pred_vs_true(predictions: pd.DataFrame, models: list[str], split: str, location: str) -> str:
    """Scatter of predicted against true popularity, one panel per model, with the diagonal."""
    plt = _pyplot()
    rows = predictions[(predictions["split"] == split) & predictions["label"].notna()]
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), squeeze=False)
    low, high = rows["label"].min(), rows["label"].max()
    for ax, model in zip(axes[0], models, strict=True):
        ax.scatter(rows["label"], rows[f"pred_{model}"], s=4, alpha=0.4)
        ax.plot([low, high], [low, high], color="black", linewidth=1)
        ax.set(title=f"{model} ({split})", xlabel="true popularity", ylabel="predicted")
    fig.tight_layout()
    return _save(fig, location)


def plot_mae_per_category(per_category: dict[str, dict[str, dict[str, float]]], split: str, location: str) -> str:
    """Grouped bars: MAE of each model per category."""
    plt = _pyplot()
    models = list(per_category)
    categories = sorted({c for values in per_category.values() for c in values})
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(categories) + 2), 4))
    for index, model in enumerate(models):
        values = [per_category[model].get(c, {}).get("mae", np.nan) for c in categories]
        ax.bar(np.arange(len(categories)) + index * width, values, width, label=model)
    ax.set_xticks(np.arange(len(categories)) + width * (len(models) - 1) / 2, categories, rotation=30, ha="right")
    ax.set(ylabel="MAE", title=f"MAE per category ({split})")
    ax.legend()
    fig.tight_layout()
    return _save(fig, location)


def plot_importance(importance: dict[str, dict[str, float]], groups: dict[str, str], location: str, top: int = 30) -> str:
    """Top ``top`` features of each model by importance share, coloured by feature group."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    shown = min(top, max(len(v) for v in importance.values()))
    fig, axes = plt.subplots(1, len(importance), figsize=(6 * len(importance), 0.3 * shown + 2.5), squeeze=False)
    for ax, (model, values) in zip(axes[0], importance.items(), strict=True):
        ranked = sorted(values.items(), key=lambda kv: kv[1], reverse=True)[:top][::-1]
        ax.barh([name for name, _ in ranked], [v for _, v in ranked],
                color=[GROUP_COLOURS.get(groups.get(name, ""), "grey") for name, _ in ranked])
        ax.set(title=f"{model}: top {len(ranked)} features", xlabel="share of importance")
    present = sorted({groups.get(n, "") for v in importance.values() for n in v})
    fig.legend(handles=[Patch(color=GROUP_COLOURS.get(g, "grey"), label=g) for g in present],
               loc="upper center", ncol=len(present), title="feature group")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, location)


def plot_deciles(per_decile: dict[str, list[dict[str, float]]], split: str, location: str) -> str:
    """SRC and MAE within each popularity decile of the true label (tail behaviour)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model, rows in per_decile.items():
        deciles = [r["decile"] for r in rows]
        axes[0].plot(deciles, [r["src"] for r in rows], marker="o", label=model)
        axes[1].plot(deciles, [r["mae"] for r in rows], marker="o", label=model)
    axes[0].set(title=f"SRC per popularity decile ({split})", xlabel="decile of true popularity", ylabel="SRC")
    axes[1].set(title=f"MAE per popularity decile ({split})", xlabel="decile of true popularity", ylabel="MAE")
    axes[0].legend()
    fig.tight_layout()
    return _save(fig, location)


def write_plots(predictions: pd.DataFrame, evaluation: dict[str, Any], importance: dict[str, dict[str, float]],
                groups: dict[str, str], models: list[str], out_dir: str) -> dict[str, str]:
    """All plots of the stage into ``out_dir`` (any location), on test when it has labels, else on val."""
    split = "test" if evaluation["overall"]["test"][models[0]]["n"] > 0 else "val"
    return {
        "pred_vs_true": plot_pred_vs_true(predictions, models, split, storage.join(out_dir, "pred_vs_true.png")),
        "mae_per_category": plot_mae_per_category(evaluation["per_category"][split], split,
                                                  storage.join(out_dir, "mae_per_category.png")),
        "feature_importance": plot_importance(importance, groups, storage.join(out_dir, "feature_importance.png")),
        "deciles": plot_deciles(evaluation["per_decile"][split], split, storage.join(out_dir, "deciles.png")),
    }
