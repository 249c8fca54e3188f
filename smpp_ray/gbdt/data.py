"""Reading the features Parquet (written by ``smpp extract``) into model-ready frames.

Layout: ``FEATURES/split={train,val,test}/part-*.parquet`` plus ``FEATURES/feature_manifest.json``
(read, checked and selected by group in :mod:`smpp_ray.features.manifest`, its one owner; the
names are re-exported here). ``FEATURES`` is any location (a local path, ``s3://...``). Every
reader here runs where it is called (a Tune trial, a refit task) and reads the location itself,
so the data never passes through the driver and no node needs the driver's disk.

Numeric features are float32 (:data:`FEATURE_DTYPE`): half the memory of float64 in every Tune
trial, at a precision the models hardly use (LightGBM bins each feature into at most ``max_bin``
values; CatBoost converts its input to float32 itself). Floating-point columns are cast as the
Parquet files are scanned, so no float64 copy of a split is ever held. Trials, refits and the
scorer all encode through :func:`encode`, so a model sees the same rounded values when it is fit
and when it predicts. Labels stay float64: one column, and the SRC/MAE the search ranks by.

Categorical feature values (strings or integers) are coded as integers (:func:`code_dtype`: int16
while the vocabulary fits, so a LightGBM matrix of float32 and int16 columns stays float32 rather
than being promoted to float64) from a vocabulary built on the *train* split only (sorted
distinct values); values unseen in train get -1, which LightGBM reads as missing and CatBoost as
one more category. The :class:`FeatureSpec` holds that
vocabulary and is saved beside the models (``feature_spec.json``, written and read only by
:meth:`FeatureSpec.save` / :meth:`FeatureSpec.load`) so prediction codes new rows the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import storage
from smpp_ray.features.manifest import (
    GROUPS,
    FeatureSet,
    categorical_columns,
    manifest_columns,
    select_columns,
)
from smpp_ray.gbdt.output import FEATURE_SPEC_FILE

logger = logging.getLogger(__name__)

__all__ = ["FEATURE_DTYPE", "FEATURE_SPEC_FILE", "GROUPS", "SPLITS", "FeatureSpec", "SplitData", "build_spec",
           "categorical_columns", "code_dtype", "encode", "group_folds", "load_splits",
           "read_split", "select_columns", "select_train_posts"]

#: dtype of the numeric feature columns in the model matrix.
FEATURE_DTYPE = np.float32
SPLITS = ("train", "val", "test")
#: Key columns read with the features: identity, time order, the label and the evaluation groups.
SPLIT_KEYS = ("pid", "uid", "postdate", "label", "category")


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

    def save(self, location: str) -> str:
        """Write the spec as JSON to ``location`` (any location); returns it normalised."""
        return storage.write_text(location, json.dumps(self.to_dict(), indent=1, default=_json_default))

    @classmethod
    def load(cls, location: str) -> FeatureSpec:
        """The spec written by :meth:`save` (e.g. ``storage.join(tune_dir, FEATURE_SPEC_FILE)``)."""
        return cls.from_dict(storage.read_json(location))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {value!r} of type {type(value).__name__} to JSON")


def verify_features(features_dir: str) -> dict[str, int]:
    """Read every features file once with its page checksums verified (streamed, nothing kept), so
    damage is exit 2 naming the file before any trial starts; returns the rows of each split."""
    import pyarrow.parquet as pq

    rows = dict.fromkeys(SPLITS, 0)
    for split in SPLITS:
        for location in storage.list_parquet_files(FeatureSet(features_dir).split(split)):
            fs, path = storage.resolve(location)
            try:
                with fs.open_input_file(path) as handle:
                    for batch in pq.ParquetFile(handle, page_checksum_verification=True).iter_batches(batch_size=65536):
                        rows[split] += batch.num_rows
            except OSError as err:
                raise ValueError(f"{location}: {err}; the features are damaged: rerun `smpp extract --force`") from err
    return rows


def check_split_sizes(rows: dict[str, int], min_val_posts: int, where: str) -> None:
    """Refuse (ValueError, exit 2) splits too small for the search: the best round, the best trial,
    the blend weights and the calibration are all chosen on val, and on a handful of posts that
    choice is noise (a 120-post corpus gives 12). ``where`` names what holds the splits."""
    val, train = int(rows.get("val", 0)), int(rows.get("train", 0))
    if val < min_val_posts or train < min_val_posts:
        raise ValueError(f"{where}: train holds {train} posts and val {val}; the search chooses its rounds, trials, "
                         f"blend weights and calibration on val and needs at least tune.min_val_posts="
                         f"{min_val_posts} in each. Give more posts or a larger data.val_fraction "
                         "(or lower tune.min_val_posts knowingly)")


def _damaged_file(dataset: Any, projection: Any) -> str | None:
    """The first file of ``dataset`` whose read fails its page checksums."""
    for fragment in dataset.get_fragments():
        try:
            fragment.to_table(columns=projection, fragment_scan_options=storage.parquet_scan_options())
        except OSError:
            return fragment.path
    return None


def read_split(features_dir: str, split: str, columns: list[str] | None = None, *,
               float32: Iterable[str] = ()) -> pd.DataFrame:
    """One split as pandas, in time order (postdate, then pid) so row order never depends on files.

    The ``float32`` columns that are float64 in the files are read as float32, cast batch by
    batch during the scan (other types are left to :func:`encode`). Sorting happens in Arrow,
    before the conversion, which frees each column as it converts it.
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    location = FeatureSet(features_dir).split(split)
    if not storage.is_dir(location):
        raise ValueError(f"features split {location!r} does not exist; run `smpp extract` first")
    fs, path = storage.resolve(location)
    dataset = ds.dataset(path, filesystem=fs, format="parquet")
    narrow = set(float32)
    projection: Any = columns
    if narrow:
        schema = dataset.schema
        projection = {name: ds.field(name).cast(pa.float32())
                      if name in narrow and name in schema.names and pa.types.is_float64(schema.field(name).type)
                      else ds.field(name) for name in (columns if columns is not None else schema.names)}
    try:
        table = dataset.to_table(columns=projection, fragment_scan_options=storage.parquet_scan_options())
    except OSError as err:   # a page whose CRC does not match: name the file, never read the values
        raise ValueError(f"{_damaged_file(dataset, projection) or location}: {err}; the features are damaged: "
                         "rerun `smpp extract --force`") from err
    if "postdate" in table.column_names and "pid" in table.column_names:
        # Arrow's sort is stable and puts nulls last, as pandas' stable sort did.
        table = table.sort_by([("postdate", "ascending"), ("pid", "ascending")])
    # split_blocks + self_destruct: columns become pandas blocks one by one, each Arrow buffer
    # freed as it is converted, instead of a consolidated copy beside the whole table.
    return table.to_pandas(split_blocks=True, self_destruct=True)


def build_spec(manifest: dict[str, Any], train: pd.DataFrame, feature_groups: tuple[str, ...] = ()) -> FeatureSpec:
    """Feature spec with categorical vocabularies from the train split."""
    chosen = manifest_columns(manifest, feature_groups)
    missing = [c.name for c in chosen if c.name not in train.columns]
    if missing:
        raise ValueError(f"feature columns {missing!r} are in the manifest but not in split=train")
    categorical = tuple(c.name for c in chosen if c.categorical)
    vocab = {name: sorted(pd.unique(train[name].dropna()).tolist()) for name in categorical}
    return FeatureSpec(features=tuple(c.name for c in chosen), groups={c.name: c.group for c in chosen},
                       categorical=categorical, vocabularies=vocab)


def code_dtype(vocabulary_size: int) -> type:
    """The integer type of a categorical's codes (-1 and ``0 .. vocabulary_size - 1``).

    int16 for vocabularies below 32768 values: LightGBM converts a frame to one numpy dtype,
    ``np.result_type`` of its columns, and float32 with int32 is float64 (a full-size copy).
    """
    return np.int16 if vocabulary_size <= np.iinfo(np.int16).max else np.int32


def encode(frame: pd.DataFrame, spec: FeatureSpec, *, dtype: Any = FEATURE_DTYPE) -> pd.DataFrame:
    """The model matrix: numeric features as ``dtype`` (float32), categoricals as integer codes
    (:func:`code_dtype`; -1 unseen/missing)."""
    missing = [name for name in spec.features if name not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks feature columns {missing!r}")
    out: dict[str, np.ndarray] = {}
    for name in spec.features:
        if name in spec.categorical:
            lookup = {value: code for code, value in enumerate(spec.vocabularies[name])}
            out[name] = frame[name].map(lookup).fillna(-1).to_numpy(dtype=code_dtype(len(lookup)))
        else:
            out[name] = pd.to_numeric(frame[name], errors="raise").to_numpy(dtype=dtype)
    return pd.DataFrame(out, index=frame.index)


@dataclass
class SplitData:
    """Encoded features, labels and the key columns needed for evaluation of one split."""

    X: pd.DataFrame
    y: np.ndarray
    keys: pd.DataFrame


def load_splits(features_dir: str, feature_groups: tuple[str, ...] = (),
                splits: tuple[str, ...] = SPLITS, *, selected_ids: str = "",
                _dtype: Any = FEATURE_DTYPE) -> tuple[FeatureSpec, dict[str, SplitData]]:
    """Read, check and encode the requested splits (train is always read: it defines the vocabulary).

    ``selected_ids`` (``tune.fit_on_selected``: the train stage's kept-ids file) keeps only the
    train posts that sample selection kept; val and test stay whole. The vocabulary is still
    built on all of train, so a model's :class:`FeatureSpec` does not depend on the selection.
    ``_dtype`` (tests only) is the numeric features' dtype; float64 reads the files as they are.
    """
    manifest = FeatureSet(features_dir).manifest()
    chosen = select_columns(manifest, feature_groups)
    keys = list(SPLIT_KEYS)
    categorical = set(categorical_columns(manifest, chosen))
    narrow = [c for c in chosen if c not in categorical and c not in keys] if np.dtype(_dtype) == np.float32 else []
    data: dict[str, SplitData] = {}
    spec: FeatureSpec | None = None
    # One raw split in memory at a time: each is encoded, and dropped, before the next is read.
    for split in dict.fromkeys(("train", *splits)):
        frame = read_split(features_dir, split, keys + chosen, float32=narrow)
        if spec is None:  # train comes first
            spec = build_spec(manifest, frame, feature_groups)
            if selected_ids:
                frame = select_train_posts(frame, selected_ids)
        y = frame["label"].to_numpy(dtype=np.float64, na_value=np.nan)
        if split != "test" and not np.isfinite(y).all():
            bad = int(np.flatnonzero(~np.isfinite(y))[0])
            raise ValueError(f"{split} split: row {bad} (pid {frame['pid'].iloc[bad]!r}) has no label; "
                             "train and val must be fully labelled")
        data[split] = SplitData(X=encode(frame, spec, dtype=_dtype), y=y, keys=frame[keys].reset_index(drop=True))
        del frame
    logger.info("loaded features %s: %s, %d features (%d categorical)", features_dir,
                {s: len(d.y) for s, d in data.items()}, len(spec.features), len(spec.categorical))
    return spec, data


def select_train_posts(train: pd.DataFrame, selected_ids: str) -> pd.DataFrame:
    """The rows of ``train`` whose pid the kept-ids file at ``selected_ids`` lists (order kept).

    A kept pid missing from the features means the two come from different datasets; fitting on
    the overlap would silently change the subset, so it is an error.
    """
    from smpp_ray.data.selection import read_kept_ids

    table, facts = read_kept_ids(selected_ids)
    kept = set(table.column("pid").to_pylist())
    mask = train["pid"].astype(str).isin(kept).to_numpy()
    if int(mask.sum()) != len(kept):
        raise ValueError(f"{len(kept) - int(mask.sum())} of the {len(kept)} kept posts in {selected_ids!r} are not "
                         "in the features' train split: were the features extracted from another dataset?")
    logger.info("fitting on the %d of %d train posts sample selection kept (keep %s)", len(kept), len(train),
                facts.get("keep"))
    return train[mask].reset_index(drop=True)


def group_folds(uids: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """GroupKFold by user: ``(train_idx, val_idx)`` pairs in which no uid is on both sides."""
    from sklearn.model_selection import GroupKFold

    distinct = len(pd.unique(uids))
    if distinct < folds:
        raise ValueError(f"grouped validation needs at least {folds} users, found {distinct}")
    splitter = GroupKFold(n_splits=folds)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(uids)), groups=uids)]

