"""The leaderboard: every model's val and test SRC/MAE, bootstrap intervals, fit time, parameters.

Intervals are recomputed from the saved per-post predictions (``tune/predictions.parquet`` and the
evaluate stage's metadata-only baseline), resampling the test posts with a fixed seed; the same
resamples serve every model, so overlapping intervals are a fair comparison.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import metrics, storage
from smpp_ray.gbdt.output import TuneOutput
from smpp_ray.report.markup import esc, fmt, fmt_seconds, table
from smpp_ray.summary import StageSummary

RESAMPLES = 1000
SEED = 0
#: What ``smpp predict`` scores with unless told ``--score``/``--model`` (see smpp_ray.cli).
PREDICT_DEFAULT = "blend"
BASELINE = "metadata-only baseline"


def read_predictions(tune_dir: str) -> pd.DataFrame | None:
    """``pid, split, label, category, pred_<model>...`` of the tune stage, or None."""
    location = TuneOutput(tune_dir).predictions
    if not storage.is_file(location):
        return None
    import io

    frame = pd.read_parquet(io.BytesIO(storage.read_bytes(location)))
    return frame.assign(pid=frame["pid"].astype(str))


def model_predictions(predictions: pd.DataFrame | None, baseline: dict[str, Any] | None) -> dict[str, pd.DataFrame]:
    """Model -> labelled val/test rows with one ``pred`` column (the baseline included when given)."""
    out: dict[str, pd.DataFrame] = {}
    if predictions is not None:
        rows = predictions[predictions["split"].isin(["val", "test"]) & predictions["label"].notna()]
        for column in [c for c in rows.columns if c.startswith("pred_")]:
            out[column[len("pred_"):]] = rows[["pid", "split", "label", "category"]].assign(pred=rows[column])
    if baseline is not None:
        out[BASELINE] = baseline["predictions"]
    return out


def bootstrap_intervals(y: np.ndarray, predictions: dict[str, np.ndarray], *, resamples: int = RESAMPLES,
                        seed: int = SEED) -> dict[str, dict[str, tuple[float, float]]]:
    """Model -> {"src": (lo, hi), "mae": (lo, hi)}: 2.5 and 97.5 percentiles over paired resamples."""
    n = len(y)
    if n < 3:
        return {m: {"src": (math.nan, math.nan), "mae": (math.nan, math.nan)} for m in predictions}
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # the same posts for every model
    out = {}
    for model, p in predictions.items():
        srcs, maes = [], []
        for block in np.array_split(draws, max(1, resamples * n // 2_000_000)):  # (block, n), bounded memory
            ys, ps = y[block], p[block]
            srcs.append(_rowwise_spearman(ys, ps))
            maes.append(np.abs(ys - ps).mean(axis=1))
        src_all, mae_all = np.concatenate(srcs), np.concatenate(maes)
        src_ci = tuple(np.nanpercentile(src_all, [2.5, 97.5])) if np.isfinite(src_all).any() else (math.nan, math.nan)
        out[model] = {"src": src_ci, "mae": tuple(np.percentile(mae_all, [2.5, 97.5]))}
    return out


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman of each row pair (average ranks for ties, as scipy's spearmanr); NaN for a constant row."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(axis=1) / np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))


def _with_ci(value: float, interval: tuple[float, float]) -> str:
    if not math.isfinite(value if value is not None else math.nan):
        return "-"
    lo, hi = interval
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]" if math.isfinite(lo) else fmt(value)


def _params(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())


def _model_facts(tune_dir: str, tune_summary: StageSummary | None,
                 baseline: dict[str, Any] | None) -> dict[str, dict[str, str]]:
    """Model -> {"time", "params"} cells from search_<family>.json, metrics.json and blend.json."""
    facts: dict[str, dict[str, str]] = {}
    document = _read_json(TuneOutput(tune_dir).metrics) or {}
    for family, best in (document.get("best") or {}).items():
        search = _read_json(TuneOutput(tune_dir).search(family)) or {}
        seconds = search.get("wall_seconds")
        time_cell = fmt_seconds(seconds) + (" (resumed search)" if search.get("restored") else "")
        facts[family] = {"time": time_cell,
                         "params": _params({**(best.get("params") or {}), "rounds": best.get("rounds")})
                         + f" ({fmt(best.get('trials'))} trials)"}
    weights = (document.get("blend") or {}).get("weights") or (
        tune_summary.metrics.get("blend_weights") if tune_summary else None) or {}
    if weights:
        facts["blend"] = {"time": "-", "params": "weights " + ", ".join(f"{k} {fmt(v)}" for k, v in weights.items())
                          + " (chosen on val)"}
    if baseline is not None:
        facts[BASELINE] = {"time": fmt_seconds(baseline.get("fit_seconds")),
                           "params": _params(baseline.get("params") or {}) + " (fixed; metadata features only)"}
    return facts


def _read_json(location: str) -> dict[str, Any] | None:
    import json

    if not storage.is_file(location):
        return None
    # metrics.json may hold NaN (a split without labels); Python's json reads it.
    return json.loads(storage.read_text(location))


def leaderboard_section(tune_dir: str, tune_summary: StageSummary | None, baseline: dict[str, Any] | None,
                        results: pd.DataFrame) -> str:
    per_model = model_predictions(read_predictions(tune_dir), baseline)
    facts = _model_facts(tune_dir, tune_summary, baseline)
    test = {m: f[f["split"] == "test"] for m, f in per_model.items()}
    intervals = {}
    if per_model:
        # Every model scores the same test posts; align on pid so the resamples pair up.
        base = next(iter(test.values()))[["pid", "label"]].reset_index(drop=True)
        aligned = {m: base.merge(t[["pid", "pred"]], on="pid", how="left")["pred"].to_numpy() for m, t in test.items()}
        if all(np.isfinite(a).all() for a in aligned.values()):
            intervals = bootstrap_intervals(base["label"].to_numpy(), aligned)
    rows = []
    for model, frame in per_model.items():
        val, tst = frame[frame["split"] == "val"], frame[frame["split"] == "test"]
        v = metrics.regression_metrics(val["label"].to_numpy(), val["pred"].to_numpy())
        t = metrics.regression_metrics(tst["label"].to_numpy(), tst["pred"].to_numpy())
        ci = intervals.get(model, {"src": (math.nan, math.nan), "mae": (math.nan, math.nan)})
        used = "<b>yes (default)</b>" if model == PREDICT_DEFAULT else (
            f"with <code>--score {esc(model)}</code>" if model != BASELINE else "no")
        rows.append([f"<b>{esc(model)}</b>", fmt(v["src"]), fmt(v["mae"]), esc(_with_ci(t["src"], ci["src"])),
                     esc(_with_ci(t["mae"], ci["mae"])), fmt(t["n"]), esc(facts.get(model, {}).get("time", "-")),
                     esc(facts.get(model, {}).get("params", "-")), used])
    for row in results.itertuples():
        if row.model == BASELINE and BASELINE not in per_model:  # its predictions were not given: test only
            rows.append([f"<b>{esc(row.model)}</b>", "-", "-", esc(fmt(row.src)), esc(fmt(row.mae)), "-", "-",
                         "metadata features only, fixed parameters", "no"])
        elif str(row.model).startswith("oracle"):
            rows.append([esc(row.model), "-", "-", esc(fmt(row.src)), "-", "-", "-",
                         "Spearman of the label against the synthetic corpus's noise-free score: the ceiling",
                         "no"])
    header = ["model", "val SRC", "val MAE", "test SRC [95% CI]", "test MAE [95% CI]", "test posts", "fit time",
              "chosen hyperparameters", "used by smpp predict"]
    notes = (f"<p>Higher SRC (Spearman) and lower MAE are better. Intervals: {RESAMPLES} bootstrap resamples of the "
             f"test posts (seed {SEED}), the same resamples for every model. Fit time of a family is its Tune search "
             "(all trials); the baseline is one fit on train. Val metrics of the families come from the refit on "
             "train only, test metrics from the final model.</p>")
    if baseline is None:
        notes += ("<p>The metadata-only baseline's per-post predictions were not given to the report, so it has "
                  "test numbers only, without intervals.</p>")
    return table(header, rows, raw=True, cls="leaderboard",
                 caption="Results on the test split, with validation for comparison") + notes
