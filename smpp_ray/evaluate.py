"""The ``evaluate`` stage: the results table and a one-file HTML report of a pipeline folder.

The table puts the tuned models next to two reference points that make the numbers readable:
the oracle SRC (Spearman of the label against the synthetic corpus's noise-free score, i.e. the
best any method can do on these labels) and a metadata-only baseline (LightGBM with default
parameters on user/time/text/geo/category/history features, no network features), so the gain
the network brings is measured, not assumed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray.config import Config
from smpp_ray.gbdt.data import load_feature_manifest, read_split, select_columns
from smpp_ray.metrics import regression_metrics

logger = logging.getLogger(__name__)

METADATA_GROUPS = ("user", "time", "text", "geo", "category", "history")


def metadata_baseline(features_dir: str | Path, seed: int = 0) -> dict[str, float]:
    """Test metrics of a default LightGBM on the non-network features (fit on train)."""
    import lightgbm as lgb

    columns = select_columns(load_feature_manifest(str(features_dir)), METADATA_GROUPS)
    names = [c["name"] for c in columns]
    categorical = [c["name"] for c in columns if c.get("categorical")]
    train, test = read_split(str(features_dir), "train"), read_split(str(features_dir), "test")
    test = test[test["label"].notna()]
    model = lgb.LGBMRegressor(n_estimators=300, learning_rate=0.05, num_leaves=31, random_state=seed,
                              n_jobs=2, verbose=-1)
    model.fit(train[names], train["label"], categorical_feature=categorical or "auto")
    return regression_metrics(test["label"].to_numpy(), model.predict(test[names]))


def oracle_src(raw_dir: Path, test_pids: pd.Series, labels: pd.Series) -> float | None:
    """Spearman of the label against the noise-free score on the test posts (synthetic corpus only)."""
    oracle_file = raw_dir / "oracle.parquet"
    if not oracle_file.is_file():
        return None
    oracle = pd.read_parquet(oracle_file, columns=["pid", "score"])
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


def run_evaluate(config: Config, pipeline_dir: str | Path, stage_run=None) -> dict[str, Any]:
    """Build the results table and ``report/report.html`` from a finished pipeline folder."""
    from smpp_ray.pipeline import pipeline_layout
    from smpp_ray.report import write_report
    from smpp_ray.tracking import log_artifact, log_metrics, tracked_run

    layout = pipeline_layout(pipeline_dir)
    for stage in ("data", "features", "tune"):
        if not (layout[stage] / "summary.json").is_file():
            raise ValueError(f"{str(layout[stage])!r} has no finished {stage} stage; run the pipeline first")
    started = time.time()
    tune_metrics = json.loads((layout["tune"] / "summary.json").read_text())["metrics"]
    baseline = metadata_baseline(layout["features"], seed=config.tune.seed)
    test = read_split(str(layout["features"]), "test")
    test = test[test["label"].notna()]
    oracle = oracle_src(layout["raw"], test["pid"], test["label"])
    table = results_table(tune_metrics, baseline, oracle)
    layout["report"].mkdir(parents=True, exist_ok=True)
    table.to_csv(layout["report"] / "results.csv", index=False)
    report = write_report(layout, table, tracking_uri=stage_run.tracking_uri if stage_run else None)
    final = {f"test_src_{r.model.split()[0]}": r.src for r in table.itertuples()}
    final.update({f"test_mae_{r.model.split()[0]}": r.mae for r in table.itertuples() if np.isfinite(r.mae)})
    if stage_run is not None and stage_run.enabled:
        with tracked_run(stage_run.tracking_uri, stage_run.experiment, "evaluate",
                         parent_run_id=stage_run.parent_run_id, tags={"smpp.stage": "evaluate"}) as run_id:
            log_metrics(stage_run.tracking_uri, run_id, final)
            log_artifact(stage_run.tracking_uri, run_id, report)
    summary = {"stage": "evaluate", "status": "complete", "inputs": {"pipeline": str(pipeline_dir)},
               "metrics": {"table": table.to_dict(orient="records")}, "artifacts": {"report": str(report)},
               "seconds": round(time.time() - started, 2)}
    (layout["report"] / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    tracking_uri = stage_run.tracking_uri if stage_run else None
    return {"table": table, "report": str(report), "final_metrics": final, "tracking_uri": tracking_uri}


def print_results(result: dict[str, Any]) -> None:
    """The end of ``make demo``: the table, the report path, the command that opens MLflow."""
    table: pd.DataFrame = result["table"]
    print("\nTest split (higher SRC is better; lower MAE/MSE is better):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    print(f"\nReport: {Path(result['report']).resolve()}")
    uri = result.get("tracking_uri")
    if uri:
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
