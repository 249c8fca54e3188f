"""Frozen image-tower outputs computed once per run and streamed to the workers in place of pixels.

With the image tower frozen, a post's (un-augmented) tower outputs never change, yet decoding
its JPEG and running the tower is most of a training step on CPU and a large share on GPU. So
``train.cache_image_features`` runs one Ray Data job before training:

    posts (Parquet) -> decode + tokenise (CPU tasks) -> ImageTowerEncoder (actor pool) -> Parquet

into ``<run>/image_features/<split>/`` on the run's storage. Each row keeps everything a
training batch needs except the pixels: ``pid``, ``uid``, ``tokens``, the label columns, and
``image_pooled`` ``(D,)`` and ``image_patches`` ``(P, D)``. Every epoch then reads those files
like any other dataset, so no worker holds more than its streaming window, whatever the corpus.

This module owns that format. bf16 (the default) is stored as its raw 16 bits in an int16
tensor column (Parquet and numpy have no bf16); :func:`image_features_of` turns a collated batch
back into the float tensors :meth:`SMPPModel.forward` takes.

The features are reused across relaunches while the key (backbone, weights, seed, geometry,
dtype, and each split's file listing) is unchanged; ``_manifest.json``, written last, marks a
complete set, so a job killed mid-write recomputes instead of training on a partial set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any, Literal

import numpy as np
import torch

from smpp_ray import console, storage
from smpp_ray.config import ModelConfig
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.schema import Taxonomy

logger = logging.getLogger(__name__)

#: Folder under the run's storage path.
FEATURES_DIR = "image_features"
#: Written last: what was computed, from what, and how many rows per split.
MANIFEST = "_manifest.json"
#: Column names of the tower outputs (``pixels`` is dropped).
POOLED, PATCHES = "image_pooled", "image_patches"

FeatureDtype = Literal["bfloat16", "float32"]


def image_features_location(run_path: str) -> str:
    return storage.join(run_path, FEATURES_DIR)


class ImageTowerEncoder:
    """Callable class for ``map_batches``: a decoded batch with ``pixels`` -> the same batch with
    ``image_pooled`` / ``image_patches`` instead.

    The backbone is built exactly as a training worker builds it (:func:`seeded_model` with the
    run's seed), so a randomly initialised tower has the same weights here as there.
    """

    def __init__(self, model_config: dict[str, Any], taxonomy: dict[str, Any], prototypes_path: str | None,
                 seed: int, dtype: FeatureDtype, device: str = "cpu", num_threads: int = 0) -> None:
        from smpp_ray.model.model import seeded_model

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        model = seeded_model(ModelConfig(**model_config), Taxonomy.from_dict(taxonomy), prototypes_path, seed)
        if not model.backbone.image_tower_frozen:
            raise ValueError("train.cache_image_features needs a frozen image tower (model.unfreeze_image_blocks=0)")
        self.backbone = model.backbone.to(self.device).eval()
        self.dtype = dtype
        logger.info("image-tower encoder %s:%d on %s (%s)", socket.gethostname(), os.getpid(), self.device, dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from smpp_ray.model.precision import autocast

        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"], dtype=np.float32)).to(self.device)
        with torch.inference_mode(), autocast(self.device):
            pooled, patches = self.backbone.encode_image(pixels)  # (B, D), (B, P, D)
        out = {name: values for name, values in batch.items() if name != "pixels"}
        out[POOLED] = to_stored(pooled, self.dtype)
        out[PATCHES] = to_stored(patches, self.dtype)
        return out


def to_stored(values: torch.Tensor, dtype: FeatureDtype) -> np.ndarray:
    """Tower outputs as the stored numpy array: float32, or bf16's raw bits as int16."""
    if dtype == "float32":
        return values.float().cpu().numpy()
    return values.to(torch.bfloat16).cpu().view(torch.int16).numpy()


def image_features_of(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(pooled (B, D), patches (B, P, D))`` float32 from a collated batch, or None without them."""
    if POOLED not in batch:
        return None
    return _from_stored(batch[POOLED]), _from_stored(batch[PATCHES])


def _from_stored(values: torch.Tensor) -> torch.Tensor:
    if values.dtype == torch.int16:  # bf16 bits
        values = values.view(torch.bfloat16)
    return values.float()


def features_key(data_dir: str, splits: tuple[str, ...], model_config: ModelConfig, seed: int,
                 dtype: FeatureDtype, image_size: int, context_length: int) -> str:
    """What the stored features depend on; a different key recomputes them."""
    facts = {"backbone": model_config.backbone, "pretrained": model_config.pretrained, "seed": seed,
             "dtype": dtype, "image_size": image_size, "context_length": context_length,
             "inputs": {split: storage.fingerprint(Dataset(data_dir).posts(split)) for split in splits}}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def read_manifest(location: str) -> dict[str, Any] | None:
    path = storage.join(location, MANIFEST)
    return storage.read_json(path) if storage.is_file(path) else None


def build_image_features(data_dir: str, location: str, *, splits: tuple[str, ...], spec: Any,
                         model_config: ModelConfig, taxonomy: Taxonomy, prototypes_path: str | None, seed: int,
                         dtype: FeatureDtype, actors: int, cpus_per_actor: float, gpus_per_actor: float,
                         batch_size: int) -> dict[str, Any]:
    """Encode every post of ``splits`` once into ``location`` (or reuse a complete matching set).

    Returns ``location``, ``rows`` per split, ``reused``, ``seconds`` and ``posts_per_s`` (of
    this call's encoding; 0 when reused). Every input post comes out exactly once or this raises.
    """
    import ray.data

    from smpp_ray.data.reads import parquet_rows, read_parquet
    from smpp_ray.model.preprocess import BatchPreprocessor
    from smpp_ray.train.data import INPUT_COLUMNS, PREPROCESS_BATCH_ROWS, count_rows

    key = features_key(data_dir, splits, model_config, seed, dtype, spec.image_size, spec.context_length)
    previous = read_manifest(location)
    if previous is not None and previous.get("key") == key:
        logger.info("image features at %s match this run (key %s): reused", location, key)
        return {"location": location, "rows": previous["rows"], "reused": True, "seconds": 0.0, "posts_per_s": 0.0}

    started = time.perf_counter()
    storage.reset_dir(location)  # drops a stale or partial set, manifest included
    preprocessor = BatchPreprocessor(spec.backbone, spec.image_size, spec.context_length, train=False,
                                     mean=spec.mean, std=spec.std)
    encoder_kwargs = {"model_config": dataclasses.asdict(model_config), "taxonomy": taxonomy.to_dict(),
                      "prototypes_path": prototypes_path, "seed": seed, "dtype": dtype,
                      "device": "cuda" if gpus_per_actor > 0 else "cpu",
                      "num_threads": max(1, int(cpus_per_actor)) if gpus_per_actor == 0 else 0}
    rows: dict[str, int] = {}
    for split in splits:
        expected = count_rows(data_dir, split)
        target = storage.join(location, split)
        (read_parquet(Dataset(data_dir).posts(split)).select_columns(INPUT_COLUMNS)
         .map_batches(preprocessor, batch_size=PREPROCESS_BATCH_ROWS, batch_format="numpy", num_cpus=1)
         .map_batches(ImageTowerEncoder, fn_constructor_kwargs=encoder_kwargs, batch_size=batch_size,
                      batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                      num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
         .write_parquet(target))
        rows[split] = parquet_rows(target)
        if rows[split] != expected:
            raise RuntimeError(f"image features of split {split!r} at {target!r} hold {rows[split]} rows, "
                               f"but the split has {expected} posts")
    seconds = time.perf_counter() - started
    storage.write_json(storage.join(location, MANIFEST),
                       {"key": key, "rows": rows, "dtype": dtype, "backbone": model_config.backbone,
                        "seconds": round(seconds, 3)})
    total = sum(rows.values())
    # The trainer says it on the console; the log file keeps the precise figure.
    console.details(__name__).info("image features: %d posts encoded once in %.1f s into %s", total, seconds,
                                   location)
    return {"location": location, "rows": rows, "reused": False, "seconds": seconds,
            "posts_per_s": total / seconds if seconds > 0 else 0.0}


def feature_split_dataset(location: str, split: str, *, kept_ids: str = ""):
    """A lazy Ray Dataset of one split's stored features (``kept_ids``: as in ``create_split_dataset``)."""
    from smpp_ray.data.reads import read_parquet

    dataset = read_parquet(storage.join(location, split))
    if kept_ids:
        from smpp_ray.data.selection import KeptPostsFilter

        dataset = dataset.map_batches(KeptPostsFilter(kept_ids), batch_format="pyarrow", num_cpus=1)
    return dataset
