"""Retrieval features (smpp_ray.features.neighbours): the blocked search is exact, and no post
learns its own label, a later post's label, or a val/test post's label."""

from __future__ import annotations

import numpy as np
import pytest

from smpp_ray.features.neighbours import (
    EMBEDDING_OUTPUTS,
    NeighbourBank,
    NeighbourSettings,
    earlier_neighbours,
    normalised,
    same_user_copies,
)


def brute_force(bank, bank_t, queries, query_t, k, excluded):
    sims = queries @ bank.T
    allowed = bank_t[None, :] < query_t[:, None]
    allowed[excluded] = False
    sims = np.where(allowed, sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    found = np.take_along_axis(sims, order, axis=1)
    return np.where(np.isfinite(found), order, -1), np.where(np.isfinite(found), found, np.nan)


def corpus(rng, n, d=8, users=6):
    vectors = normalised(rng.normal(size=(n, d)))
    t = np.sort(rng.integers(0, 50, size=n)).astype(np.int64)   # ties at the same second on purpose
    return vectors, t, rng.integers(0, users, size=n).astype(np.int64)


@pytest.mark.parametrize("block_rows", [1, 7, 1024])
def test_blocked_search_equals_brute_force(block_rows, monkeypatch):
    import smpp_ray.features.neighbours as nb

    monkeypatch.setattr(nb, "BANK_CHUNK_ROWS", 13)   # several bank chunks per block
    rng = np.random.default_rng(0)
    bank, bank_t, _ = corpus(rng, 90)
    queries, query_t, _ = corpus(rng, 40)
    excluded = (np.array([0, 0, 5, 39]), np.array([3, 40, 7, 89]))
    got_idx, got_sim = earlier_neighbours(bank, bank_t, queries, query_t, 5, excluded=excluded, block_rows=block_rows)
    want_idx, want_sim = brute_force(bank, bank_t, queries, query_t, 5, excluded)
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_sim, want_sim, rtol=1e-5, atol=1e-6)
    assert (got_idx[query_t <= bank_t.min()] == -1).all()   # nothing earlier: no neighbour
    assert (got_idx >= 0).sum() > 100                        # most queries do find five


def test_a_same_user_reupload_is_never_a_neighbour_but_a_same_caption_is():
    rng = np.random.default_rng(3)
    image, bank_t, bank_users = corpus(rng, 30)
    queries = normalised(rng.normal(size=(3, 8)))
    queries[0] = image[4]                        # post 0 re-uploads bank post 4's photo ...
    queries[1] = image[5]                        # ... post 1 posts bank post 5's photo as another user
    query_users = np.array([bank_users[4], bank_users[5] + 100, bank_users[6]])
    query_t = np.full(3, 100)
    q, b = same_user_copies(queries, query_t, query_users, image, bank_t, bank_users, 0.999)
    assert list(zip(q.tolist(), b.tolist(), strict=True)) == [(0, 4)]
    index, _ = earlier_neighbours(image, bank_t, queries, query_t, 3, excluded=(q, b))
    assert 4 not in index[0] and index[1, 0] == 5
    earlier_only = same_user_copies(queries, np.full(3, bank_t[4]), query_users, image, bank_t, bank_users, 0.999)
    assert len(earlier_only[0]) == 0             # a copy that is not earlier is excluded by time already


def bank_and_posts(seed=1, n=160):
    rng = np.random.default_rng(seed)
    outputs = {name: rng.normal(size=(n, 6)).astype(np.float32) for name in EMBEDDING_OUTPUTS.values()}
    t = rng.integers(0, 400, size=n).astype(np.int64)
    uid = np.array([f"u{u}" for u in rng.integers(0, 12, size=n)])
    label = rng.normal(size=n)
    sub = rng.integers(0, 4, size=n)
    split = np.where(rng.random(n) < 0.6, "train", np.where(rng.random(n) < 0.5, "val", "test"))
    return outputs, t, uid, label, sub, split


def build(settings, outputs, t, uid, label, sub, split):
    train = split == "train"
    return NeighbourBank.from_training_posts(settings, np.array([f"p{i}" for i in range(len(t))])[train], t[train],
                                             uid[train], label[train], sub[train],
                                             {k: v[train] for k, v in outputs.items()})


SETTINGS = NeighbourSettings(ks=(3, 10), user_snapshots=4, min_pool=1)


def test_bank_is_training_posts_only_and_time_ordered():
    outputs, t, uid, label, sub, split = bank_and_posts()
    bank = build(SETTINGS, outputs, t, uid, label, sub, split)
    train_pids = {f"p{i}" for i in np.flatnonzero(split == "train")}
    assert set(bank.pid.tolist()) == train_pids
    assert (np.diff(bank.t) >= 0).all()


def test_later_labels_and_own_label_never_change_a_posts_features():
    outputs, t, uid, label, sub, split = bank_and_posts()
    before = build(SETTINGS, outputs, t, uid, label, sub, split).features(outputs, t, uid, sub)
    for post in np.flatnonzero(split == "train")[:12].tolist() + np.flatnonzero(split == "test")[:4].tolist():
        changed = label.copy()
        later = t >= t[post]                     # the post itself, same-second posts and every later one
        changed[later] = changed[later] * -7.0 + 100.0
        after = build(SETTINGS, outputs, t, uid, changed, sub, split).features(outputs, t, uid, sub)
        np.testing.assert_array_equal(after.iloc[post].to_numpy(), before.iloc[post].to_numpy())
        if (~later & (split == "train")).any() and t[post] > np.quantile(t[split == "train"], 0.3):
            moved = ~np.isclose(after.to_numpy(), before.to_numpy(), equal_nan=True).all(axis=1)
            assert moved.any()                   # the perturbation is visible to later posts: the check can fail


def test_val_and_test_labels_never_enter_features():
    outputs, t, uid, label, sub, split = bank_and_posts()
    before = build(SETTINGS, outputs, t, uid, label, sub, split).features(outputs, t, uid, sub)
    changed = np.where(split == "train", label, label + 50.0)
    after = build(SETTINGS, outputs, t, uid, changed, sub, split).features(outputs, t, uid, sub)
    np.testing.assert_array_equal(after.to_numpy(), before.to_numpy())


def test_feature_values_follow_their_definition():
    outputs, t, uid, label, sub, split = bank_and_posts()
    bank = build(SETTINGS, outputs, t, uid, label, sub, split)
    frame = bank.features(outputs, t, uid, sub)
    assert list(frame.columns) == [c.name for c in SETTINGS.columns()]
    post = int(np.flatnonzero((split == "test") & (t > 300))[0])
    query = normalised(outputs["fused"][post:post + 1])
    earlier = np.flatnonzero(bank.t < t[post])
    sims = bank.vectors["fused"][earlier] @ query[0]
    top = earlier[np.argsort(-sims)[:3]]
    assert frame.loc[post, "nb_fused_k3_mean"] == pytest.approx(bank.label[top].mean())
    assert frame.loc[post, "nb_fused_k3_median"] == pytest.approx(np.median(bank.label[top]))
    assert frame.loc[post, "nb_fused_k3_same_user"] == pytest.approx((bank.uid[top] == uid[post]).mean())
    same_sub = earlier[bank.subcategory[earlier] == sub[post]]
    assert frame.loc[post, "nb_fused_k3_residual"] == pytest.approx(bank.label[top].mean() - bank.label[same_sub].mean())
    first = int(np.argmin(t))
    assert np.isnan(frame.loc[first, "nb_image_k3_mean"])   # the earliest post has no earlier neighbour


def test_user_neighbours_use_only_earlier_posts_of_other_users():
    outputs, t, uid, label, sub, split = bank_and_posts()
    bank = build(SETTINGS, outputs, t, uid, label, sub, split)
    cutoffs = bank.snapshot_cutoffs()
    assert len(cutoffs) == 4 and cutoffs[-1] == bank.t[-1] + 1
    frame = bank.features(outputs, t, uid, sub)
    post = int(np.flatnonzero(t >= cutoffs[1])[0])
    snapshot = int(np.searchsorted(cutoffs, t[post], side="right") - 1)
    users, vectors, means = bank.user_snapshot("image", cutoffs[snapshot])
    assert set(users) == set(bank.uid[bank.t < cutoffs[snapshot]])
    others = users != uid[post]
    sims = vectors[others] @ normalised(outputs["image_embedding"][post:post + 1])[0]
    top = np.argsort(-sims)[:3]
    assert frame.loc[post, "unb_image_k3_mean"] == pytest.approx(means[others][top].mean())
    assert np.isnan(frame.loc[t < cutoffs[0], "unb_image_k3_mean"]).all()


def test_bank_round_trips_through_its_file(tmp_path):
    outputs, t, uid, label, sub, split = bank_and_posts()
    bank = build(SETTINGS, outputs, t, uid, label, sub, split)
    (tmp_path / "bank.npz").write_bytes(bank.to_bytes())
    loaded = NeighbourBank.from_npz(SETTINGS, str(tmp_path / "bank.npz"))
    from_arrays = NeighbourBank.from_arrays(bank.arrays())
    want = bank.features(outputs, t, uid, sub)
    for other in (loaded, from_arrays):
        np.testing.assert_array_equal(other.features(outputs, t, uid, sub).to_numpy(), want.to_numpy())


def test_bad_settings_name_the_key():
    from smpp_ray.config import load_config

    with pytest.raises(ValueError, match="extract.neighbour_embeddings.*'pixels'"):
        load_config(None, ["extract.neighbour_embeddings=[image,pixels]"])
    with pytest.raises(ValueError, match="extract.neighbour_ks"):
        load_config(None, ["extract.neighbour_ks=[5,0]"])
    with pytest.raises(ValueError, match="extract.neighbour_embeddings.*'pixels'"):
        NeighbourSettings(embeddings=("pixels",))   # a saved bank's facts are checked too
    assert not NeighbourSettings.from_config(load_config(None).extract).enabled   # off by default
    settings = NeighbourSettings.from_config(load_config(None, ["extract.neighbour_ks=[2,4]",
                                                                "extract.neighbour_embeddings=[fused]"]).extract)
    assert settings.ks == (2, 4) and settings.embeddings == ("fused",) and settings.enabled


def test_the_approximate_path_keeps_the_leak_rule_exactly_and_finds_most_neighbours():
    from smpp_ray.features.neighbours import ApproximateIndex

    rng = np.random.default_rng(5)
    topics = rng.normal(size=(20, 16))
    bank = normalised(topics[rng.integers(0, 20, 3000)] + rng.normal(scale=0.7, size=(3000, 16)))
    bank_t = np.sort(rng.integers(0, 10_000, 3000)).astype(np.int64)
    queries = normalised(topics[rng.integers(0, 20, 400)] + rng.normal(scale=0.7, size=(400, 16)))
    query_t = rng.integers(0, 11_000, 400).astype(np.int64)
    nearest = np.argmax(queries @ bank.T, axis=1)
    excluded = (np.arange(400), nearest)          # every query's single best row is off limits
    index = ApproximateIndex.build(bank)
    got, _ = earlier_neighbours(bank, bank_t, queries, query_t, 10, excluded=excluded, block_rows=64,
                                approximate=index, exact_rows=200)
    want, _ = earlier_neighbours(bank, bank_t, queries, query_t, 10, excluded=excluded, block_rows=64)
    found = got >= 0
    assert (bank_t[got[found]] < np.repeat(query_t, 10).reshape(-1, 10)[found]).all()   # strictly earlier, always
    assert not (got == nearest[:, None]).any()                                          # exclusions hold
    recall = np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max((w >= 0).sum(), 1) for g, w in zip(got, want, strict=True)])
    assert recall >= 0.9
    early = query_t <= bank_t[200]                # a block-wide prefix this short is searched exactly
    np.testing.assert_array_equal(got[early & (query_t < bank_t[150])], want[early & (query_t < bank_t[150])])


def test_a_bank_past_the_exact_limit_saves_and_reloads_its_index(tmp_path):
    outputs, t, uid, label, sub, split = bank_and_posts()
    settings = NeighbourSettings(ks=(3, 10), user_snapshots=2, exact_rows=20)
    bank = build(settings, outputs, t, uid, label, sub, split)
    assert set(bank.indexes) == set(settings.embeddings)
    want = bank.features(outputs, t, uid, sub)
    (tmp_path / "bank.npz").write_bytes(bank.to_bytes())
    for other in (NeighbourBank.from_npz(settings, str(tmp_path / "bank.npz")), NeighbourBank.from_arrays(bank.arrays())):
        assert set(other.indexes) == set(settings.embeddings)
        np.testing.assert_array_equal(other.features(outputs, t, uid, sub).to_numpy(), want.to_numpy())


def test_a_k_is_defined_only_with_min_pool_times_k_candidates():
    """With fewer than min_pool x k earlier posts, the "k nearest" would be most of the past: NaN."""
    outputs, t, uid, label, sub, split = bank_and_posts()
    settings = NeighbourSettings(ks=(3, 10), user_snapshots=4, min_pool=4)
    bank = build(settings, outputs, t, uid, label, sub, split)
    frame = bank.features(outputs, t, uid, sub)
    unrestricted = build(SETTINGS, outputs, t, uid, label, sub, split).features(outputs, t, uid, sub)
    pool = np.searchsorted(bank.t, t, side="left")
    for k in (3, 10):
        defined = pool >= 4 * k
        assert defined.any() and (~defined).any()
        for stat in ("mean", "wmean", "same_user", "residual"):
            assert frame.loc[~defined, f"nb_image_k{k}_{stat}"].isna().all()
        np.testing.assert_array_equal(frame.loc[defined, f"nb_image_k{k}_mean"],
                                      unrestricted.loc[defined, f"nb_image_k{k}_mean"])
