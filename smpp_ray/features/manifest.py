"""An extracted features folder (:class:`FeatureSet`, the one owner of its layout) and its feature
manifest: every feature column with its group, so ablations can switch groups off.

``FEATURES/feature_manifest.json``::

    {"key_columns": ["pid", "uid", "postdate", "label", "category", "subcategory"],
     "columns": [{"name": "user_log_photo_count", "group": "user", "categorical": false}, ...]}

Categorical columns hold non-negative integer codes (-1 unknown) in extracted features, ready
for LightGBM's ``categorical_feature`` and CatBoost's ``cat_features``; the GBDT stage codes any
categorical values (strings too) from the train split's vocabulary (:mod:`smpp_ray.gbdt.data`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from smpp_ray import storage

MANIFEST_FILE = "feature_manifest.json"
STATE_FOLDER = "feature_state"


def split_folder(split: str) -> str:
    """The folder name of one split's feature files, ``split=<name>`` (a Hive-style partition, as
    pyarrow and Ray Data read it)."""
    return f"split={split}"


@dataclass(frozen=True)
class FeatureSet:
    """An extracted features folder (``smpp extract``'s output), the one owner of its layout::

        FEATURES/feature_manifest.json   every column with its group (this module's format)
        FEATURES/split=<split>/*.parquet the key columns and features of one split
        FEATURES/feature_state/          what scoring a new post needs (:mod:`smpp_ray.features.state`)

    Any location :mod:`smpp_ray.storage` reads; kept as given.
    """

    location: str

    def __init__(self, location: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "location", str(location))

    @property
    def manifest_file(self) -> str:
        return storage.join(self.location, MANIFEST_FILE)

    def split(self, split: str) -> str:
        """The folder of one split's feature files."""
        return storage.join(self.location, split_folder(split))

    @property
    def state(self) -> str:
        """The feature state folder."""
        return storage.join(self.location, STATE_FOLDER)

    def manifest(self) -> dict[str, Any]:
        """Read and check the manifest: every key column present, every column a valid
        :class:`FeatureColumn`, no name twice. ValueError names the file and the fault."""
        location = self.manifest_file
        if not storage.is_file(location):
            raise ValueError(f"feature manifest {location!r} does not exist; run `smpp extract` first")
        manifest = storage.read_json(location)
        keys = manifest.get("key_columns", [])
        missing = [k for k in KEY_COLUMNS if k not in keys]
        if missing:
            raise ValueError(f"{location}: key_columns {keys!r} lack {missing!r}")
        try:
            _check_unique([c["name"] for c in manifest.get("columns", [])])
            for column in manifest.get("columns", []):
                FeatureColumn(column["name"], column["group"], bool(column.get("categorical", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{location}: {err}") from err
        return manifest

    def columns(self, groups: Iterable[str] = ()) -> list[str]:
        """The feature column names of ``groups`` (all when empty), in manifest order (:func:`select_columns`)."""
        return select_columns(self.manifest(), groups)

    def write_manifest(self, columns: Sequence[FeatureColumn]) -> dict[str, Any]:
        """Write the manifest of ``columns``; returns it."""
        manifest = build_manifest(columns)
        storage.write_json(self.manifest_file, manifest)
        return manifest


GROUPS = ("network", "user", "time", "text", "geo", "category", "history", "extra", "neighbours", "user_neighbours")
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


def build_manifest(columns: Sequence[FeatureColumn]) -> dict[str, Any]:
    """The manifest dict; fails on duplicate column names."""
    _check_unique([c.name for c in columns])
    return {"key_columns": list(KEY_COLUMNS),
            "columns": [{"name": c.name, "group": c.group, "categorical": c.categorical} for c in columns]}


def manifest_columns(manifest: dict[str, Any], groups: Iterable[str] = ()) -> list[FeatureColumn]:
    """The feature columns of the given groups (all groups when empty), in manifest order.

    ValueError on an unknown group, or when no column belongs to the groups (a model needs one).
    """
    wanted = tuple(groups)
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown feature group {unknown[0]!r}; expected some of {list(GROUPS)}")
    chosen = [FeatureColumn(c["name"], c["group"], bool(c.get("categorical", False))) for c in manifest["columns"]
              if not wanted or c["group"] in wanted]
    if not chosen:
        raise ValueError(f"no feature column belongs to groups {list(wanted) or list(GROUPS)!r}")
    return chosen


def select_columns(manifest: dict[str, Any], groups: Iterable[str] = ()) -> list[str]:
    """Feature column names of the given groups (all groups when empty), in manifest order."""
    return [c.name for c in manifest_columns(manifest, groups)]


def categorical_columns(manifest: dict[str, Any], names: Iterable[str] | None = None) -> list[str]:
    """Categorical feature names (restricted to ``names`` when given), in manifest order."""
    keep = None if names is None else set(names)
    return [c["name"] for c in manifest["columns"] if c.get("categorical") and (keep is None or c["name"] in keep)]


def _check_unique(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"feature column {name!r} is listed twice")
        seen.add(name)
