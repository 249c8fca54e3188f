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

Weights are random (a checkpoint file written here from open_clip's own initialisation and
loaded through the same `pretrained=<file>` path users take): throughput does not depend on them.
"""

from __future__ import annotations

import argparse
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


def bench_inference(model, batch: int, device: str, iters: int) -> float:
    pixels, tokens = inputs(model, batch, device)
    model.eval()

    def step():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--infer-batch", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = args.device
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
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
