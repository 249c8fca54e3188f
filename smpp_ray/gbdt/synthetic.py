"""A small synthetic features folder in the ``smpp extract`` layout, for tests and benchmarks.

Generative model (known signal): ``label = 1.5 * user_followers + sin(2 * hour_feature)
+ 0.8 * text_signal**2 + effect[device]`` + Gaussian noise (sd ``noise``), with
``noise_0..noise_k`` unrelated to the label. ``device`` is a categorical feature (strings) and
``category`` a key column. Posts are in time order; the last 15% / 15% go to val / test.
The folder may be any location (a local path or ``s3://...``).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import storage
from smpp_ray.features.manifest import FeatureColumn, FeatureSet

CATEGORIES = ("Animal", "Food", "Travel", "Sports")
DEVICES = ("android", "iphone", "camera", "scanner", "tablet")


def write_synthetic_features(out_dir: str | os.PathLike[str], *, rows: int = 3000, users: int = 80, noise_features: int = 4,
                             noise: float = 0.5, seed: int = 0, shards: int = 2) -> dict[str, Any]:
    """Write ``split=*/part-*.parquet`` and ``feature_manifest.json``; returns the manifest."""
    rng = np.random.default_rng(seed)
    out = storage.normalize(out_dir)
    uid = rng.integers(0, users, rows)
    followers = rng.normal(0, 1, users)[uid] + 0.1 * rng.normal(0, 1, rows)
    hour = rng.uniform(0, 2 * np.pi, rows)
    text = rng.normal(0, 1, rows)
    device = rng.choice(DEVICES, rows)
    effect = dict(zip(DEVICES, (0.0, 0.6, 1.2, -0.8, 0.3), strict=True))
    label = (1.5 * followers + np.sin(2 * hour) + 0.8 * text**2 + np.vectorize(effect.get)(device)
             + noise * rng.normal(0, 1, rows) + 5.0)
    frame = pd.DataFrame({
        "pid": np.arange(rows, dtype=np.int64) + 10_000,
        "uid": np.char.add("u", uid.astype(str)),
        "postdate": np.arange(rows, dtype=np.int64) * 3600 + 1_400_000_000,
        "label": label.astype(np.float64),
        "category": rng.choice(CATEGORIES, rows),
        "subcategory": rng.choice(["a", "b", "c"], rows),
        "user_followers": followers,
        "hour_feature": hour,
        "text_signal": text,
        "device": device,
    })
    columns = [FeatureColumn("user_followers", "user"), FeatureColumn("hour_feature", "time"),
               FeatureColumn("text_signal", "text"), FeatureColumn("device", "user", categorical=True)]
    for index in range(noise_features):
        frame[f"noise_{index}"] = rng.normal(0, 1, rows)
        columns.append(FeatureColumn(f"noise_{index}", "network"))
    bounds = {"train": (0, int(rows * 0.7)), "val": (int(rows * 0.7), int(rows * 0.85)), "test": (int(rows * 0.85), rows)}
    for split, (start, stop) in bounds.items():
        chunk = frame.iloc[start:stop]
        for shard, rows_idx in enumerate(np.array_split(np.arange(len(chunk)), shards)):
            buffer = io.BytesIO()
            chunk.iloc[rows_idx].to_parquet(buffer, index=False, write_page_checksum=True)
            storage.write_bytes(storage.join(FeatureSet(out).split(split), f"part-{shard:05d}.parquet"), buffer.getvalue())
    return FeatureSet(out).write_manifest(columns)
