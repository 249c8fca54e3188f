"""Thousands of trials: what the search costs per trial when trials are short, Optuna's TPE (the
default) against random search, side by side on the same features.

Each arm runs ``--trials`` LightGBM trials of 5 rounds on a small synthetic feature set (so the
trial itself is ~0.1 s and the machinery shows), ``max_concurrent_trials`` 2, every trial an
MLflow child run in a SQLite store. Reported per arm: wall time, trials/s, Tune overhead
(1 - sum of trial time / (concurrency x wall)), the search algorithm's own time per trial
(``suggest`` + ``on_trial_complete``, first vs last 10% of the trials: does it grow?), MLflow
time and store size, and the driver's peak RSS.

    python bench/bench_many_trials.py --trials 1000 --out bench/out/many_trials.md

At the shipped SMPD config's scale (200 trials per family on SMPD-size features: 305,613 posts,
~330 columns), with trials long enough that the data, not the machinery, dominates:

    python bench/bench_many_trials.py --trials 200 --rows 305613 --noise-features 320 --rounds 20 \
        --arms optuna --out bench/out/many_trials_smpd.md

and its CatBoost half: the same with ``--model catboost --out bench/out/many_trials_smpd_catboost.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import numpy as np  # noqa: E402

from smpp_ray.config import TuneConfig  # noqa: E402
from smpp_ray.gbdt import search as search_module  # noqa: E402
from smpp_ray.gbdt.synthetic import write_synthetic_features  # noqa: E402
from smpp_ray.tracking import TrackingContext, create_run, end_run  # noqa: E402

#: Seconds the search algorithm spent per trial (suggest + completion), in order.
SEARCH_SECONDS: list[float] = []


def _timed_search_alg(config: TuneConfig):
    """The search algorithm the stage would build, as a subclass that times its own calls
    (module-level classes: Tune pickles the searcher into its experiment state)."""
    if config.search_alg == "optuna":
        return TimedOptuna(seed=config.seed)
    return TimedRandom(random_state=config.seed, max_concurrent=config.max_concurrent_trials)


def _timing(method):
    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            SEARCH_SECONDS.append(time.perf_counter() - started)
    return timed


from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402


class TimedOptuna(OptunaSearch):
    suggest = _timing(OptunaSearch.suggest)
    on_trial_complete = _timing(OptunaSearch.on_trial_complete)


class TimedRandom(BasicVariantGenerator):
    next_trial = _timing(BasicVariantGenerator.next_trial)


def run_arm(features: str, work: Path, trials: int, search_alg: str, rounds: int = 5,
            family: str = "lightgbm") -> dict:
    SEARCH_SECONDS.clear()
    original = search_module._search_alg
    search_module._search_alg = _timed_search_alg
    uri = f"sqlite:///{work / f'mlruns-{search_alg}.db'}"
    stage = create_run(uri, "many-trials", f"tune-{search_alg}")
    config = TuneConfig(models=(family,), num_samples=trials, max_concurrent_trials=2, cpus_per_trial=1.0,
                        max_rounds=rounds, grace_rounds=min(5, rounds), report_every=5, search_alg=search_alg, seed=0,
                        shared_data=True)
    started = time.perf_counter()
    try:
        result = search_module.run_search(family, features, str(work / f"ray_results-{search_alg}"),
                                          tune_config=config, tracking_ctx=TrackingContext(uri, "many-trials", stage))
    finally:
        search_module._search_alg = original
    wall = time.perf_counter() - started
    end_run(uri, stage, "FINISHED")
    trial_seconds = 0.0
    for progress in Path(result.experiment_path).glob("*/result.json"):
        lines = progress.read_text().strip().splitlines()
        if lines:
            trial_seconds += float(json.loads(lines[-1]).get("time_total_s", 0.0))
    # calls per trial: optuna suggest + on_trial_complete; random next_trial (called until one comes)
    per_trial = np.asarray(SEARCH_SECONDS) * (len(SEARCH_SECONDS) / max(1, len(result.trials)))
    tenth = max(1, len(per_trial) // 10)
    return {"trials": len(result.trials), "wall_s": wall, "trials_per_s": len(result.trials) / wall,
            "overhead": 1 - trial_seconds / (2 * wall), "search_alg_ms_first": 1000 * float(np.mean(per_trial[:tenth])),
            "search_alg_ms_last": 1000 * float(np.mean(per_trial[-tenth:])),
            "search_alg_s": float(np.sum(SEARCH_SECONDS)),
            "mlflow_s": result.mlflow_seconds, "store_mib": (work / f"mlruns-{search_alg}.db").stat().st_size / 2**20,
            "best_val_score": result.best_val_score}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--arms", nargs="+", default=["optuna", "random"])
    parser.add_argument("--out", default="bench/out/many_trials.md")
    parser.add_argument("--rows", type=int, default=2000, help="synthetic posts in the feature set")
    parser.add_argument("--noise-features", type=int, default=None, help="noise columns besides the signal ones")
    parser.add_argument("--rounds", type=int, default=5, help="boosting rounds per trial (ASHA may stop at 5)")
    parser.add_argument("--model", choices=("lightgbm", "catboost"), default="lightgbm", help="the family searched")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("smpp_ray").setLevel(logging.WARNING)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-many-trials-") as scratch:
        work = Path(scratch)
        features = str(work / "features")
        extra = {} if args.noise_features is None else {"noise_features": args.noise_features}
        started = time.perf_counter()
        write_synthetic_features(features, rows=args.rows, seed=0, **extra)
        logging.warning("wrote %d synthetic posts in %.0f s", args.rows, time.perf_counter() - started)
        for search_alg in args.arms:
            results[search_alg] = run_arm(features, work, args.trials, search_alg, args.rounds, args.model)
            results[search_alg]["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            logging.warning("%s: %s", search_alg, results[search_alg])
    ray.shutdown()
    rows = [f"| {alg} | {r['trials']} | {r['wall_s']:.0f} | {r['trials_per_s']:.2f} | {100 * r['overhead']:.0f}% | "
            f"{r['search_alg_ms_first']:.1f} -> {r['search_alg_ms_last']:.1f} | {r['mlflow_s']:.0f} s "
            f"({100 * r['mlflow_s'] / r['wall_s']:.0f}%) | {r['store_mib']:.1f} | {r['driver_peak_rss_mib']:.0f} |"
            for alg, r in results.items()]
    lines = [
        f"## {args.trials} trials per search (`bench/bench_many_trials.py`, {args.rows:,} posts, {args.model} up to "
        f"{args.rounds} rounds, 2 concurrent, 2 cores)",
        "",
        "| search | trials | wall s | trials/s | Tune overhead | search algorithm ms/trial, first -> last 10% | "
        "MLflow (share of wall) | store MiB | driver peak RSS MiB (cumulative) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
