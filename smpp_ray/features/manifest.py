"""The feature manifest: every feature column with its group, so ablations can switch groups off.

``FEATURES/feature_manifest.json``::

    {"key_columns": ["pid", "uid", "postdate", "label", "category", "subcategory"],
     "columns": [{"name": "user_log_photo_count", "group": "user", "categorical": false}, ...]}

Categorical columns hold non-negative integer codes (-1 unknown), ready for LightGBM's
``categorical_feature`` and CatBoost's ``cat_features``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from smpp_ray import storage

MANIFEST_FILE = "feature_manifest.json"
GROUPS = ("network", "user", "time", "text", "geo", "category", "history")
KEY_COLUMNS = ("pid", "uid", "postdate", "label", "category", "subcategory")


@dataclass(frozen=True)
class FeatureColumn:
    """One feature column of the output Parquet files."""

    name: str
    group: str
    categorical: bool = False

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"feature {self.name!r} has unknown group {self.group!r}; expected one of {list(GROUPS)}")
        if self.name in KEY_COLUMNS:
            raise ValueError(f"feature {self.name!r} collides with a key column")


def build_manifest(columns: Sequence[FeatureColumn]) -> dict:
    """The manifest dict; fails on duplicate column names."""
    seen: set[str] = set()
    for column in columns:
        if column.name in seen:
            raise ValueError(f"feature column {column.name!r} is listed twice")
        seen.add(column.name)
    return {"key_columns": list(KEY_COLUMNS),
            "columns": [{"name": c.name, "group": c.group, "categorical": c.categorical} for c in columns]}


def write_feature_manifest(features_dir: str, columns: Sequence[FeatureColumn]) -> dict:
    manifest = build_manifest(columns)
    storage.write_json(storage.join(features_dir, MANIFEST_FILE), manifest)
    return manifest


def load_feature_manifest(features_dir: str) -> dict:
    """Read ``features_dir/feature_manifest.json``; a clear error when it is missing."""
    uri = storage.join(features_dir, MANIFEST_FILE)
    if not storage.is_file(uri):
        raise ValueError(f"feature manifest {uri!r} does not exist; run `smpp extract` first")
    return storage.read_json(uri)


def select_columns(manifest: dict, groups: Iterable[str] = ()) -> list[str]:
    """Feature column names of the given groups (all groups when empty), in manifest order."""
    wanted = set(groups)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown feature group(s) {sorted(unknown)}; expected a subset of {list(GROUPS)}")
    return [c["name"] for c in manifest["columns"] if not wanted or c["group"] in wanted]


def categorical_columns(manifest: dict, names: Iterable[str] | None = None) -> list[str]:
    """Categorical feature names (restricted to ``names`` when given), in manifest order."""
    keep = None if names is None else set(names)
    return [c["name"] for c in manifest["columns"] if c["categorical"] and (keep is None or c["name"] in keep)]
