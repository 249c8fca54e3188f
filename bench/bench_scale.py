"""Scale of the Ray data path: time per post and peak memory of each stage at growing corpus sizes.

For each size (``--posts 3000,10000,30000``) a synthetic corpus is written (``smpp synth``,
cached in ``--workdir``; not measured) and these run through the library's own stage entry
points (:mod:`smpp_ray.stages`, as ``smpp <stage>`` calls them) with the ``--config`` YAML
(default ``jobs/configs/smoke.yaml``: tiny CLIP, 32 px JPEGs), tracking off, in one local Ray
with ``--num-cpus`` logical CPUs started once for all sizes:

- ``prepare``: ``run_prepare`` (raw SMPD folder -> Parquet shards);
- ``train epoch``: ``run_train`` with ``train.epochs=1`` (Ray Train start-up, one epoch over the
  train split, validation, checkpoint), after ``run_prototypes`` (cached, not measured); the
  epoch's train phase alone (``history[-1].train_seconds``) is shown too;
- ``extract``: ``run_extract`` with that checkpoint (every split);
- ``tune trial``: what one Tune trial does, as a Ray task of 1 CPU (Tune's trials are Ray
  actors): ``load_splits`` of the extracted features and one LightGBM fit with fixed
  parameters (``--rounds`` rounds, 31 leaves, learning rate 0.05, 1 thread, val set scored each
  round). The tune *stage* (search, refit, CatBoost, blend, plots) is not run.

Per stage: wall seconds, ms per post (prepare and extract: all posts; train and tune: the train
split) and their ratio to the smallest size; peak RSS of the driver and of the Ray worker
processes; object-store bytes spilled during the stage (Ray's memory stats, as
``bench/bench_extract.py`` reads them). Memory: a background thread samples, every
``--sample-s`` seconds, ``/proc/<pid>/status`` of this driver and of every process descended from
it (a local Ray's raylet, GCS and workers are all its descendants); at each stage start the
kernel's peak-RSS counter (VmHWM) of each of them is reset (``5`` > ``/proc/<pid>/clear_refs``),
so a process's peak is its VmHWM at the last sample (exact for processes alive at the stage end;
a worker that exits between samples loses at most the last interval). "Worker" = a process
whose command line is ``ray::…`` or ``default_worker.py`` (tasks, actors, Train workers);
"peak worker RSS" is the largest peak of a worker that did work in the stage (CPU time used in
it >= 0.5 s or 2% of the stage: Ray keeps idle workers, and one that imported torch for an
earlier stage holds that memory while idle) and "Σ workers" the largest sampled sum of every
worker's RSS, idle ones included (shared object-store pages count in each process that maps
them); "worker growth" is the largest rise of a busy worker's RSS above its RSS at the stage
start (Ray reuses idle workers across stages: a reused one starts with what earlier stages
imported); "worker private" is the largest sampled RssAnon of a busy worker (RSS also counts the
shared object-store pages it read). The driver imports the stages' modules before the first
measurement. ``--render-json a.json,b.json`` re-renders saved runs (the JSON is written after
each size, so a run stopped during the largest size keeps the others).

The goal (issue "Throughput and scale of the Ray data path"): ms/post and peak memory of every
stage within 1.2x of the smallest size across the range (the data path streams, it does not
load). Load averages at start and end are printed, as other work may share the cores::

    python bench/bench_scale.py --posts 3000,10000,30000 --out bench/out/scale.md
    python bench/bench_scale.py --posts 300,600 --rounds 20 --out /tmp/scale.md   # smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
logger = logging.getLogger("bench_scale")

STAGES = ("prepare", "train epoch", "extract", "tune trial")
GOAL = 1.2


# ---------------------------------------------------------------------------------------------
# Memory: /proc sampling of the driver and its descendants (the local Ray's processes)


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon (private memory) and RssShmem (shared memory, Ray's object store
    among it) of ``pid`` in KiB ({} if it is gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssShmem:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0])
    except OSError:
        return {}
    return values


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(400).replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def is_worker(cmdline: str) -> bool:
    return cmdline.startswith("ray::") or "default_worker.py" in cmdline


class MemorySampler:
    """Background thread: per-process peak RSS (VmHWM) of the driver and its descendants."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.driver = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self.reset_failures = 0
        self._begin()
        self._thread.start()

    def _begin(self) -> None:
        self.peak: dict[int, int] = {}     # pid -> KiB
        self.kind: dict[int, str] = {}     # pid -> driver | worker | ray
        self.workers_sum = 0               # KiB, largest sampled sum of worker RSS
        self.cpu0: dict[int, float] = {}   # pid -> CPU seconds at the window start
        self.cpu: dict[int, float] = {}    # pid -> CPU seconds at its last sample
        self.rss0: dict[int, int] = {}     # pid -> KiB at the window start (0: started during it)
        self.anon: dict[int, int] = {}     # pid -> largest sampled RssAnon, KiB
        self.shmem: dict[int, int] = {}    # pid -> largest sampled RssShmem, KiB
        self.anon0: dict[int, int] = {}    # pid -> RssAnon at the window start (0: started during it)
        self.name: dict[int, str] = {}     # pid -> last non-idle process title (task / actor name)
        self.started = time.perf_counter()

    def reset(self) -> None:
        """Start a new window: reset every process's VmHWM to its current RSS."""
        with self._lock:
            self._begin()
            for pid in [self.driver, *descendants(self.driver)]:
                self.cpu0[pid] = _cpu_seconds(pid)
                start = _status(pid)
                self.rss0[pid] = start.get("VmRSS", 0)
                self.anon0[pid] = start.get("RssAnon", 0)
                try:
                    with open(f"/proc/{pid}/clear_refs", "w") as f:
                        f.write("5")
                except OSError:
                    self.reset_failures += 1
        self.sample()

    def sample(self) -> None:
        pids = [self.driver, *descendants(self.driver)]
        total = 0
        with self._lock:
            for pid in pids:
                values = _status(pid)
                if not values:
                    continue
                command = "" if pid == self.driver or self.kind.get(pid) == "ray" else _cmdline(pid)
                if pid not in self.kind:
                    self.kind[pid] = "driver" if pid == self.driver else ("worker" if is_worker(command) else "ray")
                if self.kind[pid] == "worker":
                    # A Ray worker renames itself to the task or actor it runs (``ray::ReadFiles->…``);
                    # the last non-idle name is what it did in the window.
                    name = command.split(" ", 1)[0]
                    if name and name != "ray::IDLE":
                        self.name[pid] = name
                    total += values.get("VmRSS", 0)
                    self.cpu[pid] = _cpu_seconds(pid)
                self.peak[pid] = max(self.peak.get(pid, 0), values.get("VmHWM", 0), values.get("VmRSS", 0))
                self.anon[pid] = max(self.anon.get(pid, 0), values.get("RssAnon", 0))
                self.shmem[pid] = max(self.shmem.get(pid, 0), values.get("RssShmem", 0))
            self.workers_sum = max(self.workers_sum, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def window(self) -> dict[str, float]:
        """Peaks (MiB) since the last :meth:`reset`, over the workers that worked in the window.

        Ray keeps idle workers between stages (one that imported torch for the previous stage
        holds its memory while idle); a worker counts when it used at least 0.5 s, or 2% of the
        window, of CPU time during it.
        """
        self.sample()
        busy = max(0.5, 0.02 * (time.perf_counter() - self.started))
        with self._lock:
            busy_pids = [p for p in self.peak if self.kind[p] == "worker"
                         and self.cpu.get(p, 0.0) - self.cpu0.get(p, 0.0) >= busy]
            workers = [self.peak[p] for p in busy_pids]
            top = sorted(busy_pids, key=lambda p: self.peak[p], reverse=True)[:3]
            return {"driver_mib": self.peak.get(self.driver, 0) / 1024,
                    "top_workers": [{"pid": p, "peak_mib": self.peak[p] / 1024, "private_mib": self.anon.get(p, 0) / 1024,
                                     "shared_mib": self.shmem.get(p, 0) / 1024,
                                     "start_mib": self.rss0.get(p, 0) / 1024,
                                     "private_start_mib": self.anon0.get(p, 0) / 1024,
                                     "cpu_s": self.cpu.get(p, 0.0) - self.cpu0.get(p, 0.0),
                                     "name": self.name.get(p, "")} for p in top],
                    "worker_mib": max(workers, default=0) / 1024,
                    "worker_growth_mib": max((self.peak[p] - self.rss0.get(p, 0) for p in busy_pids), default=0) / 1024,
                    "worker_anon_mib": max((self.anon.get(p, 0) for p in busy_pids), default=0) / 1024,
                    "worker_private_growth_mib": max((self.anon.get(p, 0) - self.anon0.get(p, 0)
                                                      for p in busy_pids), default=0) / 1024,
                    "driver_anon_mib": self.anon.get(self.driver, 0) / 1024,
                    "driver_private_growth_mib": (self.anon.get(self.driver, 0)
                                                  - self.anon0.get(self.driver, 0)) / 1024,
                    "workers_sum_mib": self.workers_sum / 1024,
                    "workers_seen": len(workers)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _spilled_bytes():
    """Object-store spill counter, read as bench/bench_extract.py reads it."""
    spec = importlib.util.spec_from_file_location("bench_extract", HERE / "bench_extract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.spilled_bytes


# ---------------------------------------------------------------------------------------------
# Stages


def tune_trial(features: str, rounds: int) -> dict:
    """One Tune trial's work in a Ray task: read + encode the features, one LightGBM fit."""
    import ray

    @ray.remote(num_cpus=1)
    def trial(features: str, rounds: int) -> dict:
        from smpp_ray.gbdt.data import load_splits
        from smpp_ray.gbdt.spaces import fixed_params
        from smpp_ray.gbdt.trainables import fit_model

        started = time.perf_counter()
        spec, data = load_splits(features, splits=("train", "val"))
        params = {**fixed_params("lightgbm", seed=0, threads=1), "num_leaves": 31, "learning_rate": 0.05}
        fit_model("lightgbm", params, rounds, data["train"].X, data["train"].y, spec.categorical,
                  valid=(data["val"].X, data["val"].y))
        return {"rows": len(data["train"].y), "features": len(spec.features), "seconds": time.perf_counter() - started}

    return ray.get(trial.remote(features, rounds))


def run_size(posts: int, args, config_path: str, sampler: MemorySampler, spilled) -> dict:
    from smpp_ray.config import load_config
    from smpp_ray.stages import (
        StageRun,
        run_extract,
        run_prepare,
        run_prototypes,
        run_synth,
        run_train,
    )
    from smpp_ray.summary import read_summary

    work = Path(args.workdir).resolve() / f"posts-{posts}"
    overrides = [f"synth.posts={posts}", f"synth.test_posts={round(posts * args.test_share)}",
                 "tracking.enabled=false", f"ray.num_cpus={args.num_cpus}",
                 "train.epochs=1", "train.early_stopping_patience=0", "train.max_failures=0", *args.set]
    config = load_config(config_path, overrides)
    cached = StageRun("", "bench", enabled=False, skip_complete=True)
    fresh = StageRun("", "bench", enabled=False)
    started = time.perf_counter()
    raw = run_synth(config, str(work / "raw"), cached)
    logger.info("%d posts: synth (cached or written) in %.1f s", posts, time.perf_counter() - started)
    for name in ("data", "train", "features"):  # measured stages start from nothing
        shutil.rmtree(work / name, ignore_errors=True)

    rows: dict[str, dict] = {}

    def measure(stage: str, fn):
        sampler.reset()
        before = spilled()
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        after = spilled()
        rows[stage] = {"seconds": seconds, **sampler.window(),
                       "spilled": None if before is None or after is None else after - before,
                       "load": (load_before, os.getloadavg()[0])}
        logger.info("%d posts: %s %.1f s, %s", posts, stage, seconds, rows[stage])
        return result

    def stage(name: str, fn):
        """Measured when asked for (``--stages``); otherwise run unmeasured, as a later stage needs it."""
        return measure(name, fn) if name in args.stages else fn()

    data = stage("prepare", lambda: run_prepare(config, raw, str(work / "data"), fresh))
    counts = read_summary(data).metrics
    total = sum(counts["per_split"].values())
    result = {"posts": posts, "counts": counts, "total": total, "train_rows": counts["per_split"]["train"],
              "stages": rows, "train_phase_s": None}
    if not {"train epoch", "extract", "tune trial"} & set(args.stages):
        return result
    proto = run_prototypes(config, data, str(work / "prototypes"), cached)
    train = stage("train epoch", lambda: run_train(config, data, proto, str(work / "train"), fresh))
    train_summary = read_summary(train)
    history = train_summary.metrics.get("history") or [{}]
    result["train_phase_s"] = history[-1].get("train_seconds")
    result["image_features"] = train_summary.metrics.get("image_features")
    if not {"extract", "tune trial"} & set(args.stages):
        return result
    features = stage("extract", lambda: run_extract(config, data, train,
                                                    str(work / "features"), fresh))
    if "tune trial" in args.stages:
        result["trial"] = measure("tune trial", lambda: tune_trial(features, args.rounds))
    return result


# ---------------------------------------------------------------------------------------------
# Report


def per_post_ms(result: dict, stage: str) -> float:
    denominator = result["train_rows"] if stage in ("train epoch", "tune trial") else result["total"]
    return 1000 * result["stages"][stage]["seconds"] / max(1, denominator)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def private_ratio(stage: dict, base: dict) -> float | None:
    """The largest busy worker's private memory (RssAnon) added in the stage, against the smallest size.

    RSS also counts the pages of Ray's shared object store a process has mapped and touched: they
    are one store's memory (bounded by its capacity), counted again in every process that read
    them, so a per-process streaming bound is a bound on private memory. What the stage *added*
    (peak minus the worker's private memory at the stage start) leaves out what a reused idle
    worker held from earlier stages (imports, an earlier stage's model).
    """
    value, reference = stage.get("worker_private_growth_mib"), base.get("worker_private_growth_mib")
    if value is None or not reference:
        return None
    return value / reference


def marginal_ms(small: dict, large: dict, stage: str) -> float:
    """ms per extra post from ``small`` to ``large`` (the fixed cost cancels)."""
    key = "train_rows" if stage in ("train epoch", "tune trial") else "total"
    extra = max(1, large[key] - small[key])
    return 1000 * (large["stages"][stage]["seconds"] - small["stages"][stage]["seconds"]) / extra


def render(results: list[dict], args, loads: tuple, wall: float, reset_failures: int, command: str = "") -> str:
    base = results[0]
    lines = [
        "## Scale: time per post and peak memory vs corpus size",
        "",
        f"`bench/bench_scale.py {command or ' '.join(sys.argv[1:])}` — config `{args.config}` (tracking off, "
        f"train.epochs=1), one local Ray with {args.num_cpus} logical CPUs on {os.cpu_count()} cores; "
        f"sizes {', '.join(str(r['posts']) for r in results)} posts; total wall {wall:.0f} s. "
        f"Load average (1/5/15 min) at start {loads[0][0]:.2f}/{loads[0][1]:.2f}/{loads[0][2]:.2f}, "
        f"at end {loads[1][0]:.2f}/{loads[1][1]:.2f}/{loads[1][2]:.2f}.",
        "",
        "| posts | stage | seconds | ms/post | ms/post vs smallest | peak driver RSS (MiB) | "
        "peak worker RSS (MiB) (busy workers) | worker growth (MiB) | worker private (MiB) | Σ workers RSS (MiB) | "
        "memory vs smallest | worker private added (MiB) | vs smallest | driver private added (MiB) | spilled bytes | load 1-min (start→end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for stage in [name for name in STAGES if name in base["stages"]]:
        b = base["stages"][stage]
        worst_time, worst_mem, worst_growth, worst_private = 0.0, 0.0, None, None
        for r in results:
            s = r["stages"][stage]
            time_ratio = per_post_ms(r, stage) / per_post_ms(base, stage)
            mem_ratio = max(s["driver_mib"] / max(b["driver_mib"], 1e-9), s["worker_mib"] / max(b["worker_mib"], 1e-9))
            worst_time, worst_mem = max(worst_time, time_ratio), max(worst_mem, mem_ratio)
            private = private_ratio(s, b)
            if private is not None:
                worst_private = max(worst_private or 0.0, private)
            if s.get("worker_growth_mib") is not None and b.get("worker_growth_mib"):
                worst_growth = max(worst_growth or 0.0, s["worker_growth_mib"] / b["worker_growth_mib"])
            spilled = "n/a" if s["spilled"] is None else f"{s['spilled']:,}"
            lines.append(f"| {r['posts']} | {stage} | {s['seconds']:.1f} | {per_post_ms(r, stage):.2f} | "
                         f"{time_ratio:.2f}x | {s['driver_mib']:.0f} | {s['worker_mib']:.0f} ({s['workers_seen']}) | "
                         f"{'n/a' if s.get('worker_growth_mib') is None else format(s['worker_growth_mib'], '.0f')} | "
                         f"{'n/a' if s.get('worker_anon_mib') is None else format(s['worker_anon_mib'], '.0f')} | "
                         f"{s['workers_sum_mib']:.0f} | {mem_ratio:.2f}x | "
                         f"{_mib(s.get('worker_private_growth_mib'))} | "
                         f"{'n/a' if private is None else format(private, '.2f') + 'x'} | "
                         f"{_mib(s.get('driver_private_growth_mib'))} | {spilled} | "
                         f"{s['load'][0]:.1f}→{s['load'][1]:.1f} |")
        verdicts[stage] = (worst_time, worst_mem, worst_growth, worst_private)
    lines += ["", "Per-post denominators: prepare and extract, every post prepared "
              f"({', '.join(str(r['total']) for r in results)}); train epoch and tune trial, the train split "
              f"({', '.join(str(r['train_rows']) for r in results)}). Memory vs smallest = the larger of the "
              "driver's and the largest worker's peak ratio.", "",
              f"Goal: ms/post and peak memory within {GOAL}x of the smallest size across the range.", ""]
    for stage, (worst_time, worst_mem, worst_growth, worst_private) in verdicts.items():
        ok_t, ok_m = worst_time <= GOAL, worst_mem <= GOAL
        # Fixed costs (Ray Train / actor start-up) shrink per post as the corpus grows, which can hide
        # a per-post cost that grows; the marginal cost between sizes does not have that bias.
        marginal = [(lo["posts"], hi["posts"], marginal_ms(lo, hi, stage))
                    for lo, hi in zip(results[:-1], results[1:], strict=True)]
        lines.append(f"- **{stage}**: time per post {'met' if ok_t else 'NOT met'} (worst {worst_time:.2f}x), "
                     f"peak memory {'met' if ok_m else 'NOT met'} (worst {worst_mem:.2f}x"
                     + ("" if worst_growth is None else f"; busy workers' growth worst {worst_growth:.2f}x") + ")"
                     + ("" if worst_private is None else
                        f", private memory a busy worker added {'met' if worst_private <= GOAL else 'NOT met'} "
                        f"(worst {worst_private:.2f}x)")
                     + ("; marginal ms/post " + ", ".join(f"{lo}→{hi}: {m:.2f}" for lo, hi, m in marginal)
                        if marginal else "") + ".")
    named = [(r["posts"], stage, r["stages"][stage]["top_workers"]) for stage in verdicts for r in results
             if r["stages"][stage].get("top_workers")]
    if named:
        lines += ["", "Largest busy workers per stage (process title: peak RSS / private (RssAnon) / shared "
                  "(RssShmem: object-store pages among it) / RSS (private) at the stage start, MiB; CPU seconds in the "
                  "stage):", ""]
        lines += [f"- {posts} posts, {stage}: " + "; ".join(
            f"`{w['name'] or '?'}` {w['peak_mib']:.0f} / {w['private_mib']:.0f} / "
            f"{_mib(w.get('shared_mib'))} / {w['start_mib']:.0f} ({_mib(w.get('private_start_mib'))} private), "
            f"{w['cpu_s']:.0f} s" for w in top) for posts, stage, top in named]
    phases = [(r["posts"], r["train_phase_s"], r["train_rows"]) for r in results if r["train_phase_s"]]
    if phases:
        lines += ["", "Train phase alone (the epoch's batches, no Ray Train start-up or validation): " + ", ".join(
            f"{p} posts {s:.1f} s = {1000 * s / n:.2f} ms/post" for p, s, n in phases) + "."]
    lines += ["", f"Memory: `/proc/<pid>/status` VmHWM of the driver and of each process descended from it, "
              f"reset per stage through `/proc/<pid>/clear_refs` ({reset_failures} resets refused), sampled "
              f"every {args.sample_s:g} s by a background thread; workers = `ray::*` / `default_worker.py` "
              "processes; (n) = busy workers (CPU used in the stage >= 0.5 s or 2% of it); worker growth = "
              "the largest rise of a busy worker's RSS above its RSS at the stage start (Ray reuses idle workers "
              "across stages, so a reused one starts with what earlier stages imported); worker private = the "
              "largest sampled RssAnon of a busy worker (RSS also counts object-store pages a worker has "
              "mapped and read, which are shared). Spilled = Ray's "
              "`spilled_bytes_total` difference over the stage."]
    return "\n".join(lines) + "\n"


def render_saved(args) -> int:
    """One table from the JSON of earlier runs (e.g. the largest size run on its own)."""
    runs = [json.loads(Path(path).read_text()) for path in args.render_json.split(",")]
    results = sorted((r for run in runs for r in run["results"]), key=lambda r: r["posts"])
    for r in results:
        r.setdefault("total", sum(r["counts"]["per_split"].values()))
    loads = (runs[0]["load"][0], runs[-1]["load"][1])
    command = " + ".join(" ".join(run.get("argv") or ["(argv not saved)"]) for run in runs)
    text = render(results, args, loads, sum(run["wall_s"] for run in runs),
                  sum(run.get("reset_failures", 0) for run in runs), command)
    if len(runs) > 1:
        text += (f"\nRendered from {len(runs)} runs ({args.render_json}), each with its own local Ray; load at "
                 "start is the first run's, at end the last run's; total wall is their sum.\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", default="3000,10000,30000", help="comma-separated corpus sizes, smallest first")
    parser.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "smoke.yaml"))
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to measure (of {', '.join(STAGES)}); the ones a later "
                             "stage needs still run, unmeasured")
    parser.add_argument("--test-share", type=float, default=0.0,
                        help="unlabelled test_ posts per labelled post (SMPD: 180581/305613 = 0.5909)")
    parser.add_argument("--set", action="append", default=[], help="extra config override key=value")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--rounds", type=int, default=200, help="LightGBM rounds of the tune trial")
    parser.add_argument("--sample-s", type=float, default=0.2, help="memory sampling interval")
    parser.add_argument("--workdir", default=str(HERE / "out" / "scale-work"))
    parser.add_argument("--json", default="", help="also write the raw numbers here")
    parser.add_argument("--render-json", default="",
                        help="comma-separated --json files of earlier runs: render their sizes together, run nothing")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sizes = sorted(int(p) for p in args.posts.split(","))
    args.stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown --stages {unknown}; expected some of {list(STAGES)}")
    if args.render_json:
        return render_saved(args)

    from smpp_ray.runtime import init_ray

    load_start = os.getloadavg()
    started = time.perf_counter()
    # Imports before the first window, so the smallest size's driver peak is not their one-off cost.
    import lightgbm  # noqa: F401
    import ray.data  # noqa: F401
    import ray.train.torch  # noqa: F401

    import smpp_ray.features  # noqa: F401
    import smpp_ray.gbdt  # noqa: F401
    import smpp_ray.train  # noqa: F401

    sampler = MemorySampler(args.sample_s)
    init_ray(num_cpus=args.num_cpus)  # one Ray for every size; the stages join it
    spilled = _spilled_bytes()
    results = []

    def save(wall: float) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "load": [load_start, os.getloadavg()],
                                                   "wall_s": wall, "reset_failures": sampler.reset_failures,
                                                   "argv": sys.argv[1:]}, indent=1, default=str))

    try:
        for posts in sizes:
            results.append(run_size(posts, args, args.config, sampler, spilled))
            save(time.perf_counter() - started)  # after each size: a run stopped later keeps these
    finally:
        sampler.stop()
        import ray

        ray.shutdown()
    wall = time.perf_counter() - started
    text = render(results, args, (load_start, os.getloadavg()), wall, sampler.reset_failures)
    print(text)
    save(wall)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
