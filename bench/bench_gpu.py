"""GPU throughput of the SMPP network at realistic size (ViT-B-16), against the compute ceiling.

Run on a GPU machine (no Ray needed: it measures the model side that the Ray stages wrap):

    python bench/bench_gpu.py --backbone ViT-B-16 --out bench/out/gpu.md

Measures, each side by side in this one process:
- the ceiling: bf16 matmul TFLOP/s of this GPU;
- model GFLOPs per image (torch's FlopCounterMode, forward pass);
- feature extraction images/s (inference_mode, bf16 autocast) and its share of the ceiling
  (images/s × GFLOPs/image ÷ matmul GFLOP/s);
- prompt-tuning samples/s (AdamW on trainable parameters only, bf16 autocast), with the image
  tower run every step and with cached frozen image-tower outputs (train.cache_image_features);
- JPEG decode + preprocessing images/s on one CPU core, i.e. how many CPUs per GPU Ray Data
  must give the decode stage so the GPU waits on nothing.

New paths, each as a ratio against its plain baseline measured in the same run:
- prompt tuning fed cached image-tower outputs (pooled + patch tokens in bf16, precomputed once
  into a tensor dataset, on the device and in pinned host memory copied per step) against the
  tower run every step on a pixel dataset of the same posts;
- extraction forward in bf16 autocast against fp32 (same batch, inference_mode);
- GPU JPEG decode (``torchvision.io.decode_jpeg(list, device="cuda")`` + resize, centre crop and
  normalisation on the device) against CPU PIL decode of the same JPEGs (the library's
  ``BatchPreprocessor.decode_images``, one core), on synthetic photo-like JPEGs built here.

No downloads, no Ray: ViT-B-16 from open_clip's config with random weights, or the packaged tiny
architecture. On a machine without CUDA it runs smaller by itself (``--quick`` forces that: tiny
model, small batches, 3 iterations), with CPU stand-ins (bf16 autocast on CPU; ``decode_jpeg`` on
the CPU) so every path is checked; those CPU ratios say nothing about a GPU.

    python bench/bench_gpu.py --out bench/out/gpu.md              # H200: ViT-B-16, ~3-5 minutes
    python bench/bench_gpu.py --quick --out /tmp/gpu-cpu.md       # CPU check, ~1 minute

Weights are random (a checkpoint file written here from open_clip's own initialisation and
loaded through the same `pretrained=<file>` path users take): throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smpp_ray.config import ModelConfig  # noqa: E402
from smpp_ray.data.taxonomy_names import default_taxonomy  # noqa: E402
from smpp_ray.model.model import create_model  # noqa: E402
from smpp_ray.model.preprocess import BatchPreprocessor  # noqa: E402
from smpp_ray.model.prototypes import PrototypeBank  # noqa: E402


def timed(fn, iters: int, warmup: int, device: str) -> float:
    """Mean seconds per call after warm-up (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def matmul_tflops(device: str, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, iters=10, warmup=3, device=device)
    return 2 * n**3 / seconds / 1e12


def build_model(backbone: str, work: Path, device: str):
    import open_clip

    from smpp_ray.model import backbone as _registered  # noqa: F401  (packaged tiny config)

    checkpoint = work / f"{backbone}-random.pt"
    if backbone != "smpp-tiny-clip":
        clip = open_clip.create_model(backbone, pretrained=None)
        torch.save(clip.state_dict(), checkpoint)
        pretrained = str(checkpoint)
    else:
        pretrained = ""
    taxonomy = default_taxonomy()
    config = ModelConfig(backbone=backbone, pretrained=pretrained, n_local_tokens=8, fusion_layers=2, fusion_heads=8)
    probe = create_model(ModelConfig(backbone=backbone, pretrained=pretrained, use_prototypes=False), taxonomy, None)
    dim = probe.backbone.embed_dim
    rows = taxonomy.num_subcategories + taxonomy.num_categories
    bank = PrototypeBank(torch.nn.functional.normalize(torch.randn(rows, dim), dim=-1),
                         torch.nn.functional.normalize(torch.randn(rows, dim), dim=-1),
                         torch.full((rows,), 256), taxonomy.num_subcategories)
    bank.save(str(work / "prototypes.safetensors"))
    model = create_model(config, taxonomy, str(work / "prototypes.safetensors")).to(device)
    return model, taxonomy


def inputs(model, batch: int, device: str):
    size = model.backbone.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    texts = [f"street photo {i} city night lights tag{i % 17} travel" for i in range(batch)]
    tokens = model.backbone.tokenize(texts).to(device)
    return pixels, tokens


def gflops_per_image(model, device: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    pixels, tokens = inputs(model, 4, device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(pixels, tokens)
    return counter.get_total_flops() / 4 / 1e9


def bench_inference(model, batch: int, device: str, iters: int, bf16: bool | None = None) -> float:
    """Extraction forward images/s; ``bf16`` None: bf16 autocast on CUDA only (the library's rule)."""
    pixels, tokens = inputs(model, batch, device)
    model.eval()
    bf16 = device == "cuda" if bf16 is None else bf16

    def step():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            model(pixels, tokens)

    return batch / timed(step, iters, warmup=3, device=device)


def bench_training(model, batch: int, device: str, iters: int, cached: bool) -> float:
    pixels, tokens = inputs(model, batch, device)
    sub = torch.randint(0, 77, (batch,), device=device)
    cat = torch.tensor(default_taxonomy().parents, device=device)[sub]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    features = None
    if cached:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            pooled, patches = model.backbone.encode_image(pixels)
        features = (pooled.float(), patches.float())

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(None if cached else pixels, tokens, image_features=features)
            loss = model.compute_losses(out, sub, cat)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / timed(step, iters, warmup=2, device=device)


def bench_decode(image_size: int, images: int = 256) -> float:
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    batch = {"image": np.array([blobs[i % 16] for i in range(images)], dtype=object),
             "title": np.array(["a title"] * images, dtype=object), "tags": np.array(["x y z"] * images, dtype=object)}
    torch.set_num_threads(1)
    pre = BatchPreprocessor("ViT-B-16", image_size, 77, train=False)
    pre(batch)
    start = time.perf_counter()
    pre(batch)
    return images / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# New paths, each against its plain baseline


def _autocast(device: str, bf16: bool):
    return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def bench_cached_training(model, batch: int, device: str, iters: int, samples: int, bf16: bool) -> dict:
    """Prompt-tuning samples/s over a dataset of ``samples`` posts: the image tower every step
    (pixels on the device) vs cached tower outputs (pooled + patch tokens in bf16, precomputed
    once) on the device and in pinned host memory (copied to the device per step)."""
    steps = max(1, samples // batch)
    samples = steps * batch
    pixels, tokens = inputs(model, samples, device)
    sub = torch.randint(0, 77, (samples,), device=device)
    cat = torch.tensor(default_taxonomy().parents, device=device)[sub]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    # The cache: one pass of the frozen tower, stored as bf16 tensors, indexed per step.
    model.eval()
    started = time.perf_counter()
    pooled_parts, patch_parts = [], []
    with torch.inference_mode(), _autocast(device, bf16):
        for i in range(0, samples, batch):
            pooled, patches = model.backbone.encode_image(pixels[i:i + batch])  # (B, D), (B, P, D)
            pooled_parts.append(pooled.to(torch.bfloat16))
            patch_parts.append(patches.to(torch.bfloat16))
    cache = torch.utils.data.TensorDataset(torch.cat(pooled_parts), torch.cat(patch_parts))
    if device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    host = torch.utils.data.TensorDataset(*(t.cpu().pin_memory() if device == "cuda" else t.cpu()
                                            for t in cache.tensors))
    bytes_per_sample = sum(t[0].numel() * t.element_size() for t in cache.tensors)

    def run(source: str) -> float:
        model.train()
        position = {"i": 0}

        def step():
            i = position["i"] % steps * batch
            position["i"] += 1
            rows = slice(i, i + batch)
            if source == "tower":
                features, images = None, pixels[rows]
            else:
                data = cache if source == "device" else host
                pooled, patches = data[rows]
                features = (pooled.to(device, non_blocking=True), patches.to(device, non_blocking=True))
                images = None
            with _autocast(device, bf16):
                out = model(images, tokens[rows], image_features=features)
                loss = model.compute_losses(out, sub[rows], cat[rows])["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return batch / timed(step, iters, warmup=2, device=device)

    return {"tower": run("tower"), "device": run("device"), "host": run("host"), "build_s": build_s,
            "samples": samples, "bytes_per_sample": bytes_per_sample}


def synthetic_jpegs(count: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields, edges and mild noise; quality 90), ``count`` distinct."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(count):
        coarse = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16)
        detail = np.asarray(Image.fromarray(rng.integers(0, 255, (height // 4, width // 4), dtype=np.uint8))
                            .resize((width, height), Image.NEAREST).filter(ImageFilter.SMOOTH), dtype=np.int16)
        pixels = np.clip(pixels + (detail[..., None] - 128) // 4 + rng.integers(-6, 7, pixels.shape), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def bench_jpeg_decode(blobs: list[bytes], image_size: int, device: str, batch: int, iters: int) -> dict:
    """Images/s: CPU PIL decode + preprocess (the library's path, one core) vs
    ``torchvision.io.decode_jpeg(list, device=...)`` + resize / centre crop / normalise on the device."""
    import open_clip
    import torchvision
    from torchvision.transforms.v2 import functional as TF

    images = [blobs[i % len(blobs)] for i in range(batch)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pre = BatchPreprocessor("ViT-B-16", image_size, 77, train=False)
    pre.decode_images(images[:2])
    started = time.perf_counter()
    cpu_pixels = pre.decode_images(images)
    cpu_rate = batch / (time.perf_counter() - started)
    torch.set_num_threads(threads)

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]

    def gpu_decode():
        decoded = torchvision.io.decode_jpeg(encoded, device=device)  # list of (3, H, W) uint8
        # Photos differ in size, so each is resized on its own (float: bicubic overshoot clamped).
        out = torch.stack([TF.center_crop(TF.resize(img.float(), [image_size], interpolation=TF.InterpolationMode.BICUBIC,
                                                    antialias=True), [image_size, image_size]) for img in decoded])
        return (out.clamp(0, 255) / 255 - mean) / std  # (B, 3, S, S)

    seconds = timed(gpu_decode, iters, warmup=2, device=device)
    gap = (gpu_decode().cpu() - torch.from_numpy(cpu_pixels)).abs().mean().item()
    return {"cpu": cpu_rate, "device": batch / seconds, "mean_abs_diff": gap,
            "bytes": int(np.mean([len(b) for b in images]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="default ViT-B-16 (smpp-tiny-clip when small)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--infer-batch", type=int, default=None, help="default 256 (32 when small)")
    parser.add_argument("--train-batch", type=int, default=None, help="default 128 (16 when small)")
    parser.add_argument("--iters", type=int, default=None, help="default 10 (3 when small)")
    parser.add_argument("--cache-samples", type=int, default=None,
                        help="posts in the cached-feature / pixel datasets; default 1024 (64 when small)")
    parser.add_argument("--decode-batch", type=int, default=None, help="JPEGs per decode batch; default 256 (32 when small)")
    parser.add_argument("--jpeg-size", default=None, help="WxH of the synthetic JPEGs; default 500x375 (320x240 when small)")
    parser.add_argument("--quick", action="store_true", help="the small sizes (the default without CUDA)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = args.device
    small = args.quick or device != "cuda"
    for name, big, little in (("backbone", "ViT-B-16", "smpp-tiny-clip"), ("infer_batch", 256, 32),
                              ("train_batch", 128, 16), ("iters", 10, 3), ("cache_samples", 1024, 64),
                              ("decode_batch", 256, 32), ("jpeg_size", "500x375", "320x240")):
        if getattr(args, name) is None:
            setattr(args, name, little if small else big)
    started = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    lines = [f"# GPU benchmark: {args.backbone} on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}",
             "", f"torch {torch.__version__}; batch {args.infer_batch} inference / {args.train_batch} training; "
             f"{args.iters} timed iterations after warm-up; random weights.", "",
             "| measurement | value |", "|---|---|"]

    def row(name: str, value: str) -> None:
        lines.append(f"| {name} | {value} |")
        print(f"{name}: {value}", flush=True)

    ceiling_bf16 = matmul_tflops(device, 8192 if device == "cuda" else 1024, torch.bfloat16 if device == "cuda" else torch.float32)
    row("matmul ceiling (bf16 8192³ on GPU, TFLOP/s)", f"{ceiling_bf16:.2f}")
    with tempfile.TemporaryDirectory() as work:
        model, _ = build_model(args.backbone, Path(work), device)
    counts = model.parameter_counts()
    row("parameters (trainable / total)", f"{counts['trainable']:,} / {counts['total']:,}")
    gflops = gflops_per_image(model, device)
    row("model forward GFLOPs per image", f"{gflops:.2f}")
    ceiling_images = ceiling_bf16 * 1e3 / gflops
    row("compute ceiling (images/s = matmul GFLOP/s ÷ GFLOPs per image)", f"{ceiling_images:,.0f}")
    infer = bench_inference(model, args.infer_batch, device, args.iters)
    row("extraction forward (images/s, bf16, inference_mode)", f"{infer:,.0f}")
    row("extraction ÷ compute ceiling", f"{infer / ceiling_images:.2f}")
    train = bench_training(model, args.train_batch, device, args.iters, cached=False)
    row("prompt-tuning step (samples/s, image tower every step)", f"{train:,.0f}")
    train_cached = bench_training(model, args.train_batch, device, args.iters, cached=True)
    row("prompt-tuning step (samples/s, cached frozen image features)", f"{train_cached:,.0f}")
    row("cached ÷ uncached training speed-up", f"{train_cached / train:.2f}x")
    decode = bench_decode(model.backbone.image_size)
    row("JPEG decode + preprocess on one CPU core (images/s)", f"{decode:,.0f}")
    row("CPU cores per GPU to keep extraction fed", f"{infer / decode:.1f}")
    if device == "cuda":
        row("peak GPU memory (GiB)", f"{torch.cuda.max_memory_allocated() / 2**30:.1f}")

    # New paths against their baselines, same run, same model and batch.
    lines += ["", "New paths, each against its plain baseline in this run:", "",
              "| path | baseline | baseline value | new value | new ÷ baseline |", "|---|---|---|---|---|"]

    def pair(path: str, baseline: str, unit: str, base: float, new: float) -> None:
        lines.append(f"| {path} | {baseline} | {base:,.1f} {unit} | {new:,.1f} {unit} | {new / base:.2f}x |")
        print(f"{path}: {new:,.1f} vs {baseline} {base:,.1f} {unit} = {new / base:.2f}x", flush=True)

    notes = []

    def attempt(what: str, fn):
        """One new path; a failure (e.g. a torchvision without nvjpeg) is a row, not a lost run."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001  (reported in the table)
            lines.append(f"| {what} | | | failed: {type(err).__name__}: {str(err)[:200]} | |")
            print(f"{what} failed: {err!r}", flush=True)
            return None

    cached = attempt("cached tower outputs", lambda: bench_cached_training(
        model, args.train_batch, device, args.iters, args.cache_samples, bf16=True))
    if cached:
        pair("prompt tuning on cached tower outputs (bf16 tensor dataset on the device)",
             "image tower every step (pixels on the device)", "samples/s", cached["tower"], cached["device"])
        pair("prompt tuning on cached tower outputs (bf16, pinned host memory, copied per step)",
             "image tower every step (pixels on the device)", "samples/s", cached["tower"], cached["host"])
        notes.append(f"- Cache: {cached['samples']} posts, {cached['bytes_per_sample'] / 1024:,.1f} KiB per post "
                     f"(pooled + {model.backbone.num_patches} patch tokens, bf16), built in {cached['build_s']:.2f} s "
                     f"({cached['samples'] / cached['build_s']:,.0f} posts/s); training on both sides under bf16 "
                     "autocast" + (" (on CPU too, so the GPU code path is what is checked here)." if device != "cuda" else "."))
    precision = attempt("bf16 vs fp32 extraction", lambda: (
        bench_inference(model, args.infer_batch, device, args.iters, bf16=False),
        bench_inference(model, args.infer_batch, device, args.iters, bf16=True)))
    if precision:
        pair("extraction forward, bf16 autocast", "fp32", "images/s", *precision)
    width, height = (int(v) for v in args.jpeg_size.lower().split("x"))
    blobs = synthetic_jpegs(min(64, args.decode_batch), width, height)
    decode_new = attempt("JPEG decode on the device", lambda: bench_jpeg_decode(
        blobs, model.backbone.image_size, device, args.decode_batch, args.iters))
    if decode_new:
        pair(f"`decode_jpeg(list, device={device!r})` + resize/crop/normalise on {device}",
             "CPU PIL decode + preprocess, 1 core", "images/s", decode_new["cpu"], decode_new["device"])
        notes.append(f"- JPEGs: {len(blobs)} distinct synthetic photo-like {width}x{height} images, quality 90, "
                     f"{decode_new['bytes'] / 1024:.0f} KiB mean, decoded to {model.backbone.image_size} px (bicubic); "
                     f"mean |device path - PIL path| over normalised pixels {decode_new['mean_abs_diff']:.4f} "
                     "(resize kernels differ slightly).")
    if device == "cuda":
        notes.append(f"- Peak GPU memory over the whole run: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB.")
    lines += ["", *notes, f"- Whole benchmark {time.perf_counter() - started:.0f} s."]
    if device != "cuda":
        lines.append("- Run without CUDA (small sizes): a check that every path works; the ratios say nothing "
                     "about a GPU.")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
