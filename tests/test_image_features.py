"""Stored image-tower outputs (train.cache_image_features): the format, the encoder, the key.

The end-to-end path (Ray Data encoding to S3, workers streaming the stored features, logits
equal to the pixel path's) is covered by the S3 training run in tests/test_train_s3.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from smpp_ray.config import ModelConfig, TrainConfig
from smpp_ray.data.taxonomy_names import default_taxonomy
from smpp_ray.model.model import seeded_model
from smpp_ray.train.data import collate_batch
from smpp_ray.train.image_features import (
    PATCHES,
    POOLED,
    ImageTowerEncoder,
    features_key,
    image_features_of,
)
from smpp_ray.train.loop import forward_batch

CONFIG = ModelConfig(use_prototypes=False)


def _encoder(dtype: str, seed: int = 0, config: ModelConfig = CONFIG) -> ImageTowerEncoder:
    return ImageTowerEncoder(dataclasses.asdict(config), default_taxonomy().to_dict(), None, seed, dtype)


def _decoded_batch(size: int, side: int) -> dict[str, np.ndarray]:
    """What the decode stage hands the encoder: pixels, tokens and the pass-through columns."""
    rng = np.random.default_rng(0)
    return {"pixels": rng.standard_normal((size, 3, side, side)).astype(np.float32),
            "tokens": np.asarray(seeded_model(CONFIG, default_taxonomy(), None, 0).backbone.tokenize(
                [f"post {i}" for i in range(size)])),
            "pid": np.array([f"p{i}" for i in range(size)], dtype=object),
            "subcategory_id": np.arange(size, dtype=np.int64), "category_id": np.zeros(size, dtype=np.int64),
            "label": rng.standard_normal(size)}


@pytest.fixture(scope="module")
def model():
    return seeded_model(CONFIG, default_taxonomy(), None, 0).eval()


def _logits_both_ways(model, dtype: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    encoder = _encoder(dtype)
    decoded = _decoded_batch(6, model.backbone.image_size)
    stored = encoder(dict(decoded))
    batch = collate_batch(stored)
    with torch.no_grad():
        from_features = forward_batch(model, batch)["logits_sub"]
        from_pixels = model(torch.from_numpy(decoded["pixels"]), batch["tokens"])["logits_sub"]
    return from_features, from_pixels, stored


def test_float32_features_give_the_pixel_paths_logits(model):
    from_features, from_pixels, stored = _logits_both_ways(model, "float32")
    assert "pixels" not in stored and stored[POOLED].dtype == np.float32
    assert stored[POOLED].shape == (6, 64) and stored[PATCHES].ndim == 3 and stored[PATCHES].shape[::2] == (6, 64)
    assert list(stored["pid"]) == [f"p{i}" for i in range(6)]  # pass-through columns kept, in order
    torch.testing.assert_close(from_features, from_pixels, rtol=1e-5, atol=1e-5)


def test_bfloat16_features_are_stored_as_raw_bits_and_stay_close(model):
    from_features, from_pixels, stored = _logits_both_ways(model, "bfloat16")
    assert stored[POOLED].dtype == np.int16  # bf16 bits: Parquet and numpy have no bf16
    pooled, patches = image_features_of(collate_batch(stored))
    assert pooled.dtype == patches.dtype == torch.float32
    with torch.no_grad():
        exact, _ = model.backbone.encode_image(torch.from_numpy(_decoded_batch(6, model.backbone.image_size)["pixels"]))
    # bf16 keeps 8 mantissa bits: each value within 2**-8 of itself, relatively.
    torch.testing.assert_close(pooled, exact.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert float(((pooled - exact).abs() / exact.abs().clamp_min(1e-6)).max()) <= 2 ** -8
    # Measured here: logits differ by ~1e-2 at most (the scale multiplies cosine similarities).
    torch.testing.assert_close(from_features, from_pixels, rtol=0.05, atol=0.05)
    assert not torch.equal(from_features, from_pixels)


def test_encoder_builds_the_workers_tower_for_the_same_seed(model):
    same = _encoder("float32", seed=0).backbone.state_dict()
    worker = model.backbone.state_dict()
    assert model.backbone.randomly_initialised
    assert same.keys() == worker.keys() and all(torch.equal(same[k], worker[k]) for k in worker)


def test_encoder_refuses_a_training_image_tower():
    with pytest.raises(ValueError, match="frozen image tower"):
        _encoder("float32", config=ModelConfig(use_prototypes=False, unfreeze_image_blocks=1))


def test_features_key_follows_what_the_features_depend_on(tmp_path):
    from smpp_ray.data.dataset import Dataset

    data = str(tmp_path / "data")
    for split in ("train", "val"):
        folder = tmp_path / Dataset(data).posts(split)
        folder.mkdir(parents=True)
        (folder / "part-0.parquet").write_bytes(b"x" * 10)

    def key(**changes):
        args = {"model_config": CONFIG, "seed": 0, "dtype": "bfloat16", "image_size": 64, "context_length": 32}
        args.update(changes)
        return features_key(data, ("train", "val"), **args)

    base = key()
    assert key() == base
    assert len({base, key(seed=1), key(dtype="float32"), key(image_size=96),
                key(model_config=dataclasses.replace(CONFIG, pretrained="/w.pt"))}) == 5
    (tmp_path / Dataset(data).posts("val") / "part-1.parquet").write_bytes(b"y")
    assert key() != base  # new data files: recompute


def test_train_config_checks_the_feature_dtype_and_prefetch():
    with pytest.raises(ValueError, match="image_features_dtype 'float16'"):
        TrainConfig(image_features_dtype="float16")
    with pytest.raises(ValueError, match="prefetch_batches must be >= 0"):
        TrainConfig(prefetch_batches=-1)
