"""A small synthetic features folder in the ``smpp extract`` layout, for tests and benchmarks.

Generative model (known signal): ``label = 1.5 * user_followers + sin(2 * hour_feature)
+ 0.8 * text_signal**2 + effect[device]`` + Gaussian noise (sd ``noise``), with
``noise_0..noise_k`` unrelated to the label. ``device`` is a categorical feature (strings) and
``category`` a key column. Posts are in time order; the last 15% / 15% go to val / test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CATEGORIES = ("Animal", "Food", "Travel", "Sports")
DEVICES = ("android", "iphone", "camera", "scanner", "tablet")


def write_synthetic_features(out_dir: str | Path, *, rows: int = 3000, users: int = 80, noise_features: int = 4,
                             noise: float = 0.5, seed: int = 0, shards: int = 2) -> dict[str, Any]:
    """Write ``split=*/part-*.parquet`` and ``feature_manifest.json``; returns the manifest."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
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
    columns = [{"name": "user_followers", "group": "user", "categorical": False},
               {"name": "hour_feature", "group": "time", "categorical": False},
               {"name": "text_signal", "group": "text", "categorical": False},
               {"name": "device", "group": "user", "categorical": True}]
    for index in range(noise_features):
        frame[f"noise_{index}"] = rng.normal(0, 1, rows)
        columns.append({"name": f"noise_{index}", "group": "network", "categorical": False})
    bounds = {"train": (0, int(rows * 0.7)), "val": (int(rows * 0.7), int(rows * 0.85)), "test": (int(rows * 0.85), rows)}
    for split, (start, stop) in bounds.items():
        folder = out / f"split={split}"
        folder.mkdir(parents=True, exist_ok=True)
        chunk = frame.iloc[start:stop]
        for shard, rows_idx in enumerate(np.array_split(np.arange(len(chunk)), shards)):
            chunk.iloc[rows_idx].to_parquet(folder / f"part-{shard:05d}.parquet", index=False)
    manifest = {"key_columns": ["pid", "uid", "postdate", "label", "category", "subcategory"], "columns": columns}
    (out / "feature_manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
