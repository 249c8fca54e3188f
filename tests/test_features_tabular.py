"""Tabular and leak-free history features, without Ray: values, leak-freedom, train-only fitting."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smpp_ray.data.dataset import Dataset
from smpp_ray.data.schema import POSTS_SCHEMA
from smpp_ray.features.history import HISTORY_COLUMNS, history_features
from smpp_ray.features.manifest import (
    GROUPS,
    KEY_COLUMNS,
    FeatureColumn,
    build_manifest,
    select_columns,
)
from smpp_ray.features.pca import PCAAccumulator, fit_pca
from smpp_ray.features.tabular import (
    build_tabular_features,
    description_text_features,
    load_post_metadata,
)

DAY = 86400
T0 = 1_500_000_000


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_posts(n: int, *, seed: int = 0, users: int = 6, image_size: int = 0) -> pd.DataFrame:
    """``n`` posts in POSTS_SCHEMA columns with a ``split`` column (time split 70/15/15).

    Images are real JPEGs when ``image_size`` > 0, else empty bytes (the tabular path never reads them).
    """
    rng = np.random.default_rng(seed)
    postdate = np.sort(T0 + rng.integers(0, 200 * DAY, n))
    uid = np.array([f"u{rng.integers(users)}" for _ in range(n)])
    words = ["sun", "sea", "dog", "cat", "city", "night", "art", "food", "tree", "car"]
    sub = rng.integers(0, 77, n)
    has_geo = rng.random(n) < 0.4
    offsets = {f"u{u}": (None if u % 3 == 0 else float(u - 2)) for u in range(users)}
    frame = pd.DataFrame({
        "pid": [f"p{i:05d}" for i in range(n)],
        "uid": uid,
        "row_index": np.arange(n, dtype=np.int64),
        "image": [_jpeg(rng, image_size) if image_size else b"" for _ in range(n)],
        "image_path": [f"train/{u}/p{i:05d}.jpg" for i, u in enumerate(uid)],
        "title": [" ".join(rng.choice(words, rng.integers(0, 4))) for _ in range(n)],
        "tags": [" ".join(rng.choice(words + [f"rare{i}"], rng.integers(0, 5))) for i in range(n)],
        "mediatype": "photo",
        "category": [f"cat{s // 7}" for s in sub],
        "subcategory": [f"sub{s}" for s in sub],
        "concept": [f"concept{s % 5}" for s in sub],
        "category_id": (sub // 7).astype(np.int32),
        "subcategory_id": sub.astype(np.int32),
        "concept_id": (sub % 5).astype(np.int32),
        "postdate": postdate.astype(np.int64),
        "latitude": np.where(has_geo, rng.uniform(-60, 60, n), np.nan),
        "longitude": np.where(has_geo, rng.uniform(-150, 150, n), np.nan),
        "geoaccuracy": np.where(has_geo, rng.integers(1, 16, n).astype(float), np.nan),
        "ispublic": np.ones(n, dtype=np.int8),
        "pathalias": None,
        "photo_firstdate": np.where(np.char.endswith(uid, "1"), -1, T0 - 400 * DAY).astype(np.int64),
        "photo_firstdatetaken": None,
        "photo_count": rng.integers(1, 5000, n).astype(np.int64),
        "ispro": rng.integers(0, 2, n).astype(np.int8),
        "canbuypro": rng.integers(0, 2, n).astype(np.int8),
        "timezone_offset": [offsets[u] for u in uid],
        "timezone_id": None,
        "user_description": [list(rng.normal(size=6).astype(np.float32) + int(u[1:])) for u in uid],
        "user_description_text": [f'<p>Shots by {u}</p> <a href="https://example.org/{u}">site</a>'
                                  if u.endswith("2") else None for u in uid],
        "location_description": [f"Town {u}" if u.endswith(("2", "3")) else None for u in uid],
        "label": rng.normal(5.0, 2.0, n),
        "extra": None,
    })
    frame.loc[frame["photo_firstdate"] < 0, "photo_firstdate"] = None
    frame["split"] = np.where(np.arange(n) < int(0.7 * n), "train",
                              np.where(np.arange(n) < int(0.85 * n), "val", "test"))
    return frame


def write_posts(frame: pd.DataFrame, data_dir: Path, shards: int = 2) -> None:
    """Write a ``make_posts`` frame as ``DATA/posts/split=*/part-*.parquet`` in POSTS_SCHEMA."""
    for split, part in frame.groupby("split"):
        folder = Path(Dataset(str(data_dir)).posts(split))
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(part.drop(columns="split"), schema=POSTS_SCHEMA, preserve_index=False)
        step = -(-table.num_rows // shards)
        for i in range(shards):
            pq.write_table(table.slice(i * step, step), folder / f"part-{i:05d}.parquet")


def write_dataset(frame: pd.DataFrame, data_dir: Path, shards: int = 3) -> Path:
    """A ``make_posts`` frame as a prepared dataset: the shards and a manifest with the default taxonomy."""
    from smpp_ray.data.schema import SCHEMA_VERSION
    from smpp_ray.data.taxonomy_names import default_taxonomy

    write_posts(frame, data_dir, shards=shards)
    Dataset(str(data_dir)).write_manifest({
        "schema_version": SCHEMA_VERSION, "taxonomy": default_taxonomy().to_dict(),
        "time_range": {"start": T0, "end": int(frame["postdate"].max())},
        "counts": {"per_split": {k: int(v) for k, v in frame.groupby("split").size().items()}}})
    return data_dir


def _features(meta: pd.DataFrame) -> pd.DataFrame:
    tabular = build_tabular_features(meta, user_description_components=3)
    history, _ = history_features(meta)
    return pd.concat([tabular.frame, history], axis=1).set_index("pid")


def _assert_rows_identical(a: pd.DataFrame, b: pd.DataFrame, pids) -> None:
    cols = [c for c in a.columns if c not in ("label",)]
    left = a.loc[pids, cols].to_numpy(dtype=object)
    right = b.loc[pids, cols].to_numpy(dtype=object)
    for x, y in zip(left.ravel(), right.ravel(), strict=True):
        if isinstance(x, float) and isinstance(y, float):
            assert np.float64(x).tobytes() == np.float64(y).tobytes()
        else:
            assert x == y


def test_history_values_by_hand() -> None:
    meta = pd.DataFrame({
        "uid": ["a", "a", "b", "a", "a", "a"],
        "postdate": [0, DAY, DAY, 3 * DAY, 3 * DAY, 10 * DAY],
        "label": [2.0, 4.0, 9.0, 6.0, 100.0, 50.0],
        "split": ["train", "train", "train", "train", "val", "test"],
    })
    out, columns = history_features(meta)
    assert [c.name for c in columns] == list(HISTORY_COLUMNS) and {c.group for c in columns} == {"history"}
    # row 4 (val) ties with train row 3: a post at the same second is not earlier
    assert out["hist_count"].tolist() == [0, 1, 0, 2, 2, 3]
    np.testing.assert_array_equal(out["hist_days_since_prev"], [np.nan, 1, np.nan, 2, 2, 7])
    np.testing.assert_array_equal(out["hist_label_mean"], [np.nan, 2, np.nan, 3, 3, 4])
    np.testing.assert_array_equal(out["hist_label_max"], [np.nan, 2, np.nan, 4, 4, 6])
    # rate: count / max(days since the first earlier post, 1)
    np.testing.assert_allclose(out["hist_rate_per_day"], [np.nan, 1.0, np.nan, 2 / 3, 2 / 3, 0.3])


def test_history_ties_are_not_history() -> None:
    meta = pd.DataFrame({"uid": ["a", "a", "a"], "postdate": [5, 5, 6], "label": [1.0, 3.0, 5.0],
                         "split": ["train"] * 3})
    out, _ = history_features(meta)
    assert out["hist_count"].tolist() == [0, 0, 2]
    assert np.isnan(out["hist_label_mean"][1]) and out["hist_label_mean"][2] == 2.0


def test_changing_own_and_later_labels_leaves_features_bit_identical() -> None:
    meta = make_posts(300, seed=1)
    base = _features(meta)
    rng = np.random.default_rng(7)
    for position in (40, 150, 209, 250):  # train, train, last train, val
        pid, t = meta["pid"][position], meta["postdate"][position]
        changed = meta.copy()
        later_or_self = (changed["postdate"] > t) | (changed.index == position)
        changed.loc[later_or_self, "label"] = rng.normal(size=int(later_or_self.sum())) * 100
        _assert_rows_identical(base, _features(changed), [pid])
    # and the history of a post with earlier training posts of the same user does use their labels
    position = next(i for i in range(150, 200) if base["hist_count"].iloc[i] > 0)
    changed = meta.copy()
    user_earlier = (changed["uid"] == meta["uid"][position]) & (changed["postdate"] < meta["postdate"][position])
    changed.loc[user_earlier, "label"] += 1.0
    assert _features(changed)["hist_label_mean"].iloc[position] == pytest.approx(base["hist_label_mean"].iloc[position] + 1)


def test_val_and_test_see_only_training_history() -> None:
    meta = make_posts(300, seed=2)
    base = _features(meta)
    held_out = meta["split"] != "train"
    changed = meta.copy()
    changed.loc[held_out, "label"] = -1000.0  # val/test labels never enter anyone's history
    after = _features(changed)
    for column in HISTORY_COLUMNS:
        np.testing.assert_array_equal(base[column].to_numpy(), after[column].to_numpy())
    # nor do other val/test posts: each held-out post alone beside the train split gets the same history
    train_only = meta[~held_out]
    for position in np.flatnonzero(held_out.to_numpy())[::9]:
        alone, _ = history_features(pd.concat([train_only, meta.iloc[[position]]], ignore_index=True))
        np.testing.assert_array_equal(alone.iloc[-1].to_numpy(), base[list(HISTORY_COLUMNS)].iloc[position].to_numpy())
    last_train = meta[meta["split"] == "train"].groupby("uid")["postdate"].max()
    n_train = meta[meta["split"] == "train"].groupby("uid").size()
    val = meta[meta["split"] == "val"]
    expected = val["uid"].map(n_train).fillna(0).to_numpy()
    np.testing.assert_array_equal(base.loc[val["pid"], "hist_count"].to_numpy(), expected)
    gap = (val["postdate"] - val["uid"].map(last_train)).to_numpy() / DAY
    np.testing.assert_allclose(base.loc[val["pid"], "hist_days_since_prev"].to_numpy(), gap)


def test_tabular_values() -> None:
    meta = make_posts(120, seed=3)
    meta.loc[0, ["title", "tags", "timezone_offset", "postdate"]] = ["big red  sun", "a b c a", 5.5, T0]
    tab = build_tabular_features(meta, user_description_components=2)
    f = tab.frame
    assert list(f.columns[:len(KEY_COLUMNS)]) == list(KEY_COLUMNS) and len(f) == len(meta)
    assert (f["pid"] == meta["pid"]).all()
    row = f.iloc[0]
    local = pd.Timestamp(T0 + int(5.5 * 3600), unit="s")
    assert (row["time_hour"], row["time_weekday"], row["time_month"]) == (local.hour, local.weekday(), local.month)
    assert row["time_local_known"] == 1 and row["time_days_since_start"] == 0.0
    assert (row["text_title_length"], row["text_title_words"], row["text_tag_count"], row["text_has_title"]) == (12, 3, 4, 1)
    utc_rows = meta["timezone_offset"].isna()
    utc = pd.to_datetime(meta.loc[utc_rows, "postdate"], unit="s")
    assert (f.loc[utc_rows, "time_hour"].to_numpy() == utc.dt.hour.to_numpy()).all()
    assert (f.loc[utc_rows, "time_local_known"] == 0).all()
    np.testing.assert_allclose(f["user_log_photo_count"], np.log1p(meta["photo_count"]))
    age = (meta["postdate"] - meta["photo_firstdate"].astype(float)) / DAY
    np.testing.assert_allclose(f["user_account_age_days"], age)  # NaN where unknown
    assert f["user_account_age_days"].isna().sum() == meta["photo_firstdate"].isna().sum() > 0
    assert (f["geo_has_geo"] == meta["latitude"].notna()).all()
    assert f.loc[f["geo_has_geo"] == 0, ["geo_latitude", "geo_longitude", "geo_accuracy"]].isna().all().all()
    assert (f["subcategory_code"] == meta["subcategory_id"]).all()
    cats = [c for c in tab.columns if c.categorical]
    assert {c.name for c in cats} == {"category_code", "subcategory_code", "concept_code"}
    assert {c.group for c in tab.columns} == {"user", "time", "text", "geo", "category"}
    assert {f"user_desc_pc_{i}" for i in range(2)} <= set(f.columns)


def test_tag_seen_share_uses_training_tags_only() -> None:
    meta = pd.concat([make_posts(10, seed=4)] * 1, ignore_index=True)
    meta["split"] = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    meta["tags"] = ["x y", "x", "z", "q", "", "w", "x z", "v v", "q w", "v"]
    share = build_tabular_features(meta, user_description_components=0).frame["text_tag_seen_share"]
    # train rows count only *other* training posts: x seen elsewhere, y/z/q/w only in themselves
    np.testing.assert_array_equal(share[:6], [0.5, 1.0, 0.0, 0.0, np.nan, 0.0])
    # val tag "v" appears only in val/test posts: never "seen in training"
    np.testing.assert_array_equal(share[6:], [1.0, 0.0, 1.0, 0.0])


def test_user_description_pca_is_fitted_on_train_only() -> None:
    meta = make_posts(200, seed=5)
    base = build_tabular_features(meta, user_description_components=3)
    changed = meta.copy()
    held_out = changed["split"] != "train"
    changed.loc[held_out, "user_description"] = pd.Series(
        [list(np.full(6, 99.0, np.float32))] * int(held_out.sum()), index=changed.index[held_out])
    after = build_tabular_features(changed, user_description_components=3)
    np.testing.assert_array_equal(base.user_description_pca.components, after.user_description_pca.components)
    train = meta["split"] == "train"
    cols = [f"user_desc_pc_{i}" for i in range(3)]
    np.testing.assert_array_equal(base.frame.loc[train, cols], after.frame.loc[train, cols])
    assert not np.allclose(base.frame.loc[~train, cols], after.frame.loc[~train, cols])


def test_pca_matches_numpy_svd_and_streams() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8)) + 3.0
    pca = fit_pca(x, 3)
    centered = x - x.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    for i in range(3):
        assert abs(abs(pca.components[i] @ vt[i]) - 1) < 1e-8
    np.testing.assert_allclose(pca.explained_variance, s[:3] ** 2 / (len(x) - 1), rtol=1e-8)
    streamed = PCAAccumulator(8)
    for chunk in np.array_split(x, 7):
        streamed.add(chunk)
    np.testing.assert_allclose(streamed.fit(3).transform(x), pca.transform(x), atol=1e-4)
    wide = fit_pca(x[:2], 5)  # more components than rank: extra rows are zero, shape kept
    assert wide.components.shape == (5, 8) and np.all(wide.components[1:] == 0)


def test_load_post_metadata_reads_every_split_without_images(tmp_path: Path) -> None:
    posts = make_posts(60, seed=6)
    write_posts(posts, tmp_path)
    meta = load_post_metadata(str(tmp_path))
    assert "image" not in meta.columns
    assert meta.groupby("split").size().to_dict() == posts.groupby("split").size().to_dict()
    assert sorted(meta["pid"]) == sorted(posts["pid"])
    write_posts(pd.concat([posts, posts.iloc[:1].assign(split="test")]), tmp_path / "dup", shards=1)
    with pytest.raises(ValueError, match="pid 'p00000' appears in more than one row"):
        load_post_metadata(str(tmp_path / "dup"))


def test_manifest_groups_and_validation() -> None:
    columns = [FeatureColumn("a", "user"), FeatureColumn("b", "history"), FeatureColumn("c", "category", True)]
    manifest = build_manifest(columns)
    assert manifest["key_columns"] == list(KEY_COLUMNS)
    assert select_columns(manifest, ["user", "category"]) == ["a", "c"]
    assert select_columns(manifest) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="listed twice"):
        build_manifest(columns + [FeatureColumn("a", "geo")])
    with pytest.raises(ValueError, match="unknown group 'vision'"):
        FeatureColumn("x", "vision")
    with pytest.raises(ValueError, match="unknown feature group"):
        select_columns(manifest, ["nope"])
    assert set(GROUPS) == {"network", "user", "time", "text", "geo", "category", "history", "extra", "neighbours",
                           "user_neighbours"}


def test_feature_state_gives_new_posts_the_features_extraction_gave_them(tmp_path: Path) -> None:
    """Val/test posts featurised from the saved state alone (no training post read) equal the
    extracted rows bit for bit, with class ids re-derived from names (new posts index their own
    dataset); a post of a user with no training history gets the empty history."""
    from smpp_ray.config import ExtractConfig
    from smpp_ray.data.taxonomy_names import default_taxonomy
    from smpp_ray.features.extract import extract_features
    from smpp_ray.features.state import FeatureState
    from smpp_ray.gbdt.data import read_split

    taxonomy = default_taxonomy()
    posts = make_posts(240, seed=5)
    posts["category_id"] = [taxonomy.parents[s] for s in posts["subcategory_id"]]
    posts["category"] = [taxonomy.categories[c] for c in posts["category_id"]]
    posts["subcategory"] = [taxonomy.subcategories[s] for s in posts["subcategory_id"]]
    # A table corpus's extra numeric columns (one name LightGBM would refuse as it is), some missing.
    posts["extra"] = [[float(i), None if i % 4 == 0 else i * 0.5] for i in range(len(posts))]
    data = write_dataset(posts, tmp_path / "data")
    manifest = Dataset(str(data)).manifest().facts
    Dataset(str(data)).write_manifest({**manifest, "concepts": sorted(posts["concept"].unique()),
                                        "extra_columns": ["views/day", "followers"]})
    extract_features(str(data), None, str(tmp_path / "features"), extract_config=ExtractConfig(user_description_components=3))
    state = FeatureState.load(str(tmp_path / "features"))
    assert sum(state.tabular.tag_frequency.values()) > 0 and len(state.history.t) == (posts["split"] == "train").sum()
    assert state.tabular.extra_columns == ("views/day", "followers")

    held = posts[posts["split"] != "train"].copy()
    held[["category_id", "subcategory_id", "concept_id"]] = 999  # ids of another dataset's numbering
    computed, columns = state.new_post_features(held.drop(columns=["image"]))
    extracted = pd.concat([read_split(str(tmp_path / "features"), s) for s in ("val", "test")])
    names = ["pid"] + [c.name for c in columns]
    _assert_rows_identical(computed[names].set_index("pid"), extracted[names].set_index("pid"), held["pid"])
    extra = {c.name for c in columns if c.group == "extra"}
    assert extra == {"extra_views_day", "extra_followers"}
    row = int(held["row_index"].iloc[0])
    np.testing.assert_array_equal(computed[["extra_views_day", "extra_followers"]].to_numpy()[0],
                                  [row, np.nan if row % 4 == 0 else row * 0.5])

    stranger = held.iloc[:1].assign(uid="nobody-seen", pid="new-1")
    row = state.new_post_features(stranger.drop(columns=["image"]))[0].iloc[0]
    assert row["hist_count"] == 0 and np.isnan(row["hist_label_mean"])


def test_text_descriptions_become_length_link_and_location_features() -> None:
    meta = pd.DataFrame({"user_description_text": ['<p>Hi <b>all</b></p> see https://x.org/a', "", None, "plain words"],
                         "location_description": ["Paris, France", None, "  ", "Lyon"]})
    out = description_text_features(meta)
    np.testing.assert_array_equal(out["user_desc_text_chars"].to_numpy()[[0, 3]],
                                  [29, 11])   # "Hi  all   see https://x.org/a": tags are not text
    np.testing.assert_array_equal(out["user_desc_text_words"].to_numpy()[[0, 3]], [4, 2])
    np.testing.assert_array_equal(out["user_desc_has_url"].to_numpy()[[0, 3]], [1, 0])
    assert out.loc[[1, 2], ["user_desc_text_chars", "user_desc_has_url"]].isna().all().all()   # absent, not 0
    np.testing.assert_array_equal(out["user_location_known"].to_numpy(), [1, 0, 0, 1])
