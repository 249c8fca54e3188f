"""The ``evaluate`` stage: the results table and a one-file HTML report of a pipeline folder.

The table puts the tuned models next to two reference points that make the numbers readable:
the oracle SRC (Spearman of the label against the synthetic corpus's noise-free score, i.e. the
best any method can do on these labels) and a metadata-only baseline (LightGBM with default
parameters on user/time/text/geo/category/history features, no network features), so the gain
the network brings is measured, not assumed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.features.manifest import FeatureSet
from smpp_ray.gbdt.data import categorical_columns, read_split, select_columns
from smpp_ray.metrics import regression_metrics
from smpp_ray.summary import require_summary

logger = logging.getLogger(__name__)

METADATA_GROUPS = ("user", "time", "text", "geo", "category", "history", "extra")


def metadata_baseline(features_dir: str, seed: int = 0) -> dict[str, float]:
    """Test metrics of a default LightGBM on the non-network features (fit on train)."""
    predictions = metadata_baseline_predictions(features_dir, seed=seed)["predictions"]
    test = predictions[predictions["split"] == "test"]
    return regression_metrics(test["label"].to_numpy(), test["pred"].to_numpy())


#: The baseline's parameters (LightGBM defaults but for the number of rounds), shown in the report.
BASELINE_PARAMS = {"n_estimators": 300, "learning_rate": 0.05, "num_leaves": 31}


def metadata_baseline_predictions(features_dir: str, seed: int = 0) -> dict[str, Any]:
    """The metadata-only baseline fit on train: ``predictions`` (pid, split, label, category,
    pred over the labelled val and test posts), ``fit_seconds`` and ``params``."""
    import lightgbm as lgb

    manifest = FeatureSet(features_dir).manifest()
    names = select_columns(manifest, METADATA_GROUPS)
    categorical = categorical_columns(manifest, names)
    train = read_split(str(features_dir), "train")
    model = lgb.LGBMRegressor(**BASELINE_PARAMS, random_state=seed, n_jobs=2, verbose=-1)
    started = time.perf_counter()
    model.fit(train[names], train["label"], categorical_feature=categorical or "auto")
    fit_seconds = time.perf_counter() - started
    frames = []
    for split in ("val", "test"):
        rows = read_split(str(features_dir), split)
        rows = rows[rows["label"].notna()]
        frames.append(pd.DataFrame({"pid": rows["pid"].astype(str).to_numpy(), "split": split,
                                    "label": rows["label"].to_numpy(), "category": rows["category"].to_numpy(),
                                    "pred": model.predict(rows[names]) if len(rows) else np.empty(0)}))
    return {"predictions": pd.concat(frames, ignore_index=True), "fit_seconds": fit_seconds,
            "params": dict(BASELINE_PARAMS)}


def oracle_src(raw_dir: str, test_pids: pd.Series, labels: pd.Series) -> float | None:
    """Spearman of the label against the noise-free score on the test posts (synthetic corpus only)."""
    oracle_file = storage.join(raw_dir, "oracle.parquet")
    if not storage.is_file(oracle_file):
        return None
    fs, path = storage.resolve(oracle_file)
    oracle = pq.read_table(path, columns=["pid", "score"], filesystem=fs).to_pandas()
    joined = pd.DataFrame({"pid": test_pids.astype(str).to_numpy(), "label": labels.to_numpy()}).merge(
        oracle.assign(pid=oracle["pid"].astype(str)), on="pid", how="inner", validate="one_to_one")
    return regression_metrics(joined["label"].to_numpy(), joined["score"].to_numpy())["src"]


def results_table(tune_metrics: dict[str, Any], baseline: dict[str, float], oracle: float | None) -> pd.DataFrame:
    """One row per model: test SRC, MAE, MSE (``tune_metrics`` is the tune summary's metrics)."""
    rows = []
    for name in ("lightgbm", "catboost", "blend"):
        values = tune_metrics.get(name)
        if values:
            rows.append({"model": name, "src": values["test_src"], "mae": values["test_mae"],
                         "mse": values["test_mse"]})
    rows.append({"model": "metadata-only baseline", **{k: baseline[k] for k in ("src", "mae", "mse")}})
    if oracle is not None:
        rows.append({"model": "oracle (noise-free score)", "src": oracle, "mae": np.nan, "mse": np.nan})
    return pd.DataFrame(rows)


def evaluate_pipeline(layout: dict[str, str], *, seed: int, tracking_uri: str | None) -> dict[str, Any]:
    """Results table (``report/results.csv``) and ``report/report.html`` of a finished pipeline."""
    from smpp_ray.report import write_report

    for folder, stage in (("data", "prepare"), ("features", "extract"), ("tune", "tune")):
        require_summary(layout[folder], stage)
    tune_metrics = require_summary(layout["tune"], "tune").metrics
    baseline_run = metadata_baseline_predictions(layout["features"], seed=seed)
    baseline_test = baseline_run["predictions"][baseline_run["predictions"]["split"] == "test"]
    baseline = regression_metrics(baseline_test["label"].to_numpy(), baseline_test["pred"].to_numpy())
    test = read_split(layout["features"], "test")
    test = test[test["label"].notna()]
    oracle = oracle_src(layout["raw"], test["pid"], test["label"])
    table = results_table(tune_metrics, baseline, oracle)
    results = storage.write_text(storage.join(layout["report"], "results.csv"), table.to_csv(index=False))
    report = write_report(layout, table, tracking_uri=tracking_uri, baseline=baseline_run)
    # The names the tune stage uses for the same quantities: test_<model>_<metric>
    final = {f"test_{r.model.split()[0]}_src": r.src for r in table.itertuples()}
    final.update({f"test_{r.model.split()[0]}_mae": r.mae for r in table.itertuples() if np.isfinite(r.mae)})
    return {"table": table, "report": report, "results": results, "final_metrics": final}


def load_results(report_dir: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """What :func:`print_results` shows, from a finished evaluate stage's summary."""
    summary = require_summary(report_dir, "evaluate")
    table = pd.DataFrame(summary.metrics["table"])
    table[["src", "mae", "mse"]] = table[["src", "mae", "mse"]].astype(float)  # null (NaN) came back as None
    return {"table": table, "report": summary.artifact("report"),
            "final_metrics": summary.metrics["final"], "tracking_uri": tracking_uri}


def print_results(result: dict[str, Any]) -> None:
    """The end of ``make demo``: the table, the report path, the command that opens MLflow."""
    from smpp_ray.console import out
    from smpp_ray.redact import redact_uri

    table: pd.DataFrame = result["table"]
    lines = ["", "Test split (higher SRC is better; lower MAE/MSE is better):",
             table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"),
             "", f"Report: {result['report']}"]
    uri = result.get("tracking_uri")
    if uri:
        runs_page = _runs_page(uri, result.get("mlflow_run_id"))
        if uri.startswith(("http://", "https://")):
            lines.append(f"MLflow UI: {redact_uri(uri)}{runs_page}")
        else:
            lines.append(f"MLflow UI: mlflow ui --backend-store-uri {redact_uri(uri)} --host 127.0.0.1 --port 5000")
            if runs_page:
                lines.append(f"           then open http://127.0.0.1:5000{runs_page}")
    out("\n".join(lines))


def _runs_page(tracking_uri: str, run_id: str | None) -> str:
    """The UI path of the run's experiment on its runs table: MLflow 3 opens an experiment on its
    GenAI overview unless the page asks for the model-training view."""
    if not run_id:
        return ""
    from smpp_ray.tracking import client

    try:
        experiment = client(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # the line is a convenience: an unreachable store must not fail the run
        return ""
    return f"/#/experiments/{experiment}/runs?workflowType=machine_learning"
