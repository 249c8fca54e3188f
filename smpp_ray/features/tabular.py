"""Metadata features of each post: user, time, text, geo, category and extra groups.

Only metadata columns are read (never images), so the whole metadata table fits on the driver
even for SMPD (305k posts). Everything fitted from data (the user-description PCA, the training
tag vocabulary) is fitted on the *train* split only, and no feature here reads a label: the
label-dependent features are the leak-free history in :mod:`smpp_ray.features.history`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from smpp_ray import console, storage
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.schema import POSTS_SCHEMA, SPLITS
from smpp_ray.features.manifest import KEY_COLUMNS, FeatureColumn
from smpp_ray.features.pca import PCAAccumulator, PCAProjection

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0

#: Columns of prepared posts the tabular and history features read (everything but the image).
METADATA_COLUMNS = (
    "pid", "uid", "title", "tags", "category", "subcategory", "concept", "category_id",
    "subcategory_id", "concept_id", "postdate", "latitude", "longitude", "geoaccuracy",
    "photo_firstdate", "photo_count", "ispro", "canbuypro", "timezone_offset", "user_description",
    "user_description_text", "location_description", "label", "extra",
)
_HTML_TAG = re.compile(r"<[^>]*>")
_URL = re.compile(r"https?://|www\.", re.IGNORECASE)


@dataclass
class TabularState:
    """Everything the tabular features fit on the training posts: what a new post needs of train."""

    corpus_start: int
    """Unix seconds that ``time_days_since_start`` counts from."""
    tag_frequency: dict[str, int]
    """How many training posts carry each (lower-cased) tag."""
    user_description_components: int
    user_description_dim: int
    """Length of the user-description vectors the PCA was fitted on (0: none in train)."""
    user_description_pca: PCAProjection | None = None
    extra_columns: tuple[str, ...] = ()
    """The dataset's ``extra`` values, by name (its manifest's ``extra_columns``): features
    ``extra_<name>``; a new post's dataset carries the same names in the same order."""

    def fitted(self) -> dict:
        """The scalar facts, for summaries."""
        return {"corpus_start": self.corpus_start, "train_tag_vocabulary": len(self.tag_frequency),
                "user_description_components": self.user_description_components,
                "user_description_dim": self.user_description_dim, "extra_columns": list(self.extra_columns)}


@dataclass
class TabularFeatures:
    """Feature frame (key columns + features, one row per post, same order as the input)."""

    frame: pd.DataFrame
    columns: list[FeatureColumn]
    state: TabularState

    @property
    def fitted(self) -> dict:
        return self.state.fitted()

    @property
    def user_description_pca(self) -> PCAProjection | None:
        return self.state.user_description_pca


def load_post_metadata(data_dir: str) -> pd.DataFrame:
    """Metadata columns of every prepared post with a ``split`` column, split by split in file order."""
    frames = []
    schema = pa.schema([POSTS_SCHEMA.field(name) for name in METADATA_COLUMNS])
    for split in SPLITS:
        files = storage.list_parquet_files(Dataset(data_dir).posts(split))
        tables = [pq.read_table(path, columns=list(METADATA_COLUMNS), filesystem=fs)
                  for fs, path in map(storage.resolve, files)]
        table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
        frame = table.to_pandas()
        frame["split"] = split
        frames.append(frame)
        console.details(__name__).info("read metadata of %d %s posts from %d files", len(frame), split, len(files))
    meta = pd.concat(frames, ignore_index=True)
    duplicated = meta["pid"][meta["pid"].duplicated()]
    if len(duplicated):
        raise ValueError(f"dataset {data_dir!r}: pid {duplicated.iloc[0]!r} appears in more than one row")
    return meta


def build_tabular_features(meta: pd.DataFrame, *, user_description_components: int,
                           corpus_start: int | None = None, extra_columns: tuple[str, ...] = ()) -> TabularFeatures:
    """User, time, text, geo and category features for every row of ``meta`` (needs ``split``).

    ``corpus_start`` (unix seconds) anchors ``time_days_since_start``; by default the earliest
    postdate in ``meta``. The same as :func:`fit_tabular_state` then :func:`tabular_features`.
    """
    state = fit_tabular_state(meta, user_description_components=user_description_components,
                              corpus_start=corpus_start, extra_columns=extra_columns)
    frame, columns = tabular_features(meta, state, is_train=(meta["split"] == "train").to_numpy())
    return TabularFeatures(frame, columns, state)


def fit_tabular_state(meta: pd.DataFrame, *, user_description_components: int,
                      corpus_start: int | None = None, extra_columns: tuple[str, ...] = ()) -> TabularState:
    """Fit on the training rows of ``meta`` (the whole corpus, with ``split``) what the features need."""
    is_train = (meta["split"] == "train").to_numpy()
    start = int(meta["postdate"].min()) if corpus_start is None and len(meta) else int(corpus_start or 0)
    frequency: Counter[str] = Counter()
    for tags, train in zip(_tag_sets(meta["tags"]), is_train, strict=True):
        if train:
            frequency.update(tags)
    pca, dim = None, 0
    if user_description_components > 0:
        dim = _description_dim(meta["user_description"], is_train)
        # Fit once per user, not once per post: prolific users would otherwise dominate the axes.
        first_rows = ~meta["uid"].duplicated().to_numpy()
        accumulator = PCAAccumulator(dim)
        if dim:
            accumulator.add(_description_matrix(meta["user_description"], dim)[is_train & first_rows])
        pca = accumulator.fit(user_description_components)
    return TabularState(start, dict(frequency), user_description_components, dim, pca, tuple(extra_columns))


def tabular_features(meta: pd.DataFrame, state: TabularState,
                     is_train: np.ndarray) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """Key columns + features of the rows of ``meta`` with a fitted state; ``is_train`` marks the
    rows that are themselves training posts (their own tags are not counted as seen)."""
    user, user_cols = user_features(meta, state)
    time, time_cols = time_features(meta, state.corpus_start)
    text, text_cols = text_features(meta, state.tag_frequency, np.asarray(is_train, dtype=bool))
    geo, geo_cols = geo_features(meta)
    cats, cat_cols = category_features(meta)
    extra, extra_cols = extra_features(meta, state.extra_columns)
    keys = meta[list(KEY_COLUMNS)].reset_index(drop=True)
    frame = pd.concat([keys, user, time, text, geo, cats, extra], axis=1)
    return frame, user_cols + time_cols + text_cols + geo_cols + cat_cols + extra_cols


def extra_features(meta: pd.DataFrame, names: tuple[str, ...]) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """The ``extra`` list's values as they are, one float column ``extra_<name>`` per name (NaN:
    missing); nothing when the corpus has no extra columns."""
    values = np.full((len(meta), len(names)), np.nan)
    if names and "extra" in meta:
        for row, items in enumerate(meta["extra"].tolist()):
            if items is not None and len(items) == len(names):
                values[row] = np.asarray(items, dtype=np.float64)   # None -> nan
    # LightGBM refuses feature names with JSON's special characters: a column "views/day" is "extra_views_day".
    out = pd.DataFrame(values, columns=[f"extra_{re.sub(r'[^0-9A-Za-z_]', '_', name)}" for name in names])
    return out, [FeatureColumn(name, "extra") for name in out.columns]


def user_features(meta: pd.DataFrame, state: TabularState) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """Account features at posting time plus the user description reduced by the train-only PCA."""
    photo_count = meta["photo_count"].astype("float64")
    first = meta["photo_firstdate"].astype("float64")
    out = pd.DataFrame({
        "user_log_photo_count": np.log1p(photo_count.clip(lower=0)).to_numpy(),
        "user_ispro": meta["ispro"].astype("float64").to_numpy(),
        "user_canbuypro": meta["canbuypro"].astype("float64").to_numpy(),
        "user_timezone_offset": meta["timezone_offset"].astype("float64").to_numpy(),
        # Age of the account when the post was made, not at crawl time: later posts are older accounts.
        "user_account_age_days": ((meta["postdate"].astype("float64") - first) / SECONDS_PER_DAY).to_numpy(),
    })
    out = pd.concat([out, description_text_features(meta)], axis=1)
    components, dim = state.user_description_components, state.user_description_dim
    if components > 0:
        if dim and state.user_description_pca is not None:
            reduced = state.user_description_pca.transform(_description_matrix(meta["user_description"], dim))
        else:
            reduced = np.full((len(meta), components), np.nan, np.float32)
        for i in range(components):
            out[f"user_desc_pc_{i}"] = reduced[:, i].astype(np.float64)
    columns = [FeatureColumn(name, "user") for name in out.columns]
    return out, columns


def description_text_features(meta: pd.DataFrame) -> pd.DataFrame:
    """What the 2024+ user file's text descriptions say without a language model: the visible
    length (HTML tags removed), whether they link somewhere, whether a location is given. NaN
    where the description is absent (the 2019-2023 files hold vectors instead)."""
    empty = pd.Series([None] * len(meta), index=meta.index, dtype=object)
    texts = meta["user_description_text"] if "user_description_text" in meta else empty
    locations = meta["location_description"] if "location_description" in meta else empty
    present = texts.map(lambda t: isinstance(t, str) and bool(t.strip())).to_numpy()
    visible = texts.map(lambda t: _HTML_TAG.sub(" ", t).strip() if isinstance(t, str) else "")
    has_url = texts.map(lambda t: bool(_URL.search(t)) if isinstance(t, str) else False).to_numpy()
    return pd.DataFrame({
        "user_desc_text_chars": np.where(present, visible.str.len().to_numpy(dtype=np.float64), np.nan),
        "user_desc_text_words": np.where(present, visible.map(lambda t: len(t.split())).to_numpy(dtype=np.float64),
                                         np.nan),
        "user_desc_has_url": np.where(present, has_url.astype(np.float64), np.nan),
        "user_location_known": locations.map(lambda t: isinstance(t, str) and bool(t.strip())).to_numpy(
            dtype=np.float64),
    })


def _description_lengths(series: pd.Series) -> np.ndarray:
    return series.map(lambda v: len(v) if isinstance(v, (list, tuple, np.ndarray)) else -1).to_numpy()


def _description_dim(series: pd.Series, is_train: np.ndarray) -> int:
    """The most common length of the training posts' user descriptions (0: none)."""
    lengths = _description_lengths(series)
    train_lengths = lengths[is_train & (lengths > 0)]
    if len(train_lengths) == 0:
        return 0
    return int(Counter(train_lengths.tolist()).most_common(1)[0][0])


def _description_matrix(series: pd.Series, dim: int) -> np.ndarray:
    """(N, dim) float64 of user descriptions; rows of another length are NaN."""
    lengths = _description_lengths(series)
    matrix = np.full((len(series), dim), np.nan, dtype=np.float64)
    ok = np.flatnonzero(lengths == dim)
    if len(ok):
        matrix[ok] = np.stack([np.asarray(series.iloc[i], dtype=np.float64) for i in ok])
    if (lengths > 0).sum() > len(ok):
        logger.warning("%d user descriptions do not have the common length %d and are left missing",
                       int((lengths > 0).sum() - len(ok)), dim)
    return matrix


def time_features(meta: pd.DataFrame, corpus_start: int) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """Hour, weekday and month in the user's timezone where known (else UTC), and corpus age."""
    postdate = meta["postdate"].astype("int64").to_numpy()
    offset = meta["timezone_offset"].astype("float64").to_numpy()
    known = ~np.isnan(offset)
    shift = np.where(known, np.round(np.nan_to_num(offset) * 3600.0), 0.0).astype("int64")
    local = pd.to_datetime(postdate + shift, unit="s")
    out = pd.DataFrame({
        "time_hour": local.hour.to_numpy(dtype=np.int64),
        "time_weekday": local.day_of_week.to_numpy(dtype=np.int64),
        "time_month": local.month.to_numpy(dtype=np.int64),
        "time_days_since_start": (postdate - corpus_start) / SECONDS_PER_DAY,
        "time_local_known": known.astype(np.int64),
    })
    return out, [FeatureColumn(name, "time") for name in out.columns]


def _tag_sets(tags: pd.Series) -> list[frozenset[str]]:
    return [frozenset(t.lower().split()) if isinstance(t, str) else frozenset() for t in tags]


def text_features(meta: pd.DataFrame, tag_frequency: dict[str, int],
                  is_train: np.ndarray) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """Title and tag statistics, and the share of a post's tags seen in (other) training posts."""
    titles = meta["title"].fillna("").astype(str)
    tag_sets = _tag_sets(meta["tags"])
    tag_counts = meta["tags"].fillna("").astype(str).map(lambda t: len(t.split())).to_numpy()
    seen_share = np.full(len(meta), np.nan)
    for i, (tags, train) in enumerate(zip(tag_sets, is_train, strict=True)):
        if tags:
            # A training post's own tags would make its share 1 by construction; count only the
            # *other* training posts so train and val/test rows mean the same thing.
            own = 1 if train else 0
            seen_share[i] = sum(tag_frequency.get(t, 0) - own > 0 for t in tags) / len(tags)
    out = pd.DataFrame({
        "text_title_length": titles.str.len().to_numpy(dtype=np.int64),
        "text_title_words": titles.map(lambda t: len(t.split())).to_numpy(dtype=np.int64),
        "text_tag_count": tag_counts.astype(np.int64),
        "text_has_title": (titles.str.strip() != "").to_numpy().astype(np.int64),
        "text_tag_seen_share": seen_share,
    })
    return out, [FeatureColumn(name, "text") for name in out.columns]


def geo_features(meta: pd.DataFrame) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """Whether the post is geotagged, and where (NaN when not)."""
    lat = meta["latitude"].astype("float64").to_numpy()
    lon = meta["longitude"].astype("float64").to_numpy()
    out = pd.DataFrame({
        "geo_has_geo": (~np.isnan(lat) & ~np.isnan(lon)).astype(np.int64),
        "geo_latitude": lat,
        "geo_longitude": lon,
        "geo_accuracy": meta["geoaccuracy"].astype("float64").to_numpy(),
    })
    return out, [FeatureColumn(name, "geo") for name in out.columns]


def category_features(meta: pd.DataFrame) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """Category, subcategory and concept ids as categorical integer codes (-1 unknown)."""
    out = pd.DataFrame({
        f"{name}_code": meta[f"{name}_id"].astype("float64").fillna(-1).to_numpy().astype(np.int64)
        for name in ("category", "subcategory", "concept")
    })
    return out, [FeatureColumn(name, "category", categorical=True) for name in out.columns]
