"""Scoring cost: `smpp predict` on few vs many new posts, against the pipeline's own extraction,
and the Serve endpoint's latency and throughput next to it, all in one run.

Needs a finished pipeline (``--pipeline``, e.g. runs/demo after `make demo`); new posts are
synthetic ``test_`` posts (``synth --posts 0 --test-posts N``) with Pids above the corpus's.
Ray start-up is excluded (one Ray for the whole script); each predict includes its own
validation (prepare), the Ray Data pass, and writing the scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _new_posts(folder: str, count: int, image_size: int, seed: int) -> str:
    from smpp_ray.data.synth import synthesize_corpus

    synthesize_corpus(folder, posts=0, test_posts=count, seed=seed, image_size=image_size, first_pid=10**9)
    return folder


def _time_predict(pipeline: str, posts: str, out: str, config) -> tuple[float, dict]:
    from smpp_ray.predict import predict_posts

    started = time.perf_counter()
    summary = predict_posts(pipeline, posts, out, config=config)
    return time.perf_counter() - started, summary


def _time_extract(pipeline: str, summary: Any, out: str) -> float:
    """The pipeline's extract stage again, same inputs and settings, in this run (the baseline)."""
    from smpp_ray.config import ExtractConfig
    from smpp_ray.features import extract_features
    from smpp_ray.model.checkpoint import resolve_checkpoint

    settings = ExtractConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in summary.section("extract").items()})
    started = time.perf_counter()
    extract_features(os.path.join(pipeline, "data"), resolve_checkpoint(os.path.join(pipeline, "train")), out,
                     extract_config=settings)
    return time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_figures(pipeline: str, config, posts: list[dict], requests_n: int, clients: int) -> dict:
    import dataclasses

    import requests

    from smpp_ray import serve as smpp_serve

    port = _free_port()
    config = dataclasses.replace(config, serve=dataclasses.replace(config.serve, port=port, cpus_per_replica=1.0))
    thread = threading.Thread(target=smpp_serve.serve_scorer, args=(pipeline,), kwargs={"config": config},
                              daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    session = requests.Session()
    for post in posts[:5]:  # warm-up
        session.post(f"{url}/predict", json=[post], timeout=60).raise_for_status()
    latencies = []
    for i in range(requests_n):
        started = time.perf_counter()
        session.post(f"{url}/predict", json=[posts[i % len(posts)]], timeout=60).raise_for_status()
        latencies.append(time.perf_counter() - started)

    def one(post: dict) -> None:
        requests.post(f"{url}/predict", json=[post], timeout=120).raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, posts))
    concurrent_s = time.perf_counter() - started
    batch = 16
    started = time.perf_counter()
    for i in range(0, len(posts), batch):
        session.post(f"{url}/predict", json=posts[i:i + batch], timeout=120).raise_for_status()
    batched_s = time.perf_counter() - started
    smpp_serve.request_stop()
    thread.join(timeout=120)
    ms = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "single_posts_per_s": requests_n / float(np.sum(latencies)),
            "concurrent_posts_per_s": len(posts) / concurrent_s, "clients": clients,
            "batched_posts_per_s": len(posts) / batched_s, "batch": batch, "posts": len(posts)}


def _json_posts(data_dir: str, limit: int) -> list[dict]:
    import pyarrow.parquet as pq

    from smpp_ray import storage
    from smpp_ray.scoring.pyfunc import posts_to_json, posts_to_smpd_frame

    files = storage.list_parquet_files(storage.join(data_dir, "posts"))
    return posts_to_json(posts_to_smpd_frame(pq.read_table(files[0]).to_pandas().head(limit)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", required=True, help="finished pipeline folder (e.g. runs/demo)")
    parser.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "demo.yaml"))
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--serve-requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "predict.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from smpp_ray.config import load_config
    from smpp_ray.runtime import init_ray
    from smpp_ray.summary import require_summary

    config = load_config(args.config, ["tracking.enabled=false"])
    pipeline = os.path.abspath(args.pipeline)
    extract = require_summary(os.path.join(pipeline, "features"), "extract")
    corpus = sum(extract.metrics["rows"].values())
    image_size = int(require_summary(os.path.join(pipeline, "raw"), "synth").section("synth")["image_size"])
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as scratch:
        # Untimed warm-up: Ray's worker processes and imports, which every later job finds ready.
        warm = _new_posts(os.path.join(scratch, "warm"), 8, image_size, 100)
        _time_predict(pipeline, warm, os.path.join(scratch, "warm.csv"), config)
        for count, seed in ((args.small, 101), (args.large, 102)):
            posts = _new_posts(os.path.join(scratch, f"posts{count}"), count, image_size, seed)
            seconds, summary = _time_predict(pipeline, posts, os.path.join(scratch, f"s{count}.csv"), config)
            assert summary["scored"] == count, summary
            rows.append((count, seconds))
        serve = _serve_figures(pipeline, config, _json_posts(os.path.join(pipeline, "data"), 64),
                               args.serve_requests, args.clients)
        extract_s = _time_extract(pipeline, extract, os.path.join(scratch, "features"))

    (small, small_s), (large, large_s) = rows
    marginal = (large_s - small_s) / (large - small)
    fixed = small_s - small * marginal
    lines = [
        "## Scoring cost: `smpp predict` and `smpp serve`",
        "",
        f"Pipeline `{args.pipeline}`: its extract stage, rerun in this script, took {extract_s:.1f} s for {corpus} "
        "posts. New posts are "
        "synthetic `test_` posts; Ray start-up excluded (one Ray); each predict = validation (prepare) + "
        "Ray Data featurise/score + writing scores.",
        "",
        "| posts scored | wall (s) | per post (ms) | vs the pipeline's extract stage |",
        "|---|---|---|---|",
        f"| {small} | {small_s:.1f} | {1000 * small_s / small:.0f} | {small_s / extract_s:.1%} |",
        f"| {large} | {large_s:.1f} | {1000 * large_s / large:.1f} | {large_s / extract_s:.1%} |",
        "",
        f"Cost model from the two runs: {fixed:.1f} s fixed (validation job, actor start-up: imports and "
        f"model load, Ray Data start) + {1000 * marginal:.1f} ms per post scored; nothing grows with the "
        f"training corpus. Goal, {small} posts under 10% of the extract stage: "
        f"{'met' if small_s < 0.1 * extract_s else 'not met'} ({small_s / extract_s:.0%}): the fixed part alone is "
        f"{fixed / extract_s:.0%} of it; a warm endpoint (below) is the way to score a few posts fast.",
        "",
        "| Serve (1 replica, CPU) | value |",
        "|---|---|",
        f"| single-post latency p50 / p99 | {serve['p50_ms']:.0f} / {serve['p99_ms']:.0f} ms |",
        f"| single-post requests, sequential | {serve['single_posts_per_s']:.1f} posts/s |",
        f"| single-post requests, {serve['clients']} concurrent clients (@serve.batch) | "
        f"{serve['concurrent_posts_per_s']:.1f} posts/s |",
        f"| requests of {serve['batch']} posts | {serve['batched_posts_per_s']:.1f} posts/s |",
        f"| `smpp predict` on {large} posts, for comparison | {large / large_s:.1f} posts/s |",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"rows": rows, "serve": serve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
