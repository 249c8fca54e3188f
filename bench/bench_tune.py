"""Tune overhead and MLflow cost of the tune stage, against running the same trials back to back.

Tune overhead = 1 - sum(trial time) / (concurrency * search wall time): the share of the
search's slot-time not spent inside trials (actor start-up, scheduling, result handling, the
driver-side MLflow callback). Goal: <= 5% for ~30 s trials. Trials are LightGBM fits of the
synthetic features sized to take about ``--trial-seconds`` each (rounds calibrated in-process,
ASHA grace = max rounds so no trial is cut short). Two searches: sequential (1 trial at a time)
and 2 concurrent, both tracked in a SQLite MLflow store; MLflow time (trial runs, model logging
and registration, stage metrics) is reported as a share of the stage.

    python bench/bench_tune.py                      # ~30 s trials, 4 per search (several minutes)
    python bench/bench_tune.py --quick --out x.md   # 2 s trials, checks that the bench works
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from smpp_ray.config import TuneConfig  # noqa: E402
from smpp_ray.gbdt import tune_models  # noqa: E402
from smpp_ray.gbdt.data import load_splits  # noqa: E402
from smpp_ray.gbdt.spaces import fixed_params  # noqa: E402
from smpp_ray.gbdt.synthetic import write_synthetic_features  # noqa: E402
from smpp_ray.gbdt.trainables import fit_model  # noqa: E402
from smpp_ray.runtime import init_ray  # noqa: E402
from smpp_ray.tracking import TrackingContext, create_run, end_run  # noqa: E402

logger = logging.getLogger("bench_tune")


def calibrate_rounds(features: Path, trial_seconds: float) -> int:
    """Boosting rounds that take about ``trial_seconds`` with mid-range hyperparameters on 1 thread."""
    spec, data = load_splits(str(features), splits=("train", "val"))
    params = {**fixed_params("lightgbm", seed=0, threads=1), "num_leaves": 48, "learning_rate": 0.05}
    timings = {}
    for probe in (20, 80):  # two lengths: the difference removes the fixed cost (binning the data)
        started = time.perf_counter()
        fit_model("lightgbm", params, probe, data["train"].X, data["train"].y, spec.categorical,
                  valid=(data["val"].X, data["val"].y))
        timings[probe] = time.perf_counter() - started
    per_round = max(1e-4, (timings[80] - timings[20]) / 60)
    fixed = max(0.0, timings[20] - 20 * per_round)
    return max(10, int((trial_seconds - fixed) / per_round))


def trial_seconds_sum(experiment_path: str) -> tuple[float, int]:
    """Sum of the trials' own wall time (Tune's ``time_total_s`` of their last report)."""
    total, count = 0.0, 0
    for progress in Path(experiment_path).glob("*/progress.csv"):
        with open(progress) as f:
            rows = list(csv.DictReader(f))
        if rows:
            total += float(rows[-1]["time_total_s"])
            count += 1
    return total, count


def run_scenario(features: Path, root: Path, *, concurrency: int, trials: int, rounds: int) -> dict:
    uri = f"sqlite:///{root / 'mlruns.db'}"
    stage = create_run(uri, "bench", f"tune-c{concurrency}")
    config = TuneConfig(models=("lightgbm",), num_samples=trials, max_rounds=rounds, grace_rounds=rounds,
                        max_concurrent_trials=concurrency, cpus_per_trial=1.0, search_alg="random",
                        registered_model_prefix=f"bench-c{concurrency}")
    started = time.perf_counter()
    result = tune_models(features, root / f"out-c{concurrency}", tune_config=config,
                         tracking=TrackingContext(uri, "bench", stage))
    stage_s = time.perf_counter() - started
    end_run(uri, stage)
    search = result["search"]["lightgbm"]
    busy, count = trial_seconds_sum(search["experiment_path"])
    return {"concurrency": concurrency, "trials": count, "rounds": rounds, "search_wall_s": search["seconds"],
            "trial_s_sum": busy, "overhead": 1.0 - busy / (concurrency * search["seconds"]),
            "stage_s": stage_s, "mlflow_s": result["timings"]["mlflow_s"],
            "mlflow_share": result["timings"]["mlflow_s"] / stage_s, "test_src": result["metrics"]["lightgbm"]["test_src"]}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"## Tune overhead (LightGBM trials of ~{args.trial_seconds:g} s, {args.trials} per search, "
             f"{args.rows} synthetic posts, {os.cpu_count()} cores)", "",
             "| concurrency | trials | rounds | search wall (s) | Σ trial time (s) | Tune overhead | "
             "stage (s) | MLflow (s) | MLflow share | test SRC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['trials']} | {r['rounds']} | {r['search_wall_s']:.1f} | "
                     f"{r['trial_s_sum']:.1f} | {100 * r['overhead']:.1f}% | {r['stage_s']:.1f} | "
                     f"{r['mlflow_s']:.2f} | {100 * r['mlflow_share']:.1f}% | {r['test_src']:.4f} |")
    if len(rows) == 2 and rows[1]["search_wall_s"] > 0:
        lines += ["", f"Speed-up of 2 concurrent trials over sequential (search wall): "
                      f"{rows[0]['search_wall_s'] / rows[1]['search_wall_s']:.2f}x"]
    lines += ["", "Tune overhead = 1 - Σ trial time / (concurrency × search wall). Goal: <= 5% for ~30 s trials."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial-seconds", type=float, default=30.0, help="target length of one trial")
    parser.add_argument("--trials", type=int, default=4, help="trials per search")
    parser.add_argument("--rows", type=int, default=40000, help="synthetic posts")
    parser.add_argument("--quick", action="store_true", help="2 s trials, 2 per search, 4000 posts")
    parser.add_argument("--out", help="write the Markdown here (default: stdout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.trial_seconds, args.trials, args.rows = 2.0, 2, 4000
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    init_ray(num_cpus=4)
    with tempfile.TemporaryDirectory(prefix="bench_tune_") as tmp:
        root = Path(tmp)
        write_synthetic_features(root / "features", rows=args.rows, seed=0)
        rounds = calibrate_rounds(root / "features", args.trial_seconds)
        logger.info("%d rounds per trial for ~%.0f s", rounds, args.trial_seconds)
        rows = [run_scenario(root / "features", root, concurrency=c, trials=args.trials, rounds=rounds) for c in (1, 2)]
    text = markdown(rows, args)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
