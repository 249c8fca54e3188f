"""Leak-free user history: what a user's *earlier training* posts say about a post.

For each post, the history is the same user's training posts with a strictly earlier postdate:

- ``hist_count``: how many there are;
- ``hist_days_since_prev``: days since the latest of them;
- ``hist_rate_per_day``: their number per day between the first of them and this post;
- ``hist_label_mean`` / ``hist_label_max``: mean and max popularity label among them.

Why training posts only, for every split: val/test posts must be scored with what was known
when the model was trained ("training-time history"), so their history never includes other
val/test posts or labels. Why *strictly* earlier: a post's own label and every later post
(including posts at the same second) never enter its features, so changing them leaves the
post's features bit-identical. Prefix statistics are computed per user with segmented
cumulative sums, so a user's features do not depend on other users' rows either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from smpp_ray.features.manifest import FeatureColumn
from smpp_ray.features.tabular import SECONDS_PER_DAY

HISTORY_COLUMNS = ("hist_count", "hist_days_since_prev", "hist_rate_per_day", "hist_label_mean", "hist_label_max")


@dataclass(frozen=True)
class HistoryPool:
    """The training posts a history is made of, sorted by (user, time): what predict needs of train.

    Saved with the feature state (:mod:`smpp_ray.features.state`), so a new post's history is the
    one evaluation would have given it, without re-reading the training posts.
    """

    uid: np.ndarray
    """(P,) str, sorted; a user's rows are contiguous and in time order."""
    t: np.ndarray
    """(P,) int64 postdates."""
    label: np.ndarray
    """(P,) float64 labels, NaN for unlabelled training posts."""

    @classmethod
    def from_posts(cls, meta: pd.DataFrame) -> HistoryPool:
        """The pool of ``meta``'s training rows (columns uid, postdate, label, split)."""
        train = (meta["split"] == "train").to_numpy()
        pool = pd.DataFrame({"uid": meta["uid"].astype(str).to_numpy()[train],
                             "t": meta["postdate"].astype("int64").to_numpy()[train],
                             "label": meta["label"].astype("float64").to_numpy()[train]})
        pool = pool.sort_values(["uid", "t"], kind="mergesort").reset_index(drop=True)
        return cls(pool["uid"].to_numpy(dtype=object), pool["t"].to_numpy(dtype=np.int64),
                   pool["label"].to_numpy(dtype=np.float64))

    def to_table(self) -> pa.Table:
        return pa.table({"uid": pa.array(self.uid.tolist(), pa.string()), "t": pa.array(self.t, pa.int64()),
                         "label": pa.array(self.label, pa.float64(), from_pandas=True)})

    @classmethod
    def from_table(cls, table: pa.Table) -> HistoryPool:
        frame = table.to_pandas()
        return cls(frame["uid"].to_numpy(dtype=object), frame["t"].to_numpy(dtype=np.int64),
                   frame["label"].to_numpy(dtype=np.float64))

    def features(self, uid: np.ndarray, postdate: np.ndarray) -> pd.DataFrame:
        """History features of posts by ``uid`` at ``postdate`` (any posts: train, val, test or new)."""
        uid = np.asarray(uid).astype(str)
        postdate = np.asarray(postdate).astype(np.int64)
        n = len(uid)
        pool = pd.DataFrame({"uid": self.uid, "t": self.t, "label": self.label})
        labelled = pool["label"].notna()
        by_user = pool.assign(value=pool["label"].fillna(0.0), labelled=labelled.astype(np.int64),
                              peak=pool["label"].fillna(-np.inf)).groupby("uid", sort=False)
        label_sum = by_user["value"].cumsum().to_numpy()
        label_n = by_user["labelled"].cumsum().to_numpy()
        label_max = by_user["peak"].cummax().to_numpy()
        pool_t = self.t

        # Locate each post among its user's pool rows: [start, end) = the user's rows, and
        # `earlier` = index of the first pool row of that user at or after the post's time.
        users = pd.Index(pool["uid"].unique())
        first_row = pool.groupby("uid", sort=False).cumcount().to_numpy() == 0
        starts = np.flatnonzero(first_row)
        code = users.get_indexer(uid)  # -1: the user has no training posts
        # One sorted key per (user, time) lets a single searchsorted find every post's position.
        origin = int(min(postdate.min(initial=0), pool_t.min(initial=0)))
        pool_key = users.get_indexer(pool["uid"]).astype(np.int64) * (1 << 34) + (pool_t - origin)
        known = code >= 0
        query_key = code[known].astype(np.int64) * (1 << 34) + (postdate[known] - origin)
        earlier = np.searchsorted(pool_key, query_key, side="left")  # first pool row at or after the post
        count = np.zeros(n, dtype=np.int64)
        count[known] = earlier - starts[code[known]]
        last = np.full(n, -1, dtype=np.int64)  # pool index of the latest earlier post
        first = np.full(n, -1, dtype=np.int64)  # pool index of the user's first training post
        last[known] = earlier - 1
        first[known] = starts[code[known]]

        has = count > 0
        days_prev = np.full(n, np.nan)
        rate = np.full(n, np.nan)
        mean = np.full(n, np.nan)
        peak = np.full(n, np.nan)
        days_prev[has] = (postdate[has] - pool_t[last[has]]) / SECONDS_PER_DAY
        span_days = (postdate[has] - pool_t[first[has]]) / SECONDS_PER_DAY
        # At least one day of span: two posts a minute apart are not a rate of 1440 a day.
        rate[has] = count[has] / np.maximum(span_days, 1.0)
        with_labels = has.copy()
        with_labels[has] = label_n[last[has]] > 0
        mean[with_labels] = label_sum[last[with_labels]] / label_n[last[with_labels]]
        peak[with_labels] = label_max[last[with_labels]]
        return pd.DataFrame({"hist_count": count, "hist_days_since_prev": days_prev,
                             "hist_rate_per_day": rate, "hist_label_mean": mean, "hist_label_max": peak})


def history_columns() -> list[FeatureColumn]:
    return [FeatureColumn(name, "history") for name in HISTORY_COLUMNS]


def history_features(meta: pd.DataFrame) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """History features for every row of ``meta`` (columns uid, postdate, label, split), in row order."""
    pool = HistoryPool.from_posts(meta)
    return pool.features(meta["uid"].to_numpy(), meta["postdate"].to_numpy()), history_columns()
