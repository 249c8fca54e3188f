"""Training throughput: Ray Train (1 and 2 workers) against a plain PyTorch loop, same model.

Every setup trains the same SMPP model (``--backbone``, default the packaged tiny CLIP) with the
same per-worker batch size and torch threads on a synthetic corpus, and reports training
samples/s (the train phase of each epoch; validation excluded; the first epoch is dropped as
warm-up when there are two or more):

- ``plain``: a bare PyTorch loop over batches decoded beforehand and held in memory, the best
  case for the network itself;
- ``plain+decode``: the same loop decoding and tokenising each batch inline (the work Ray Data
  does in parallel CPU tasks);
- ``ray-1``: ``train_model`` with one worker, fed by the Ray Data pipeline (decode + tokenise in
  CPU tasks, streamed to the worker);
- ``ray-2``: two workers (DDP; gloo on CPU, NCCL on GPU; skipped with fewer than 2 GPUs);
- ``plain-cached``: the bare loop over batches of stored image-tower outputs (bf16, computed
  beforehand and held in memory): the network minus its frozen image tower;
- ``ray-1-cached``: ``train_model`` with ``train.cache_image_features`` (one Ray Data job encodes
  every post once into the run's storage; each epoch streams those Parquet files). Its ratio to
  ``plain-cached`` is the Ray layer's cost on the same inputs; the one-off encoding time is
  reported beside it.

"time waiting for input" is the share of the train phase spent waiting for the next batch:
high values mean the Ray Data pipeline (or its start-up each epoch) is the bottleneck, not
Ray Train. With small corpora the per-epoch pipeline start-up dominates; use enough posts.

Writes a Markdown table to ``--out`` (and stdout)::

    python bench/bench_train.py --posts 3000 --epochs 3 --out bench/out/train.md
    python bench/bench_train.py --device cuda --posts 4000 --batch-size 64 --threads 4
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench_train")

SETUPS = ("plain", "plain+decode", "ray-1", "ray-2", "plain-cached", "ray-1-cached")


def prepare_corpus(workdir: Path, posts: int, backbone: str) -> tuple[str, str]:
    """Synthetic posts -> prepared dataset -> prototype bank (reused when already there)."""
    import pyarrow.parquet as pq

    from smpp_ray.data.dataset import Dataset
    from smpp_ray.data.prepare import prepare_dataset
    from smpp_ray.data.synth import synthesize_corpus
    from smpp_ray.model.backbone import backbone_spec
    from smpp_ray.model.prototypes import EmbedPosts, compute_prototypes

    data, proto = workdir / f"data-{posts}", workdir / f"proto-{posts}-{backbone}"
    if not (data / "manifest.json").is_file():
        synthesize_corpus(workdir / f"raw-{posts}", posts=posts, seed=0)
        prepare_dataset(str(workdir / f"raw-{posts}"), str(data), val_fraction=0.1, test_fraction=0.0)
    bank_path = proto / "prototypes.safetensors"
    if not bank_path.is_file():
        table = pq.read_table(data / "posts" / "split=train")
        rows = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
        embedded = EmbedPosts(backbone)(rows)
        bank, _ = compute_prototypes(embedded, Dataset(str(data)).taxonomy(), shots=16, time_buckets=2, seed=0,
                                     embed_dim=backbone_spec(backbone).embed_dim, metadata={"backbone": backbone})
        proto.mkdir(parents=True, exist_ok=True)
        bank.save(str(bank_path))
    return str(data), str(proto)


def steady(values: list[float]) -> float:
    """Mean over epochs after the first (compile/warm-up/worker start-up), or the only one."""
    return statistics.mean(values[1:] if len(values) > 1 else values)


def bench_plain(data: str, proto: str, args: argparse.Namespace, *, decode_inline: bool,
                cached: bool = False) -> tuple[float, float, float]:
    """A bare PyTorch loop: same model, optimizer, schedule, batch and threads.

    ``decode_inline=False``: batches decoded beforehand and held in memory (network only);
    ``True``: each batch decoded and tokenised in the loop, as a single-process PyTorch loop
    without a data loader would (the same work the Ray Data pipeline does in its tasks).
    ``cached``: batches of stored image-tower outputs (eval transform, bf16) in memory instead.
    """
    import pyarrow.parquet as pq
    import torch

    from smpp_ray.config import ModelConfig
    from smpp_ray.data.dataset import Dataset
    from smpp_ray.model.backbone import backbone_spec
    from smpp_ray.model.model import create_model
    from smpp_ray.model.preprocess import BatchPreprocessor
    from smpp_ray.train.data import INPUT_COLUMNS, collate_batch
    from smpp_ray.train.loop import StepSettings, train_epoch
    from smpp_ray.train.schedule import create_optimizer, create_scheduler
    from smpp_ray.train.trainer import create_loss_fn

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = backbone_spec(args.backbone)
    table = pq.read_table(f"{data}/posts/split=train", columns=INPUT_COLUMNS)
    rows = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    decode = BatchPreprocessor(spec.backbone, spec.image_size, spec.context_length, not cached,
                               mean=spec.mean, std=spec.std)
    size = len(rows["pid"])
    raw_batches = [{k: v[i:i + args.batch_size] for k, v in rows.items()} for i in range(0, size, args.batch_size)]
    if cached:
        import dataclasses

        from smpp_ray.train.image_features import ImageTowerEncoder

        encoder = ImageTowerEncoder(dataclasses.asdict(ModelConfig(backbone=args.backbone, pretrained=args.pretrained)),
                                    Dataset(data).taxonomy().to_dict(), f"{proto}/prototypes.safetensors", 0, "bfloat16",
                                    device=args.device)
        decoded = [collate_batch(encoder(decode(b))) for b in raw_batches]
    else:
        decoded = None if decode_inline else [collate_batch(decode(b)) for b in raw_batches]

    def batches():
        if decoded is not None:
            yield from decoded
            return
        for raw in raw_batches:
            yield collate_batch(decode(raw))

    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone=args.backbone, pretrained=args.pretrained),
                         Dataset(data).taxonomy(), f"{proto}/prototypes.safetensors").to(device)
    optimizer = create_optimizer(model.trainable_parameters(), "adamw", 5e-3, 1e-4)
    scheduler = create_scheduler(optimizer, len(raw_batches) // 2, len(raw_batches) * args.epochs)
    rates, waits, seconds, step = [], [], [], 0
    for epoch in range(args.epochs):
        stats = train_epoch(model, batches(), create_loss_fn(model), optimizer, scheduler, StepSettings(device=device),
                            global_step=step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step = int(stats["global_step"])
        rates.append(stats["samples"] / stats["seconds"])
        seconds.append(stats["seconds"])
        waits.append(stats["data_wait_seconds"] / stats["seconds"])
        logger.info("plain%s epoch %d: %.1f samples/s", "-cached" if cached else "+decode" if decode_inline else "",
                    epoch, rates[-1])
    return steady(rates), steady(waits), steady(seconds)


def bench_ray(data: str, proto: str, workers: int, args: argparse.Namespace,
              workdir: Path, *, cached: bool = False, facts: dict | None = None) -> tuple[float, float, float]:
    from smpp_ray.config import ModelConfig, TrainConfig
    from smpp_ray.train import train_model

    config = TrainConfig(num_workers=workers, use_gpu=args.device == "cuda", cpus_per_worker=float(args.threads),
                         epochs=args.epochs, batch_size=args.batch_size, lr=5e-3, early_stopping_patience=0,
                         max_failures=0, name=f"bench-{workers}w{'-cached' if cached else ''}-{time.time_ns()}",
                         storage_path=str(workdir / "ray_results"), cache_image_features=cached)
    result = train_model(data, proto, str(workdir / f"out-{workers}w"),
                         model_config=ModelConfig(backbone=args.backbone, pretrained=args.pretrained),
                         train_config=config, tracking=None)
    rates = [h["samples_per_s"] for h in result["history"]]
    waits = [h["data_wait_fraction"] for h in result["history"]]
    seconds = [h["train_seconds"] for h in result["history"]]
    if facts is not None and "image_features" in result:
        facts.update(result["image_features"])
    logger.info("ray %d worker(s)%s: %s samples/s per epoch", workers, " cached" if cached else "",
                [round(r, 1) for r in rates])
    return steady(rates), steady(waits), steady(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per Ray worker")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backbone", default="smpp-tiny-clip")
    parser.add_argument("--pretrained", default="")
    parser.add_argument("--num-cpus", type=int, default=0, help="logical CPUs of the local Ray (0: max(4, cores))")
    parser.add_argument("--workdir", default="bench/out/train")
    parser.add_argument("--out", default="bench/out/train.md")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help="comma-separated setups to run (each ratio needs its baseline among them)")
    args = parser.parse_args(argv)
    setups = [name.strip() for name in args.setups.split(",") if name.strip()]
    if set(setups) - set(SETUPS):
        parser.error(f"unknown --setups {sorted(set(setups) - set(SETUPS))}; expected some of {list(SETUPS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from smpp_ray.runtime import init_ray

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    init_ray(num_cpus=args.num_cpus or max(4, os.cpu_count() or 1))
    data, proto = prepare_corpus(workdir, args.posts, args.backbone)

    started, load_start = time.time(), os.getloadavg()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    encoded: dict = {}
    runs = {
        "plain": lambda: bench_plain(data, proto, args, decode_inline=False),
        "plain+decode": lambda: bench_plain(data, proto, args, decode_inline=True),
        "ray-1": lambda: bench_ray(data, proto, 1, args, workdir),
        "ray-2": lambda: bench_ray(data, proto, 2, args, workdir) if args.device == "cpu" or gpus >= 2 else None,
        "plain-cached": lambda: bench_plain(data, proto, args, decode_inline=False, cached=True),
        "ray-1-cached": lambda: bench_ray(data, proto, 1, args, workdir, cached=True, facts=encoded),
    }
    results: dict[str, tuple[float, float, float] | None] = {name: runs[name]() for name in runs if name in setups}

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"### Training throughput: Ray Train vs plain PyTorch ({args.backbone}, {device_name})",
        "",
        f"{args.posts} synthetic posts (train split: 90%), batch {args.batch_size} per worker, {args.threads} torch "
        f"thread(s) per worker, {args.epochs} epochs (first dropped as warm-up), train phase only.",
        "",
        "| setup | workers | samples/s | vs plain | vs ray-1 | time waiting for input | epoch train phase (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, workers in (("plain", 1), ("plain+decode", 1), ("ray-1", 1), ("ray-2", 2),
                          ("plain-cached", 1), ("ray-1-cached", 1)):
        if name not in results:
            continue
        if results[name] is None:
            lines.append(f"| {name} | {workers} | n/a (needs 2 GPUs) | | | | |")
            continue
        rate, wait, seconds = results[name]
        baseline = results.get("plain-cached" if name == "ray-1-cached" else "plain")
        vs_plain = f"{rate / baseline[0]:.2f}x" if baseline else "n/a"
        vs_one = f"{rate / results['ray-1'][0]:.2f}x" if name == "ray-2" and results.get("ray-1") else ""
        lines.append(f"| {name} | {workers} | {rate:.1f} | {vs_plain} | {vs_one} | {100 * wait:.0f}% | {seconds:.1f} |")
    lines += ["", "`vs plain` of ray-1-cached is against plain-cached (the same stored inputs)."]
    if "ray-1-cached" in results:
        lines.append(f"ray-1-cached encoded {sum(encoded.get('rows', {}).values())} posts once in "
                     f"{encoded.get('seconds', 0.0):.1f} s ({encoded.get('posts_per_s', 0.0):.0f} posts/s) "
                     "before its epochs.")
    load_end = os.getloadavg()
    lines += ["", f"Total wall time {time.time() - started:.0f} s; load average (1/5/15 min) at start "
              f"{load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, at end "
              f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}."]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
