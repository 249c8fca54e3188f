"""The feature matrices once per node, shared read-only by every trial on it.

Without this every trial reads the features Parquet itself: with ``tune.max_concurrent_trials``
trials on a node, each holds its own frame, and the read alone peaks at several times the frame
(Arrow table, pandas blocks, LightGBM's float32 copy). At SMPD size (305k rows x ~330 float32
columns, ~0.4 GB) a node of 24 concurrent trials needs tens of GB for identical data.

Here the driver reads and encodes the splits once (:func:`load_matrices`) and
``tune.with_parameters`` puts them in Ray's object store as plain NumPy arrays: one float32 C-ordered matrix per split (categorical codes as
float32: exact for any vocabulary below 2**24), the labels and the key columns. Ray moves the
object to each node that runs a trial once; every trial there gets zero-copy, read-only views of
the same shared-memory buffer (:func:`get_matrices`). LightGBM builds its Dataset straight from
that matrix, so a trial's private memory is the booster's bins, not the data. CatBoost cannot
take float categoricals, so its trials build their frame privately from the shared matrix (its
quantised pool is its own copy in any case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray.gbdt.data import FeatureSpec, SplitData, load_splits


@dataclass(frozen=True)
class SharedMatrix:
    """One split as the trials see it: ``X`` a read-only float32 matrix (``spec.features`` order)."""

    X: np.ndarray
    y: np.ndarray
    uid: np.ndarray

    def frame(self, spec: FeatureSpec) -> pd.DataFrame:
        """A private DataFrame with categorical columns as integer codes (what CatBoost needs)."""
        from smpp_ray.gbdt.data import code_dtype

        columns = {}
        for i, name in enumerate(spec.features):
            values = self.X[:, i]
            columns[name] = (values.astype(code_dtype(len(spec.vocabularies[name])))
                             if name in spec.categorical else np.array(values))
        return pd.DataFrame(columns)


def to_payload(spec: FeatureSpec, data: dict[str, SplitData], validation: str = "time") -> dict[str, Any]:
    """Encoded splits as plain arrays (what the object store shares zero-copy): ``train`` and
    ``val`` for time validation, their concatenation ``train+val`` for grouped validation (its
    folds index into one matrix)."""
    def arrays(parts: list[SplitData]) -> dict[str, np.ndarray]:
        return {"X": np.ascontiguousarray(np.concatenate([p.X.to_numpy(dtype=np.float32) for p in parts])),
                "y": np.ascontiguousarray(np.concatenate([p.y for p in parts]), dtype=np.float64),
                "uid": np.concatenate([p.keys["uid"].to_numpy(dtype=str) for p in parts])}

    if validation == "group":
        return {"spec": spec.to_dict(), "splits": {"train+val": arrays([data["train"], data["val"]])}}
    return {"spec": spec.to_dict(), "splits": {split: arrays([data[split]]) for split in ("train", "val")}}


def load_matrices(features_dir: str, feature_groups: tuple[str, ...], *, validation: str = "time",
                  selected_ids: str = "") -> dict[str, Any]:
    """Read and encode train and val once (here: the driver) as the trials' shared payload; the
    encoded frames are dropped on return, the arrays are what ``tune.with_parameters`` puts in
    the object store."""
    spec, data = load_splits(features_dir, feature_groups, splits=("train", "val"), selected_ids=selected_ids)
    return to_payload(spec, data, validation)


def get_matrices(ref_or_payload: Any) -> tuple[FeatureSpec, dict[str, SharedMatrix]]:
    """The spec and the shared splits of :func:`load_matrices`' payload (an ObjectRef, or the
    object itself as ``tune.with_parameters`` hands it over): views into the node's shared memory."""
    payload = ref_or_payload
    if not isinstance(payload, dict):
        import ray

        payload = ray.get(payload)
    spec = FeatureSpec.from_dict(payload["spec"])
    return spec, {split: SharedMatrix(values["X"], values["y"], values["uid"])
                  for split, values in payload["splits"].items()}
