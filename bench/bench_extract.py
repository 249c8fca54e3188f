"""Feature-extraction throughput: the Ray Data pipeline against a plain PyTorch loop and the compute ceiling.

Both sides run the same checkpoint (``--backbone``, default the packaged tiny CLIP; other
backbones get random weights written to a local file and loaded through ``pretrained=<file>``),
the same batch size and the same threads:

- ``ray``: :func:`smpp_ray.features.extract_features` (decode + tokenise in CPU tasks, the model
  in an actor pool of ``--actors`` actors with ``--threads-per-actor`` torch threads each, or one
  GPU each with ``--device cuda``), on 2N posts after a discarded warm-up run on N posts (which
  starts Ray's worker processes).

Steady-state images/s, the same on both sides: rows of the later half of the batches ÷ the time
they took (``steady_throughput`` over the ``finished_at`` stamped on each batch), so start-up and
the decode backlog built up while the model loads are behind.
- ``plain``: one process; a torch ``DataLoader`` decodes with as many worker processes as Ray had
  left for decode tasks, and the model runs with ``actors x threads-per-actor`` torch threads
  (first batch dropped as warm-up).
- ``ceiling``: measured matmul GFLOP/s (same device, threads and dtype) ÷ model GFLOPs per image
  (``torch.utils.flop_counter.FlopCounterMode`` on a forward pass of one batch).

Also reported: object-store bytes spilled during the Ray runs (goal 0). Writes Markdown::

    python bench/bench_extract.py --posts 256 --out bench/out/extract.md           # CPU, ~minutes
    python bench/bench_extract.py --device cuda --backbone ViT-B-16 --posts 8192 \\
        --batch-size 256 --cpus 16 --actors 1 --image-size 256 --out bench/out/extract-gpu.md
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch.utils.data

logger = logging.getLogger("bench_extract")


def prepare_corpus(workdir: Path, posts: int, image_size: int) -> str:
    """A synthetic corpus prepared into Parquet shards (reused when already there)."""
    from smpp_ray.data.prepare import prepare_dataset
    from smpp_ray.data.synth import synthesize_corpus

    data = workdir / f"data-{posts}-{image_size}"
    if not (data / "manifest.json").is_file():
        raw = workdir / f"raw-{posts}-{image_size}"
        synthesize_corpus(raw, posts=posts, seed=0, image_size=image_size)
        # Small shards so the plain loop's DataLoader workers each get files to decode.
        prepare_dataset(str(raw), str(data), val_fraction=0.1, test_fraction=0.1,
                        max_image_side=image_size, rows_per_shard=256)
    return str(data)


def make_checkpoint(workdir: Path, backbone: str) -> str:
    """A checkpoint in the train stage's format: random trainable state over the backbone."""
    import open_clip
    import torch

    from smpp_ray.config import ModelConfig
    from smpp_ray.data.taxonomy_names import default_taxonomy
    from smpp_ray.model import backbone as _registered  # noqa: F401  (packaged tiny config)
    from smpp_ray.model.checkpoint import save_checkpoint
    from smpp_ray.model.model import create_model
    from smpp_ray.model.prototypes import PrototypeBank

    pretrained = ""
    if backbone != "smpp-tiny-clip":
        weights = workdir / f"{backbone}-random.pt"
        if not weights.is_file():
            torch.save(open_clip.create_model(backbone, pretrained=None).state_dict(), weights)
        pretrained = str(weights)
    taxonomy = default_taxonomy()
    dim = open_clip.get_model_config(backbone)["embed_dim"]
    rows = taxonomy.num_subcategories + taxonomy.num_categories
    bank = PrototypeBank(torch.randn(rows, dim), torch.randn(rows, dim), torch.full((rows,), 16),
                         taxonomy.num_subcategories, {"backbone": backbone, "pretrained": pretrained})
    bank_path = workdir / f"prototypes-{backbone}.safetensors"
    bank.save(str(bank_path))
    config = ModelConfig(backbone=backbone, pretrained=pretrained)
    model = create_model(config, taxonomy, str(bank_path))
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = save_checkpoint(workdir / f"checkpoint-{backbone}", model=model, optimizer=optimizer,
                           scheduler=scheduler, model_config=config, taxonomy=taxonomy,
                           prototypes_path=str(bank_path), metrics={}, state={"epoch": 0})
    return str(path)


def spilled_bytes() -> int | None:
    """Bytes the object store has spilled so far (what ``ray memory --stats-only`` reads), None if unavailable."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.spilled_bytes_total)
    except Exception as err:  # a private API: report "n/a" rather than fail the benchmark
        logger.warning("cannot read object-store spill stats: %s", err)
        return None


def bench_ray(data_dirs: list[str], checkpoint: str, workdir: Path, args) -> dict:
    """Network-pass seconds for each dataset size, plus spill bytes over all runs."""
    from smpp_ray.config import ExtractConfig
    from smpp_ray.features import extract_features

    gpu = args.device == "cuda"
    config = ExtractConfig(batch_size=args.batch_size, min_actors=args.actors, max_actors=args.actors,
                           cpus_per_actor=float(args.threads_per_actor), num_gpus_per_actor=1.0 if gpu else 0.0,
                           pca_components=8)
    before = spilled_bytes()
    runs = []
    # A first, discarded run warms Ray's worker processes (imports), which differencing cannot cancel.
    for data_dir in data_dirs:
        result = extract_features(data_dir, checkpoint, str(workdir / "features"), extract_config=config)
        runs.append(result)
        logger.info("ray: %s posts, network pass %.2f s, %d actors", sum(result["rows"].values()),
                    result["network_seconds"], result["actors_used"])
    after = spilled_bytes()
    return {"runs": runs, "spilled": None if before is None or after is None else after - before}


class _ParquetBatches(torch.utils.data.IterableDataset):
    """IterableDataset of decoded batches; worker k reads files k, k + W, ... (each post once)."""

    def __init__(self, files: list[str], batch_size: int, spec) -> None:
        super().__init__()
        self.files, self.batch_size, self.spec = files, batch_size, spec

    def __iter__(self):
        import pyarrow.parquet as pq

        from smpp_ray.features.network import decode_batch

        info = torch.utils.data.get_worker_info()
        mine = self.files if info is None else self.files[info.id::info.num_workers]
        for path in mine:
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size,
                                                                  columns=["pid", "image", "title", "tags"]):
                batch = {c: record_batch.column(c).to_numpy(zero_copy_only=False) for c in record_batch.schema.names}
                decoded = decode_batch(batch, backbone=self.spec.backbone, image_size=self.spec.image_size,
                                       context_length=self.spec.context_length, mean=self.spec.mean, std=self.spec.std)
                yield decoded["pixels"], decoded["tokens"]


def bench_plain(data_dir: str, checkpoint: str, args) -> dict:
    """Same model, threads and batch in one process, decoding in DataLoader workers."""
    import torch

    from smpp_ray import storage
    from smpp_ray.features.extract import steady_throughput
    from smpp_ray.features.network import outputs_to_numpy
    from smpp_ray.model.backbone import backbone_spec
    from smpp_ray.model.checkpoint import (
        load_model_from_checkpoint,
        model_config_from_meta,
        read_meta,
    )

    threads = args.actors * args.threads_per_actor
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    config = model_config_from_meta(read_meta(checkpoint))
    spec = backbone_spec(config.backbone, config.context_length)
    files = storage.list_parquet_files(storage.join(data_dir, "posts"))
    decode_workers = max(0, args.cpus - (0 if args.device == "cuda" else threads))
    # spawn, not fork: this process already runs a Ray driver (prepare_dataset started one).
    loader = torch.utils.data.DataLoader(_ParquetBatches(files, args.batch_size, spec), batch_size=None,
                                         num_workers=decode_workers, pin_memory=args.device == "cuda",
                                         multiprocessing_context="spawn" if decode_workers else None)
    started = time.perf_counter()
    model = load_model_from_checkpoint(checkpoint, device=device)
    finished_at = []
    with torch.inference_mode():
        for pixels, tokens in loader:
            outputs_to_numpy(model(pixels.to(device, non_blocking=True), tokens.to(device, non_blocking=True)))
            finished_at += [time.time()] * len(pixels)
    total = time.perf_counter() - started
    return {"images": len(finished_at), "seconds": total, "images_per_s": steady_throughput(np.array(finished_at)),
            "decode_workers": decode_workers, "threads": threads}


def ceiling(checkpoint: str, args) -> dict:
    """Matmul GFLOP/s on this device/threads ÷ model GFLOPs per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from smpp_ray.model.checkpoint import load_model_from_checkpoint

    torch.set_num_threads(args.actors * args.threads_per_actor)
    device = torch.device(args.device)
    n = 4096 if args.device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    reps = 20 if args.device == "cuda" else 5
    if args.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    if args.device == "cuda":
        torch.cuda.synchronize()
    matmul_gflops = 2 * n**3 * reps / (time.perf_counter() - started) / 1e9
    # One actor's share on CPU is its threads; the pool together has all of them, as measured here.
    model = load_model_from_checkpoint(checkpoint, device=device)
    size = model.backbone.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, device=device)
    tokens = model.backbone.tokenize([f"photo {i} city night" for i in range(args.batch_size)]).to(device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(pixels, tokens)
    gflops_per_image = counter.get_total_flops() / args.batch_size / 1e9
    return {"matmul_gflops": matmul_gflops, "gflops_per_image": gflops_per_image,
            "images_per_s": matmul_gflops / gflops_per_image}


def render(args, ray_result: dict, plain: dict, roof: dict) -> str:
    second = ray_result["runs"][-1]
    posts = sum(second["rows"].values())
    ray_steady = second["steady_images_per_s"]
    spilled = ray_result["spilled"]
    lines = [
        "# Feature extraction throughput",
        "",
        f"`{' '.join(sys.argv[1:]) or '(defaults)'}` — backbone `{args.backbone}`, device `{args.device}`, "
        f"batch {args.batch_size}, {args.actors} actor(s) x {args.threads_per_actor} thread(s), "
        f"Ray with {args.cpus} CPUs, {os.cpu_count()} cores visible.",
        "",
        "| setup | images/s (steady) | end-to-end | vs plain | vs ceiling |",
        "|---|---|---|---|---|",
        f"| Ray Data extraction (network pass) | {ray_steady:.1f} | {posts / second['network_seconds']:.1f} "
        f"({posts} posts in {second['network_seconds']:.1f} s) | {ray_steady / plain['images_per_s']:.2f}x "
        f"| {ray_steady / roof['images_per_s']:.2f}x |",
        f"| plain PyTorch loop ({plain['decode_workers']} decode workers, {plain['threads']} threads) "
        f"| {plain['images_per_s']:.1f} | {plain['images'] / plain['seconds']:.1f} "
        f"({plain['images']} posts in {plain['seconds']:.1f} s) | 1.00x | {plain['images_per_s'] / roof['images_per_s']:.2f}x |",
        f"| compute ceiling ({roof['matmul_gflops']:.1f} matmul GFLOP/s ÷ {roof['gflops_per_image']:.4f} GFLOPs/image) "
        f"| {roof['images_per_s']:.1f} | | | 1.00x |",
        "",
        f"- Object-store bytes spilled during the Ray runs: {'n/a' if spilled is None else spilled}.",
        f"- Ray: network pass = decode tasks -> actor pool -> Parquet, after a warm-up run on "
        f"{sum(ray_result['runs'][0]['rows'].values())} posts; actors used: {second['actors_used']}. "
        "Steady = later half of the batches on both sides.",
        f"- Whole `extract_features` (metadata features, join by pid, checks): {second['seconds']:.1f} s for {posts} posts.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=256, help="N; the Ray side warms up on N, measures 2N")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--threads-per-actor", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=max(2, os.cpu_count() or 2), help="logical CPUs of the local Ray")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backbone", default="smpp-tiny-clip")
    parser.add_argument("--image-size", type=int, default=64, help="side of the synthetic JPEGs")
    parser.add_argument("--workdir", default="bench/out/extract-work")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from smpp_ray.runtime import init_ray

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    init_ray(num_cpus=args.cpus)  # before prepare_dataset, which would start one with its own size
    data_dirs = [prepare_corpus(workdir, n, args.image_size) for n in (args.posts, 2 * args.posts)]
    checkpoint = make_checkpoint(workdir, args.backbone)
    roof = ceiling(checkpoint, args)
    plain = bench_plain(data_dirs[1], checkpoint, args)
    ray_result = bench_ray(data_dirs, checkpoint, workdir, args)
    text = render(args, ray_result, plain, roof)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
