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

import numpy as np
import pandas as pd

from smpp_ray.features.manifest import FeatureColumn
from smpp_ray.features.tabular import SECONDS_PER_DAY

HISTORY_COLUMNS = ("hist_count", "hist_days_since_prev", "hist_rate_per_day", "hist_label_mean", "hist_label_max")


def history_features(meta: pd.DataFrame) -> tuple[pd.DataFrame, list[FeatureColumn]]:
    """History features for every row of ``meta`` (columns uid, postdate, label, split), in row order."""
    n = len(meta)
    uid = meta["uid"].astype(str).to_numpy()
    postdate = meta["postdate"].astype("int64").to_numpy()
    is_train = (meta["split"] == "train").to_numpy()

    # The history pool: training posts sorted by (user, time); prefix statistics per user.
    pool = pd.DataFrame({"uid": uid[is_train], "t": postdate[is_train],
                         "label": meta["label"].astype("float64").to_numpy()[is_train]})
    pool = pool.sort_values(["uid", "t"], kind="mergesort").reset_index(drop=True)
    labelled = pool["label"].notna()
    by_user = pool.assign(value=pool["label"].fillna(0.0), labelled=labelled.astype(np.int64),
                          peak=pool["label"].fillna(-np.inf)).groupby("uid", sort=False)
    label_sum = by_user["value"].cumsum().to_numpy()
    label_n = by_user["labelled"].cumsum().to_numpy()
    label_max = by_user["peak"].cummax().to_numpy()
    pool_t = pool["t"].to_numpy()

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
    out = pd.DataFrame({"hist_count": count, "hist_days_since_prev": days_prev,
                        "hist_rate_per_day": rate, "hist_label_mean": mean, "hist_label_max": peak})
    return out, [FeatureColumn(name, "history") for name in HISTORY_COLUMNS]
