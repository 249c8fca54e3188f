"""One self-contained HTML report (PNGs embedded as base64) of a finished pipeline."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.data.manifest import load_manifest
from smpp_ray.summary import read_summary

logger = logging.getLogger(__name__)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def _training_curves(train_summary: dict[str, Any] | None, tracking_uri: str | None) -> str | None:
    """Per-epoch train/val loss and val top-1, read back from the train stage's MLflow run."""
    if not train_summary or not tracking_uri or not train_summary.get("mlflow_run_id"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smpp_ray.tracking import client

    c = client(tracking_uri)
    run_id = train_summary["mlflow_run_id"]
    series = {}
    for key in ("train_loss", "val_loss", "val_top1", "val_top1_cat"):
        history = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            series[key] = ([m.step for m in history], [m.value for m in history])
    if not series:
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("train_loss", "val_loss"):
        if key in series:
            loss_ax.plot(*series[key], marker="o", label=key)
    for key in ("val_top1", "val_top1_cat"):
        if key in series:
            acc_ax.plot(*series[key], marker="o", label=key)
    loss_ax.set(xlabel="epoch", title="loss")
    acc_ax.set(xlabel="epoch", title="validation top-1 (77 and 11 way)")
    loss_ax.legend()
    acc_ax.legend()
    return _png(fig)


def _confusion(features_dir: str, taxonomy_size: int) -> str | None:
    """Row-normalised confusion of the 77-way proxy on the test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, path = storage.resolve(storage.join(features_dir, "split=test"))
    test = pq.read_table(path, columns=["subcategory_code", "net_pred_subcategory"], filesystem=fs).to_pandas()
    if test.empty:
        return None
    y, p = test["subcategory_code"].to_numpy(), test["net_pred_subcategory"].to_numpy()
    keep = (y >= 0) & (p >= 0)
    matrix = np.zeros((taxonomy_size, taxonomy_size))
    np.add.at(matrix, (y[keep].astype(int), p[keep].astype(int)), 1)
    matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    ax.set(xlabel="predicted subcategory", ylabel="true subcategory",
           title=f"77-way proxy on test (accuracy {np.mean(y[keep] == p[keep]):.3f})")
    fig.colorbar(image, ax=ax)
    return _png(fig)


def write_report(layout: dict[str, str], table: pd.DataFrame, tracking_uri: str | None = None) -> str:
    """Write ``report/report.html`` and return its location."""
    manifest = load_manifest(layout["data"])
    sections: list[str] = []
    counts = manifest.get("counts", {})
    sections.append("<h2>Results on the test split</h2>" + table.to_html(index=False, float_format="%.4f",
                                                                         na_rep="-", border=0))
    sections.append("<h2>Data</h2><pre>" + html.escape(json.dumps(
        {"counts": counts, "split": manifest.get("split"), "time_range": manifest.get("time_range")},
        indent=2, default=str)) + "</pre>")
    train_summary = read_summary(layout["train"])
    if train_summary:
        sections.append("<h2>Prompt tuning</h2><pre>" + html.escape(json.dumps(
            train_summary.get("metrics", {}), indent=2, default=str)) + "</pre>")
    curves = _training_curves(train_summary, tracking_uri)
    if curves:
        sections.append(_img(curves, "training curves"))
    network = (read_summary(layout["features"]) or {}).get("inputs", {}).get("checkpoint")
    confusion = _confusion(layout["features"], len(manifest["taxonomy"]["subcategories"])) if network else None
    if confusion:
        sections.append("<h2>Confusion of the 77-way proxy</h2>" + _img(confusion, "confusion"))
    for png in storage.list_files(layout["tune"], suffix=".png"):
        title = storage.name(png)[: -len(".png")].replace("_", " ")
        data = base64.b64encode(storage.read_bytes(png)).decode()
        sections.append(f"<h2>{html.escape(title)}</h2>" + _img(data, title))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>smpp_ray report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{padding:4px 10px;border-bottom:1px solid #ddd}img{max-width:100%}</style></head><body>"
            "<h1>smpp_ray pipeline report</h1>" + "\n".join(sections) + "</body></html>")
    out = storage.write_text(storage.join(layout["report"], "report.html"), page)
    logger.info("report written to %s", out)
    return out
