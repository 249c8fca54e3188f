"""Trial memory vs concurrency: every trial reading the features itself against the node-shared
matrices (``tune.shared_data``), side by side on the same data.

For 1, 4 and 16 concurrent LightGBM trials on one node (logical CPUs declared so they all run at
once; 20 rounds each, so the data dominates), each trial reports its private memory (USS: pages
no other process shares, from /proc/self/smaps_rollup) and its peak RSS. The node's figure is the
sum of the concurrent trials' private memory, plus the one shared copy in the object store for
the shared arm. Goal: a trial's private memory flat in the concurrency with ``shared_data``.

    python bench/bench_tune_memory.py --rows 60000 --features 100 --out bench/out/tune_memory.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import numpy as np  # noqa: E402

from smpp_ray.config import TuneConfig  # noqa: E402
from smpp_ray.gbdt.search import run_search  # noqa: E402
from smpp_ray.gbdt.shared import load_matrices  # noqa: E402
from smpp_ray.gbdt.synthetic import write_synthetic_features  # noqa: E402

CONCURRENCY = (1, 4, 16)


def arm(features: str, work: Path, concurrent: int, shared: bool) -> dict:
    config = TuneConfig(models=("lightgbm",), num_samples=concurrent, max_concurrent_trials=concurrent,
                        cpus_per_trial=1.0, max_rounds=20, grace_rounds=20, report_every=10, search_alg="random",
                        shared_data=shared, seed=0)
    result = run_search("lightgbm", features, str(work / f"c{concurrent}-{'shared' if shared else 'own'}"),
                        tune_config=config, tracking_ctx=None)
    private = [t["private_mib"] for t in result.trials if t.get("private_mib") is not None]
    peaks = [t["peak_rss_mib"] for t in result.trials if t.get("peak_rss_mib") is not None]
    return {"trials": len(result.trials), "private_mean": float(np.mean(private)), "private_max": float(np.max(private)),
            "node_private": float(np.sum(private)), "peak_rss_max": float(np.max(peaks)), "seconds": result.wall_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--features", type=int, default=100, help="noise feature columns besides the signal ones")
    parser.add_argument("--out", default="bench/out/tune_memory.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(num_cpus=max(CONCURRENCY), include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory(prefix="bench-tune-memory-") as scratch:
        features = str(Path(scratch) / "features")
        write_synthetic_features(features, rows=args.rows, noise_features=args.features, seed=0)
        payload = load_matrices(features, ())
        shared_mib = sum(v.nbytes for split in payload["splits"].values() for v in split.values()) / 2**20
        del payload
        results = {}
        for concurrent in CONCURRENCY:
            for shared in (False, True):
                results[(concurrent, shared)] = arm(features, Path(scratch), concurrent, shared)
                logging.warning("%d concurrent, shared=%s: %s", concurrent, shared, results[(concurrent, shared)])
    ray.shutdown()
    rows = []
    for concurrent in CONCURRENCY:
        own, shared = results[(concurrent, False)], results[(concurrent, True)]
        rows.append(f"| {concurrent} | {own['private_mean']:.0f} (max {own['private_max']:.0f}) | "
                    f"{shared['private_mean']:.0f} (max {shared['private_max']:.0f}) | "
                    f"{own['node_private']:.0f} | {shared['node_private'] + shared_mib:.0f} "
                    f"({shared['node_private']:.0f} + {shared_mib:.0f} shared) | "
                    f"{own['peak_rss_max']:.0f} / {shared['peak_rss_max']:.0f} |")
    base_own = results[(1, False)]["private_mean"]
    base_shared = results[(1, True)]["private_mean"]
    lines = [
        f"## Trial memory vs concurrency (`bench/bench_tune_memory.py`: {args.rows} rows x "
        f"{args.features + 4} features, LightGBM, 20 rounds)",
        "",
        f"The train+val matrices are {shared_mib:.0f} MiB as float32. Private memory is USS (pages no other "
        "process shares), per trial at its largest report; the node's total adds the one shared copy "
        "for the shared arm.",
        "",
        "| concurrent trials | private MiB per trial, own read | private MiB per trial, shared | node, own read | "
        "node, shared | peak RSS max own / shared |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Per trial, 16 vs 1 concurrent: own read {results[(16, False)]['private_mean'] / base_own:.2f}x, "
        f"shared {results[(16, True)]['private_mean'] / base_shared:.2f}x; shared vs own read at 16: "
        f"{results[(16, True)]['private_mean'] / results[(16, False)]['private_mean']:.2f}x.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps({f"{c}-{s}": v for (c, s), v in results.items()},
                                                              indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
