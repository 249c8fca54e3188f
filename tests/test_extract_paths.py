"""Extraction's data paths: JPEG decoding on the actor's device (``extract.gpu_decode``, run on CPU
here), bf16 autocast, the decode stage sized from measured rates, and the fused vector's PCA."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_extract import _in_process_outputs, _read_all, _save_tiny_checkpoint
from test_features_tabular import make_posts, write_dataset

from smpp_ray.config import ExtractConfig
from smpp_ray.features import FeatureSet, extract_features, select_columns
from smpp_ray.features.extract import (
    DECODED_BLOCK_BYTES,
    decode_block_rows,
    decode_concurrency,
    decode_stage_memory,
    network_feature_columns,
)
from smpp_ray.features.network import (
    TENSOR_OUTPUTS,
    DeviceImageDecoder,
    NetworkFeatureExtractor,
    decode_batch,
)
from smpp_ray.features.pca import fit_pca
from smpp_ray.model.backbone import backbone_spec

SPEC = backbone_spec("smpp-tiny-clip")
DECODE = {"backbone": SPEC.backbone, "image_size": SPEC.image_size, "context_length": SPEC.context_length,
          "mean": SPEC.mean, "std": SPEC.std}
DEVICE_DECODE = {"image_size": SPEC.image_size, "mean": SPEC.mean, "std": SPEC.std, "backbone": SPEC.backbone,
                 "context_length": SPEC.context_length}
#: One 8-bit level after normalisation by the smallest CLIP std (0.2613).
LEVEL = 1 / 255 / 0.26130258
#: Features of the device-decode path vs the PIL path, per output: max |difference| <= this share
#: of the output's largest magnitude. Measured on the tiny model with noise images (the worst
#: case for resampling) upscaled 24 -> 64 and downscaled 100 -> 64: at most 0.35% (fused vector),
#: 0.27% (image embedding); the text side is identical. 1% leaves room across torch/PIL versions.
FEATURE_RTOL = 0.01


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("train"))


def _photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth, photo-like image with some noise, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _batch(images: list[bytes]) -> dict[str, np.ndarray]:
    n = len(images)
    return {"pid": np.array([f"p{i}" for i in range(n)], dtype=object), "image": np.array(images, dtype=object),
            "title": np.array([f"title {i}" for i in range(n)], dtype=object),
            "tags": np.array(["tag"] * n, dtype=object)}


def test_device_decoder_matches_the_pil_eval_transform() -> None:
    sizes = [(64, 64), (24, 24), (256, 192), (192, 256), (640, 480), (100, 300), (65, 90), (1000, 700)]
    batch = _batch([_photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)])
    pil = decode_batch(batch, **DECODE)["pixels"]
    device = DeviceImageDecoder(SPEC.image_size, "cpu", mean=SPEC.mean, std=SPEC.std)(batch["image"], batch["pid"])
    assert device.dtype == torch.float32 and tuple(device.shape) == pil.shape == (len(sizes), 3, 64, 64)
    difference = np.abs(device.numpy() - pil)
    # the same libjpeg decodes both: an image already at the model size (no resampling) is identical
    assert difference[0].max() == 0.0
    # measured: downscales differ by at most 1 level, upscales (24 -> 64, 65 -> 64x88) by at most 4
    # (torch and PIL bicubic kernels differ); the mean stays near a third of a level
    assert difference.max() <= 5 * LEVEL, difference.reshape(len(sizes), -1).max(1) / LEVEL
    assert difference.mean() <= 0.5 * LEVEL


def test_device_decoder_falls_back_for_png_and_names_a_corrupt_jpeg(caplog) -> None:
    jpeg, png = _photo(120, 80, seed=1), _photo(90, 150, seed=2, fmt="PNG")
    batch = _batch([jpeg, png, jpeg])
    decoder = DeviceImageDecoder(SPEC.image_size, "cpu", **{k: DECODE[k] for k in ("mean", "std", "backbone",
                                                                                   "context_length")})
    with caplog.at_level("WARNING"):
        out = decoder(batch["image"], batch["pid"]).numpy()
    pil = decode_batch(batch, **DECODE)["pixels"]
    np.testing.assert_array_equal(out[1], pil[1])  # the PNG went through the PIL path itself
    np.testing.assert_array_equal(out[0], out[2])
    assert decoder.fallbacks == 1 and "not JPEG (e.g. post 'p1')" in caplog.text

    corrupt = _batch([jpeg, b"\xff\xd8\xff" + b"not a jpeg body" * 8])
    with pytest.raises(ValueError, match="cannot decode image of post 'p1'"):
        decoder(corrupt["image"], corrupt["pid"])


def test_gpu_decode_features_are_close_to_the_pil_path(checkpoint: Path) -> None:
    for image_size in (24, 100):  # upscaled and downscaled to 64
        posts = make_posts(32, seed=5, users=3, image_size=image_size)
        batch = {name: posts[name].to_numpy() for name in ("pid", "image", "title", "tags", "split")}
        raw = decode_batch(batch, **DECODE, decode_images=False)
        assert set(raw) == {"pid", "image", "tokens", "split"}
        assert list(raw["image"]) == list(batch["image"])  # the JPEG bytes pass through untouched
        pil_path = decode_batch(batch, **DECODE)
        np.testing.assert_array_equal(raw["tokens"], pil_path["tokens"])

        pil = NetworkFeatureExtractor(str(checkpoint), device="cpu")(pil_path)
        device = NetworkFeatureExtractor(str(checkpoint), device="cpu", **DEVICE_DECODE)(raw)
        assert list(device["pid"]) == list(batch["pid"]) and list(device["split"]) == list(batch["split"])
        for name in TENSOR_OUTPUTS:
            assert device[name].dtype == np.float32 and device[name].shape == pil[name].shape
            gap = np.abs(device[name] - pil[name]).max()
            assert gap <= FEATURE_RTOL * np.abs(pil[name]).max(), (image_size, name, gap)
        np.testing.assert_array_equal(device["text_embedding"], pil["text_embedding"])
        assert (device["pred_subcategory"] == pil["pred_subcategory"]).mean() >= 0.9

    with pytest.raises(ValueError, match="built without image_size"):
        NetworkFeatureExtractor(str(checkpoint), device="cpu")(raw)


def test_extractor_runs_the_model_under_autocast_and_returns_float32(checkpoint: Path, monkeypatch) -> None:
    """On CUDA ``autocast`` is bf16; here CPU bf16 autocast stands in for it."""
    import smpp_ray.model.precision as precision

    posts = make_posts(8, seed=3, users=2, image_size=24)
    decoded = decode_batch({name: posts[name].to_numpy() for name in ("pid", "image", "title", "tags")}, **DECODE)
    extractor = NetworkFeatureExtractor(str(checkpoint), device="cpu")
    plain = extractor(decoded)
    devices = []

    def bf16(device):
        devices.append(device)
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(precision, "autocast", bf16)
    low = extractor(decoded)
    assert devices == [torch.device("cpu")]
    for name in TENSOR_OUTPUTS:
        assert low[name].dtype == np.float32, name
        np.testing.assert_allclose(low[name], plain[name], atol=0.1 * np.abs(plain[name]).max() + 1e-6, err_msg=name)
    assert not np.array_equal(low["fused"], plain["fused"])  # it did run in bf16


def test_decode_concurrency_keeps_the_pool_fed_within_the_cpus() -> None:
    assert decode_concurrency(8, 2000.0, 300.0, cpu_cap=96) == math.ceil(8 * 2000 / 300) == 54
    assert decode_concurrency(8, 2000.0, 300.0, cpu_cap=32) == 32
    assert decode_concurrency(2, 100.0, 5000.0, cpu_cap=8) == 1
    assert decode_concurrency(4, 0.0, 300.0, cpu_cap=12) == 12  # actor rate unknown: every free CPU
    assert decode_concurrency(4, float("nan"), 300.0, cpu_cap=12) == 12
    assert decode_concurrency(4, 100.0, 300.0, cpu_cap=0) == 1


def test_decode_blocks_carry_whole_batches_within_the_pixel_budget() -> None:
    # Small images: several batches per block (the per-block cost set the pace at one)
    assert decode_block_rows(32, 32) == 8 * 32
    # A real backbone's input: one batch's pixels already fill the budget, one batch per block
    assert decode_block_rows(256, 224) == 256
    for batch, size in ((32, 32), (64, 64), (128, 96), (256, 224), (16, 384), (1, 16)):
        rows = decode_block_rows(batch, size)
        assert rows % batch == 0 and batch <= rows <= 8 * batch, (batch, size, rows)
        if rows > batch:
            assert rows * 3 * size ** 2 * 4 <= DECODED_BLOCK_BYTES, (batch, size, rows)
    # A small corpus still makes 4 blocks per actor, so every actor gets work
    assert decode_block_rows(8, 32, rows=96, actors=2) == 8
    assert decode_block_rows(32, 32, rows=2048, actors=1) == 8 * 32
    assert decode_block_rows(32, 32, rows=512, actors=1) == 4 * 32
    assert decode_block_rows(32, 32, rows=10, actors=4) == 32
    # A decode task reserves memory for the block it decodes, not one batch
    assert decode_stage_memory(32, 32) - decode_stage_memory(32, 32, decode_images=False) == 2 * 256 * 3 * 32 ** 2 * 4


def test_fused_vector_is_projected_like_the_embeddings() -> None:
    batch = {name: np.arange(6, dtype=np.float32).reshape(3, 2) for name in TENSOR_OUTPUTS}
    batch.update(pred_subcategory=np.array([1, 2, 3]), pred_category=np.array([0, 0, 1]))
    whole = network_feature_columns(batch, {})
    assert whole["net_fused_1"].tolist() == [1.0, 3.0, 5.0] and "net_fused_pc_0" not in whole
    projected = network_feature_columns(batch, {"fused": (np.ones(2), np.array([[1.0, -1.0]]))})
    assert projected["net_fused_pc_0"].tolist() == [-1.0, -1.0, -1.0]  # (x - 1) @ [1, -1]
    assert not any(c.startswith("net_fused_") and "_pc_" not in c for c in projected)
    assert "net_image_embedding_0" in projected  # only the outputs given a PCA are projected


def test_ray_gpu_decode_extraction_writes_every_post_once(ray_session, checkpoint: Path, tmp_path: Path) -> None:
    posts = make_posts(64, seed=17, users=4, image_size=40)
    dataset = write_dataset(posts, tmp_path / "data")
    config = ExtractConfig(batch_size=8, min_actors=2, max_actors=2, cpus_per_actor=1, pca_components=3,
                           user_description_components=2, gpu_decode=True)
    out_dir = tmp_path / "features"
    result = extract_features(str(dataset), str(checkpoint), str(out_dir), extract_config=config)
    assert result["rows"] == posts.groupby("split").size().to_dict() and 1 <= result["actors_used"] <= 2
    # the decode stage was sized from rates measured on the driver, within the CPUs the actors leave
    assert result["gpu_decode"] is True and result["decode_images_per_s"] > 0
    assert result["expected_actor_images_per_s"] > 0 and result["decode_concurrency_from"] == "rates"
    expected_size = decode_concurrency(2, result["expected_actor_images_per_s"], result["decode_images_per_s"],
                                       cpu_cap=4 - 2)
    assert result["decode_concurrency"] == result["decode_concurrency_auto"] == expected_size

    out = _read_all(out_dir)
    assert out.index.is_unique and set(out.index) == set(posts["pid"])  # every post exactly once
    out = out.loc[posts["pid"]]
    expected = _in_process_outputs(checkpoint, posts)  # the PIL path, in this process
    for name, width in (("prob_sub", 77), ("prob_cat", 11), ("sim_visual", 88), ("sim_text", 88)):
        values = out[[f"net_{name}_{i}" for i in range(width)]].to_numpy()
        assert np.abs(values - expected[name]).max() <= FEATURE_RTOL * np.abs(expected[name]).max(), name
    # the fused vector enters PCA-reduced, fitted on train only, like the embeddings
    manifest = FeatureSet(str(out_dir)).manifest()
    network = select_columns(manifest, ["network"])
    assert {f"net_fused_pc_{i}" for i in range(3)} <= set(network)
    assert not any(c.startswith("net_fused_") and "_pc_" not in c for c in network)
    train = (posts["split"] == "train").to_numpy()
    pca = fit_pca(expected["fused"][train], 3)
    fused = out[[f"net_fused_pc_{i}" for i in range(3)]].to_numpy()
    scale = np.abs(pca.transform(expected["fused"])).max()
    assert np.abs(fused - pca.transform(expected["fused"])).max() <= 0.05 * scale
    state = json.loads((out_dir / "feature_state" / "state.json").read_text())
    assert state["embedding_pcas"] == ["fused", "image", "text"] and result["fused_pca_variance"] > 0


def test_pca_fused_off_keeps_the_fused_vector_whole() -> None:
    from smpp_ray.features.extract import EMBEDDINGS, PCA_INPUTS, pca_inputs

    assert pca_inputs(ExtractConfig()) == PCA_INPUTS and "fused" in PCA_INPUTS
    assert pca_inputs(ExtractConfig(pca_fused=False)) == EMBEDDINGS
    with pytest.raises(ValueError, match="extract.decode_concurrency must be >= 0"):
        ExtractConfig(decode_concurrency=-1)
    with pytest.raises(ValueError, match="extract.actor_images_per_s must be >= 0"):
        ExtractConfig(actor_images_per_s=-5.0)
