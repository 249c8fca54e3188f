"""Retrieval features at scale: time and peak memory per post of the exact blocked search, from 3k
to 300k posts, against a plain brute-force baseline (one full similarity matrix) side by side.

Each corpus size runs in its own process (so its peak RSS is its own): synthetic posts over a year
(60% training posts form the bank, every post is a query), unit embeddings around 50 topics, users
drawn Zipf-like. Two arms on the same data:

- ``blocked``: :func:`smpp_ray.features.neighbours.earlier_neighbours` (time-ordered query blocks,
  16,384 bank rows per product, running top-k), one embedding, k = 100;
- ``brute force``: the whole (queries x bank) matrix, masked to earlier posts, ``argpartition``;
  run only where the matrix fits in a quarter of this machine's memory (the figure says so);

plus the whole feature computation (:meth:`NeighbourBank.features`: one embedding at k = 5/20/100,
the re-upload check, 8 user snapshots), and the approximate path (``--approximate``: the HNSW
index over the whole bank, ``exact_rows=0``, so every block's common earlier prefix comes from the
index): its build and search time and its recall@100 against the exact search. Where the brute
force runs, the share of identical neighbours says the blocked search is exact.

    python bench/bench_neighbours.py --posts 3000,30000,300000 --dim 64 --out bench/out/neighbours.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

K = 100


def corpus(posts: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(50, dim))
    topic = rng.integers(0, 50, size=posts)
    vectors = topics[topic] + rng.normal(scale=0.8, size=(posts, dim))
    users = np.minimum(rng.zipf(1.6, size=posts), max(posts // 8, 1))
    return {"t": np.sort(rng.integers(1_450_000_000, 1_450_000_000 + 365 * 86400, size=posts)),
            "uid": np.array([f"u{u}" for u in users]), "label": rng.normal(6.0, 2.0, size=posts),
            "sub": rng.integers(0, 77, size=posts), "train": rng.random(posts) < 0.6,
            "fused": vectors.astype(np.float32), "image": (vectors + rng.normal(size=vectors.shape)).astype(np.float32)}


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def brute_force(bank: np.ndarray, bank_t: np.ndarray, queries: np.ndarray, query_t: np.ndarray) -> np.ndarray:
    sims = queries @ bank.T
    sims[bank_t[None, :] >= query_t[:, None]] = -np.inf
    top = np.argpartition(-sims, min(K, sims.shape[1] - 1), axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(top, order, axis=1)
    return np.where(np.isfinite(np.take_along_axis(sims, best, axis=1)), best, -1)


def one_arm(posts: int, dim: int, threads: int, arm: str) -> dict:
    """Run in a child process of its own (so the peak RSS is this arm's): one arm at one size."""
    import torch

    from smpp_ray.features.neighbours import (
        ApproximateIndex,
        NeighbourBank,
        NeighbourSettings,
        earlier_neighbours,
        normalised,
    )

    torch.set_num_threads(threads)
    data = corpus(posts, dim)
    train = data["train"]
    settings = NeighbourSettings(embeddings=("fused",), ks=(5, 20, K), user_snapshots=8)
    bank = NeighbourBank.from_training_posts(settings, np.arange(posts)[train].astype(str), data["t"][train],
                                             data["uid"][train], data["label"][train], data["sub"][train],
                                             {"fused": data["fused"][train], "image_embedding": data["image"][train]})
    queries = normalised(data["fused"])
    out: dict = {"posts": posts, "bank": len(bank), "dim": dim}
    base = rss_mib()
    started = time.perf_counter()
    if arm == "blocked":
        earlier_neighbours(bank.vectors["fused"], bank.t, queries, data["t"], K, block_rows=1024)
    elif arm == "brute":
        want = brute_force(bank.vectors["fused"], bank.t, queries, data["t"])
    elif arm == "approximate":
        index = ApproximateIndex.build(bank.vectors["fused"])
        out["build_s"] = time.perf_counter() - started
        searched = time.perf_counter()
        got, _ = earlier_neighbours(bank.vectors["fused"], bank.t, queries, data["t"], K, block_rows=1024,
                                    approximate=index, exact_rows=0)
        out["search_s"] = time.perf_counter() - searched
    else:
        out["columns"] = bank.features({"fused": data["fused"], "image_embedding": data["image"]}, data["t"],
                                       data["uid"], data["sub"]).shape[1]
    out[f"{arm}_s"] = time.perf_counter() - started
    out[f"{arm}_peak_mib"] = max(peak_mib() - base, 0.0)
    if arm in ("brute", "approximate"):
        exact, _ = earlier_neighbours(bank.vectors["fused"], bank.t, queries, data["t"], K, block_rows=1024)
    if arm == "brute":
        out["same_neighbours"] = float((want == exact).mean())
    if arm == "approximate":
        hits = [len(np.intersect1d(g[g >= 0], e[e >= 0])) / (e >= 0).sum() for g, e in zip(got, exact, strict=True) if (e >= 0).any()]
        out["recall"] = float(np.mean(hits))
    return out


def one_size(posts: int, dim: int, threads: int, approximate: bool) -> dict:
    """Every arm at one size, each in a child process."""
    def child(arm: str) -> dict:
        done = subprocess.run([sys.executable, __file__, "--one", str(posts), "--arm", arm, "--dim", str(dim),
                               "--threads", str(threads)], check=True, capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    out = {**child("blocked"), **child("features")}
    out["brute_matrix_gib"] = posts * out["bank"] * 4 / 2**30
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if out["brute_matrix_gib"] < total_gib / 4:
        out.update(child("brute"))
    if approximate:
        out.update(child("approximate"))
    return out


def render(rows: list[dict], dim: int, threads: int) -> str:
    lines = [f"Synthetic posts (60% training = the bank; every post a query), unit embeddings of {dim} dimensions, "
             f"k = {K}, CPU float32, {threads} torch thread(s), one process per size. Peak memory: the rise of "
             "the process's peak RSS over its RSS before the arm (the corpus itself excluded).", "",
             "| posts | bank | blocked search | per post | peak memory | brute force | per post | peak memory "
             "| speed-up | same neighbours | all features (one embedding, 3 k, users) | per post |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = 1e6 / r["posts"]
        if "brute_s" in r:
            brute = (f"{r['brute_s']:.2f} s | {r['brute_s'] * per:.0f} us | {r['brute_peak_mib']:.0f} MiB | "
                     f"{r['brute_s'] / r['blocked_s']:.2f}x | {r['same_neighbours']:.4f}")
        else:
            brute = f"not run: the matrix alone is {r['brute_matrix_gib']:.0f} GiB | | | |"
        lines.append(f"| {r['posts']:,} | {r['bank']:,} | {r['blocked_s']:.2f} s | {r['blocked_s'] * per:.0f} us | "
                     f"{r['blocked_peak_mib']:.0f} MiB | {brute} | {r['features_s']:.2f} s | "
                     f"{r['features_s'] * per:.0f} us |")
    approximate = [r for r in rows if "recall" in r]
    if approximate:
        lines += ["", "The approximate path (HNSW, M=32, efConstruction=100, efSearch=256, the whole bank indexed):", "",
                  "| posts | bank | index build | search | per post | peak memory | recall@100 vs exact |",
                  "|---|---|---|---|---|---|---|"]
        for r in approximate:
            lines.append(f"| {r['posts']:,} | {r['bank']:,} | {r['build_s']:.1f} s | {r['search_s']:.2f} s | "
                         f"{r['search_s'] * 1e6 / r['posts']:.0f} us | {r['approximate_peak_mib']:.0f} MiB | "
                         f"{r['recall']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", default="3000,30000,300000")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimensions (64: the tiny CLIP; 512: ViT-B/32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--approximate", action="store_true", help="also the HNSW path: time and recall@100")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--arm", default="blocked", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/out/neighbours.md")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_arm(args.one, args.dim, args.threads, args.arm)))
        return 0
    rows = []
    for posts in [int(p) for p in args.posts.split(",")]:
        rows.append(one_size(posts, args.dim, args.threads, args.approximate))
        print(json.dumps(rows[-1]), flush=True)
    text = render(rows, args.dim, args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
