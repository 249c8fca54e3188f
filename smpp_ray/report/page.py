"""Assemble the sections into ``report/report.html`` (one self-contained file: PNGs and JPEG
thumbnails embedded as base64, no scripts, no external assets)."""

from __future__ import annotations

import base64
import logging
from typing import Any

import pandas as pd

from smpp_ray import storage
from smpp_ray.data.dataset import Dataset
from smpp_ray.gbdt.output import TuneOutput
from smpp_ray.report import facts, leaderboard, markup, plots, posts
from smpp_ray.report.data_summary import data_section
from smpp_ray.report.markup import esc, fmt, img, note, page, section
from smpp_ray.report.network import network_section
from smpp_ray.report.search import search_section
from smpp_ray.summary import StageSummary

logger = logging.getLogger(__name__)

#: (anchor, navigation title) of every section, in page order; the browser test checks them.
SECTIONS = (("run-facts", "Run facts"), ("leaderboard", "Leaderboard"), ("search", "Hyperparameter search"),
            ("residuals", "Residuals and calibration"),
            ("per-category", "Error per category"), ("worst-posts", "Worst-predicted posts"),
            ("network", "Confusion of the subcategory proxy"), ("training", "Training"), ("data", "Data"))


def write_report(layout: dict[str, str], table: pd.DataFrame, tracking_uri: str | None = None, *,
                 baseline: dict[str, Any] | None = None) -> str:
    """Write ``report/report.html`` from the pipeline folders in ``layout``; return its location.

    ``table`` is the evaluate stage's results table (its oracle row is shown); ``baseline`` is
    :func:`smpp_ray.evaluate.metadata_baseline_predictions` (None: no baseline is drawn)."""
    summaries = facts.stage_summaries(layout)
    manifest = Dataset(layout["data"]).manifest()
    predictions = leaderboard.model_predictions(leaderboard.read_predictions(layout["tune"]), baseline)
    test = {m: f[f["split"] == "test"] for m, f in predictions.items()}
    shown = {m: test[m] for m in (leaderboard.PREDICT_DEFAULT, leaderboard.BASELINE) if m in test and len(test[m])}
    titles = dict(SECTIONS)
    body = {
        "run-facts": facts.facts_section(layout, summaries, tracking_uri),
        "leaderboard": leaderboard.leaderboard_section(layout["tune"], summaries.get("tune"), baseline, table),
        "search": search_section(layout["tune"], summaries.get("tune")),
        "residuals": _residuals(shown),
        "per-category": _per_category(shown),
        "worst-posts": posts.worst_posts_html(layout["data"], test[leaderboard.PREDICT_DEFAULT],
                                              leaderboard.PREDICT_DEFAULT)
        if len(test.get(leaderboard.PREDICT_DEFAULT, [])) else "<p>No labelled test predictions.</p>",
        "network": network_section(layout["features"], manifest.taxonomy)
        if "extract" in summaries and summaries["extract"].inputs.get("checkpoint") else
        "<p>The features were extracted without a network checkpoint.</p>",
        "training": _training(summaries.get("train"), layout["tune"]),
        "data": data_section(layout["data"], manifest),
    }
    html_page = page("smpp_ray pipeline report", SECTIONS,
                     [section(anchor, titles[anchor], body[anchor]) for anchor, _ in SECTIONS])
    out = storage.write_text(storage.join(layout["report"], "report.html"), html_page)
    logger.info("report written to %s", out)
    return out


def _residuals(shown: dict[str, pd.DataFrame]) -> str:
    if not shown:
        return "<p>No labelled test predictions.</p>"
    missing = "" if leaderboard.BASELINE in shown else note(
        "No metadata-only baseline predictions were available, so only the blend is drawn.")
    return (f"<p>{esc(' and '.join(shown))} on the labelled test posts. Calibration bins the posts by predicted "
            "decile and plots the mean true label against the mean prediction; on the dashed line the model's "
            "level is right, above it the model under-predicts.</p>" + missing
            + img(plots.residuals_and_calibration(shown), "residuals and calibration"))


def _per_category(shown: dict[str, pd.DataFrame]) -> str:
    if not shown:
        return "<p>No labelled test predictions.</p>"
    first = next(iter(shown.values()))
    frame = pd.DataFrame({m: (f["pred"] - f["label"]).abs().groupby(f["category"]).mean() for m, f in shown.items()})
    frame["posts"] = first.groupby("category").size()
    frame = frame.sort_values("posts", ascending=False)
    rows = [[c, fmt(int(r["posts"]))] + [fmt(r[m]) for m in shown] for c, r in frame.iterrows()]
    return (img(plots.per_category_error(frame), "MAE per category")
            + markup.table(["category", "test posts"] + [f"MAE {m}" for m in shown], rows))


def _training(train: StageSummary | None, tune_dir: str) -> str:
    parts = []
    if train:
        metrics = train.metrics
        history = metrics.get("history") or []
        rows = [[fmt(h.get("epoch")), fmt(h.get("train_loss")), fmt(h.get("val_loss")), fmt(h.get("val_top1")),
                 fmt(h.get("val_top1_cat")), fmt(h.get("samples_per_s")), fmt(h.get("data_wait_fraction"))]
                for h in history]
        parts.append(f"<p>Prompt tuning: epochs run {fmt(metrics.get('epochs_run'))}, best epoch "
                     f"{fmt(metrics.get('best_epoch'))} (0-based, as the logs number them), "
                     f"{fmt(metrics.get('resumes'))} resumes, stopped early: {fmt(metrics.get('stopped_early'))}.</p>")
        curves = plots.training_curves(history)
        if curves:
            parts.append(img(curves, "training curves"))
        if rows:
            parts.append(markup.table(["epoch (0-based)", "train loss", "val loss", "val top-1 (subcategory)", "val top-1 (category)",
                                "samples/s", "input wait share"], rows))
    else:
        parts.append("<p>No train stage summary.</p>")
    importance = TuneOutput(tune_dir).plot("feature_importance")
    if storage.is_file(importance):
        parts.append("<h3>GBDT feature importance (tune stage)</h3>"
                     + img(base64.b64encode(storage.read_bytes(importance)).decode(), "feature importance",
                           cls="plot narrow"))
    return "\n".join(parts)
