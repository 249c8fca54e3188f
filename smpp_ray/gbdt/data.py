"""Reading the features Parquet (written by ``smpp extract``) into model-ready frames.

Layout: ``FEATURES/split={train,val,test}/part-*.parquet`` plus ``FEATURES/feature_manifest.json``
= ``{"key_columns": [...], "columns": [{"name", "group", "categorical"}]}``. Every reader here
runs where it is called (a Tune trial, a refit task), so the data never passes through the driver.

Categorical feature values (strings or integers) are coded as int32 from a vocabulary built on
the *train* split only (sorted distinct values); values unseen in train get -1, which LightGBM
reads as missing and CatBoost as one more category. The :class:`FeatureSpec` holds that
vocabulary and is saved beside the models so prediction codes new rows the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST_NAME = "feature_manifest.json"
SPLITS = ("train", "val", "test")
FEATURE_GROUPS = ("network", "user", "time", "text", "geo", "category", "history")
REQUIRED_KEYS = ("pid", "uid", "postdate", "label", "category")


@dataclass(frozen=True)
class FeatureSpec:
    """Which columns a model reads, their groups, and the train-split vocabulary of categoricals."""

    features: tuple[str, ...]
    groups: dict[str, str]
    categorical: tuple[str, ...]
    vocabularies: dict[str, list[Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "groups": self.groups,
                "categorical": list(self.categorical), "vocabularies": self.vocabularies}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeatureSpec:
        return cls(features=tuple(values["features"]), groups=dict(values["groups"]),
                   categorical=tuple(values["categorical"]), vocabularies=dict(values["vocabularies"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {value!r} of type {type(value).__name__} to JSON")


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def load_feature_manifest(features_dir: str) -> dict[str, Any]:
    """The manifest, checked: key columns present, every column has a known group."""
    import pyarrow.fs as pafs

    path = _join(str(features_dir), MANIFEST_NAME)
    fs, fs_path = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    try:
        with fs.open_input_stream(fs_path) as f:
            manifest = json.loads(f.read().decode())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"feature manifest {path!r} does not exist; run `smpp extract` first") from err
    keys = manifest.get("key_columns", [])
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{path}: key_columns {keys!r} lack {missing!r}")
    for index, column in enumerate(manifest.get("columns", [])):
        if column.get("group") not in FEATURE_GROUPS:
            raise ValueError(f"{path}: columns[{index}] ({column.get('name')!r}) has group "
                             f"{column.get('group')!r}; expected one of {list(FEATURE_GROUPS)}")
    return manifest


def select_columns(manifest: dict[str, Any], feature_groups: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Manifest columns of the requested groups (all when empty), in manifest order."""
    unknown = sorted(set(feature_groups) - set(FEATURE_GROUPS))
    if unknown:
        raise ValueError(f"unknown feature group {unknown[0]!r}; expected some of {list(FEATURE_GROUPS)}")
    chosen = [c for c in manifest["columns"] if not feature_groups or c["group"] in feature_groups]
    if not chosen:
        raise ValueError(f"no feature column belongs to groups {list(feature_groups)!r}")
    return chosen


def read_split(features_dir: str, split: str, columns: list[str] | None = None) -> pd.DataFrame:
    """One split as pandas, in time order (postdate, then pid) so row order never depends on files."""
    import pyarrow.dataset as ds

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    path = _join(str(features_dir), f"split={split}")
    try:
        table = ds.dataset(path, format="parquet").to_table(columns=columns)
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"features split {path!r} cannot be read: {err}") from err
    frame = table.to_pandas()
    if "postdate" in frame.columns and "pid" in frame.columns:
        frame = frame.sort_values(["postdate", "pid"], kind="stable").reset_index(drop=True)
    return frame


def build_spec(manifest: dict[str, Any], train: pd.DataFrame, feature_groups: tuple[str, ...] = ()) -> FeatureSpec:
    """Feature spec with categorical vocabularies from the train split."""
    chosen = select_columns(manifest, feature_groups)
    missing = [c["name"] for c in chosen if c["name"] not in train.columns]
    if missing:
        raise ValueError(f"feature columns {missing!r} are in the manifest but not in split=train")
    categorical = tuple(c["name"] for c in chosen if c.get("categorical"))
    vocab = {name: sorted(pd.unique(train[name].dropna()).tolist()) for name in categorical}
    return FeatureSpec(features=tuple(c["name"] for c in chosen), groups={c["name"]: c["group"] for c in chosen},
                       categorical=categorical, vocabularies=vocab)


def encode(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """The model matrix: numeric features as float64, categoricals as int32 codes (-1 unseen/missing)."""
    missing = [name for name in spec.features if name not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks feature columns {missing!r}")
    out: dict[str, np.ndarray] = {}
    for name in spec.features:
        if name in spec.categorical:
            lookup = {value: code for code, value in enumerate(spec.vocabularies[name])}
            out[name] = frame[name].map(lookup).fillna(-1).to_numpy(dtype=np.int32)
        else:
            out[name] = pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=np.float64)
    return pd.DataFrame(out, index=frame.index)


@dataclass
class SplitData:
    """Encoded features, labels and the key columns needed for evaluation of one split."""

    X: pd.DataFrame
    y: np.ndarray
    keys: pd.DataFrame


def load_splits(features_dir: str, feature_groups: tuple[str, ...] = (),
                splits: tuple[str, ...] = SPLITS) -> tuple[FeatureSpec, dict[str, SplitData]]:
    """Read, check and encode the requested splits (train is always read: it defines the vocabulary)."""
    manifest = load_feature_manifest(features_dir)
    chosen = [c["name"] for c in select_columns(manifest, feature_groups)]
    keys = [k for k in ("pid", "uid", "postdate", "label", "category") if k in manifest["key_columns"]]
    frames = {s: read_split(features_dir, s, keys + chosen) for s in dict.fromkeys(("train", *splits))}
    spec = build_spec(manifest, frames["train"], feature_groups)
    data: dict[str, SplitData] = {}
    for split, frame in frames.items():
        y = frame["label"].to_numpy(dtype=np.float64, na_value=np.nan)
        if split != "test" and not np.isfinite(y).all():
            bad = int(np.flatnonzero(~np.isfinite(y))[0])
            raise ValueError(f"split={split} row {bad} (pid {frame['pid'].iloc[bad]!r}) has no label; "
                             "train and val must be fully labelled")
        data[split] = SplitData(X=encode(frame, spec), y=y, keys=frame[keys].reset_index(drop=True))
    logger.info("loaded features %s: %s, %d features (%d categorical)", features_dir,
                {s: len(d.y) for s, d in data.items()}, len(spec.features), len(spec.categorical))
    return spec, data


def group_folds(uids: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """GroupKFold by user: ``(train_idx, val_idx)`` pairs in which no uid is on both sides."""
    from sklearn.model_selection import GroupKFold

    distinct = len(pd.unique(uids))
    if distinct < folds:
        raise ValueError(f"grouped validation needs at least {folds} users, found {distinct}")
    splitter = GroupKFold(n_splits=folds)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(uids)), groups=uids)]

