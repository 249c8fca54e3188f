"""The submission at full size: `smpp predict --format smp-challenge` over a corpus's test_ posts,
at two sizes in one run, time per post and peak memory side by side (the larger against the smaller).

The scorer is a pipeline fitted on the smaller corpus (``--train-raw``; `smpp pipeline` with
``--config`` and one epoch, reused when already there). For each size, the raw folder's test_
files and test images are hard-linked into a folder of their own (a submission scores the test_
files alone), and predict runs through ``cli.main`` in this process with one local Ray for the
whole script (start-up excluded). The submission is checked as the challenge reads it: a header,
one row per line of the test_ image list, in that order, every score finite.

    .venv/bin/python bench/bench_submission.py \\
        --train-raw bench/out/scale-work/posts-30000/raw \\
        --sizes bench/out/scale-work/posts-30000/raw,bench/out/scale-work/posts-305613/raw \\
        --out bench/out/submission.md
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", HERE / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_folder(raw: Path, out: Path) -> Path:
    """``out`` holding hard links to ``raw``'s test_ files and test image folders (no copy)."""
    if out.exists():
        return out
    out.mkdir(parents=True)
    for entry in sorted(raw.iterdir()):
        if "test" in entry.name.lower():
            subprocess.run(["cp", "-al", str(entry), str(out / entry.name)], check=True)
    return out


def check_submission(path: Path, raw: Path) -> dict:
    """Rows, order and finiteness of a submission against the test_ image list of ``raw``."""
    listed = [line for line in (raw / "test_img_filepath.txt").read_text().split("\n") if line.strip()]
    with path.open() as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    scores = [float(score) for _, score in body]
    expected = ["post" + Path(line.strip()).stem for line in listed]
    return {"header_ok": header == ["post_id", "popularity_score"], "rows": len(body), "test_lines": len(listed),
            "order_ok": [pid for pid, _ in body] == expected,
            "finite": all(math.isfinite(s) for s in scores)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-raw", required=True, help="raw corpus the scorer is fitted on")
    parser.add_argument("--sizes", required=True, help="comma-separated raw folders whose test_ posts are scored")
    parser.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "smoke.yaml"))
    parser.add_argument("--workdir", default=str(HERE / "out" / "submission-work"))
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--json", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from smpp_ray.cli import main as smpp
    from smpp_ray.runtime import init_ray

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--config", args.config, "--set", "tracking.enabled=false", "--set", f"ray.num_cpus={args.num_cpus}"]
    init_ray(num_cpus=args.num_cpus)
    started = time.perf_counter()
    assert smpp(["pipeline", "--raw", args.train_raw, "--out", str(work / "pipeline"), *common,
                 "--set", "train.epochs=1"]) == 0
    logging.info("scorer pipeline ready in %.1f s", time.perf_counter() - started)
    sampler = _bench_scale().MemorySampler(0.2)
    results = []
    for index, raw in enumerate(Path(p) for p in args.sizes.split(",")):
        posts = test_only_folder(raw, work / f"test-posts-{index}")
        out = work / f"submission-{index}.csv"
        sampler.reset()
        load0 = os.getloadavg()[0]
        started = time.perf_counter()
        code = smpp(["predict", "--pipeline", str(work / "pipeline"), "--posts", str(posts), "--format",
                     "smp-challenge", "--out", str(out), *common])
        seconds = time.perf_counter() - started
        memory = sampler.window()
        check = check_submission(out, raw)
        results.append({"raw": str(raw), "exit": code, "seconds": seconds, "ms_per_post": 1000 * seconds / check["rows"],
                         "load": [load0, os.getloadavg()[0]], **check, **memory})
        logging.info("predict %s: exit %d, %d rows in %.1f s", raw, code, check["rows"], seconds)
    sampler.stop()
    base = results[0]
    lines = ["## The submission at full size: `smpp predict --format smp-challenge`", "",
             f"`bench/bench_submission.py` — scorer: `{args.config}` pipeline (one epoch) fitted on "
             f"`{args.train_raw}`; one local Ray with {args.num_cpus} logical CPUs on {os.cpu_count()} cores, "
             "start-up excluded; each run validates (prepare), featurises, scores and writes the CSV.", "",
             "| test posts | exit | seconds | ms/post | vs smallest | peak driver RSS (MiB) | driver private added (MiB) "
             "| peak worker RSS (MiB) | worker private (MiB) | submission checks | load 1-min (start→end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        checks = "header, rows, order, finite" if (r["header_ok"] and r["order_ok"] and r["finite"]
                                                  and r["rows"] == r["test_lines"]) else f"FAILED {r}"
        lines.append(f"| {r['rows']} | {r['exit']} | {r['seconds']:.1f} | {r['ms_per_post']:.2f} | "
                     f"{r['ms_per_post'] / base['ms_per_post']:.2f}x | {r['driver_mib']:.0f} | "
                     f"{r['driver_private_growth_mib']:.0f} | {r['worker_mib']:.0f} | {r['worker_anon_mib']:.0f} | "
                     f"{checks} | {r['load'][0]:.1f}→{r['load'][1]:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
