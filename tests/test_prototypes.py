"""Diversity sampling, the prototype bank, the CPU preprocessor and the Ray prototypes stage."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from smpp_ray.data.dataset import Dataset
from smpp_ray.data.schema import POSTS_SCHEMA, SCHEMA_VERSION, Taxonomy
from smpp_ray.model.backbone import TINY_MODEL
from smpp_ray.model.preprocess import BatchPreprocessor
from smpp_ray.model.prototypes import (
    MEMBERS_FILE,
    PROTOTYPES_FILE,
    EmbedPosts,
    PrototypeBank,
    compute_prototypes,
    select_class_members,
    select_diverse,
    time_buckets_of,
)
from smpp_ray.prototype_job import build_prototypes

TAXONOMY = Taxonomy(tuple(f"cat{c}" for c in range(11)), tuple(f"sub{s}" for s in range(77)),
                    tuple(s % 11 for s in range(77)))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Diversity sampling


def skewed_class(n: int = 300, seed: int = 0):
    """One prolific user posting in a burst at the start, 25 others spread over a year."""
    rng = np.random.default_rng(seed)
    heavy = int(n * 0.8)
    uids = np.array(["heavy"] * heavy + [f"u{i % 25}" for i in range(n - heavy)], dtype=object)
    postdates = np.concatenate([rng.integers(0, 86_400 * 10, heavy),
                                rng.integers(0, 86_400 * 365, n - heavy)]).astype(np.int64)
    features = rng.standard_normal((n, 16))
    features[:heavy] = features[:heavy] * 0.1 + 3.0  # the heavy user's posts look alike
    return features, uids, postdates


def test_selection_honours_shots_and_uses_all_of_a_small_class():
    features, uids, postdates = skewed_class()
    chosen = select_diverse(features, uids, postdates, shots=20, time_buckets=8, seed=0)
    assert len(chosen) == 20 == len(set(chosen.tolist()))
    small = select_diverse(features[:7], uids[:7], postdates[:7], shots=20, time_buckets=8, seed=0)
    assert sorted(small.tolist()) == list(range(7))


def test_selection_spreads_over_users_and_time_more_than_random():
    features, uids, postdates = skewed_class()
    buckets = time_buckets_of(postdates, 8)
    chosen = select_diverse(features, uids, postdates, shots=20, time_buckets=8, seed=0)
    rng = np.random.default_rng(1)
    random_users, random_buckets = [], []
    for _ in range(50):
        pick = rng.choice(len(uids), 20, replace=False)
        random_users.append(len(set(uids[pick])))
        random_buckets.append(len(set(buckets[pick])))
    assert len(set(uids[chosen])) == 20  # 26 users available: no user repeats
    assert len(set(uids[chosen])) > max(random_users)
    assert len(set(buckets[chosen])) == len(set(buckets))  # every non-empty time bucket covered
    assert len(set(buckets[chosen])) > np.mean(random_buckets)


def test_selection_is_deterministic_and_independent_of_row_order():
    features, uids, postdates = skewed_class()
    rows = {"pid": np.array([f"p{i:04d}" for i in range(len(uids))], dtype=object), "uid": uids,
            "postdate": postdates, "subcategory_id": np.zeros(len(uids), np.int64),
            "category_id": np.zeros(len(uids), np.int64),
            "image_emb": features[:, :8].astype(np.float32), "text_emb": features[:, 8:].astype(np.float32)}
    first = select_class_members(rows, shots=16, time_buckets=4, seed=5)
    perm = np.random.default_rng(2).permutation(len(uids))
    shuffled = select_class_members({k: v[perm] for k, v in rows.items()}, shots=16, time_buckets=4, seed=5)
    assert first["pid"].tolist() == shuffled["pid"].tolist()
    assert (first["available"] == len(uids)).all()
    other_seed = select_class_members(rows, shots=16, time_buckets=4, seed=6)
    assert len(other_seed["pid"]) == 16


# ---------------------------------------------------------------------------------------------
# The bank


def test_bank_similarities_rows_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    visual, textual = torch.randn(88, 64, generator=g), torch.randn(88, 64, generator=g)
    visual[3] = 0  # an empty class
    counts = torch.full((88,), 5)
    counts[3] = 0
    bank = PrototypeBank(visual, textual, counts, 77, {"backbone": TINY_MODEL})
    emb = torch.randn(5, 64, generator=g)
    sims = bank.similarities(emb, "visual")
    assert sims.shape == (5, 88) and bank.similarities(emb, "textual").shape == (5, 88)
    expected = torch.nn.functional.cosine_similarity(emb[:, None], visual[None, 10:11], dim=-1)[:, 0]
    torch.testing.assert_close(sims[:, 10], expected)
    assert torch.equal(sims[:, 3], torch.zeros(5))
    assert torch.equal(bank.prototypes(2, "category")[0], visual[77 + 2])
    with pytest.raises(ValueError, match="category id 11 out of range"):
        bank.row(11, "category")
    path = str(tmp_path / PROTOTYPES_FILE)
    bank.save(path)
    loaded = PrototypeBank.load(path)
    assert torch.equal(loaded.visual, visual) and torch.equal(loaded.counts, counts)
    assert loaded.num_subcategories == 77 and loaded.metadata["backbone"] == TINY_MODEL
    assert set(bank.state_dict()) == {"visual", "textual", "counts"} and not list(bank.parameters())
    with pytest.raises(ValueError, match="not found"):
        PrototypeBank.load(str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------------------------------------
# A tiny prepared dataset (the data helper's layout) and the preprocessor


def jpeg(colour: tuple[int, int, int], size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def posts_table(n: int, seed: int, start_row: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    # classes of very different sizes: 0 has 40 posts, 1 has 25, 2..5 fewer, 76 a handful
    subs = rng.choice([0, 0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 76], size=n)
    rows = {name: [None] * n for name in POSTS_SCHEMA.names}
    rows.update(
        pid=[f"{start_row + i:05d}" for i in range(n)],
        uid=[f"user{rng.integers(0, 12)}" for _ in range(n)],
        row_index=list(range(start_row, start_row + n)),
        image=[jpeg(tuple(int(v) for v in rng.integers(0, 255, 3)), int(rng.choice([32, 48, 64]))) for _ in range(n)],
        title=[f"title {s} {rng.integers(0, 99)}" for s in subs],
        tags=[None if i % 7 == 0 else "tag1 tag2" for i in range(n)],
        subcategory=[TAXONOMY.subcategories[s] for s in subs],
        category=[TAXONOMY.categories[TAXONOMY.parents[s]] for s in subs],
        subcategory_id=[int(s) for s in subs],
        category_id=[int(TAXONOMY.parents[s]) for s in subs],
        postdate=[int(1_400_000_000 + rng.integers(0, 86_400 * 300)) for _ in range(n)],
        label=[float(rng.normal(5, 2)) for _ in range(n)],
    )
    rows["subcategory_id"][1] = None  # an unlabelled post: belongs to no class
    return pa.Table.from_pydict(rows, schema=POSTS_SCHEMA)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    data = tmp_path_factory.mktemp("data")
    train = Dataset(str(data)).posts("train")
    os.makedirs(train)
    pq.write_table(posts_table(60, seed=1), os.path.join(train, "part-00000.parquet"))
    pq.write_table(posts_table(50, seed=2, start_row=60), os.path.join(train, "part-00001.parquet"))
    val = Dataset(str(data)).posts("val")
    os.makedirs(val)
    pq.write_table(posts_table(10, seed=3, start_row=1000), os.path.join(val, "part-00000.parquet"))
    manifest = {"schema_version": SCHEMA_VERSION, "taxonomy": TAXONOMY.to_dict(),
                "counts": {"per_split": {"train": 110, "val": 10, "test": 0}}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    return str(data)


def read_split(data_dir: str, split: str = "train") -> dict[str, np.ndarray]:
    table = pq.read_table(Dataset(data_dir).posts(split), schema=POSTS_SCHEMA).sort_by("row_index")
    return {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}


def test_preprocessor_decodes_tokenises_and_fills_nulls(prepared):
    batch = {k: v[:8] for k, v in read_split(prepared).items()}
    pre = BatchPreprocessor(TINY_MODEL, image_size=64, context_length=32, train=False)
    pre = pickle.loads(pickle.dumps(pre))  # what Ray does with it
    out = pre(batch)
    assert set(out) == {"pixels", "tokens", "pid", "uid", "subcategory_id", "category_id", "label", "postdate"}
    assert out["pixels"].shape == (8, 3, 64, 64) and out["pixels"].dtype == np.float32
    assert out["tokens"].shape == (8, 32) and out["tokens"].dtype == np.int64
    assert out["subcategory_id"].dtype == np.int64 and out["subcategory_id"][1] == -1
    assert out["postdate"].dtype == np.int64 and out["label"].dtype == np.float64
    # a solid-colour JPEG normalises to (roughly) one value per channel
    assert out["pixels"][0].reshape(3, -1).std(axis=1).max() < 0.05
    assert (pre(batch)["pixels"] == out["pixels"]).all()  # eval transform is deterministic
    augmented = BatchPreprocessor(TINY_MODEL, image_size=48, context_length=16, train=True)(batch)
    assert augmented["pixels"].shape == (8, 3, 48, 48) and augmented["tokens"].shape == (8, 16)
    broken = dict(batch, image=np.array([b"not a jpeg"] * 8, dtype=object))
    with pytest.raises(ValueError, match="post '00000'"):
        pre(broken)


def test_preprocessor_tokens_match_the_backbone_tokenizer(prepared):
    from smpp_ray.model.backbone import create_backbone

    batch = {k: v[:8] for k, v in read_split(prepared).items()}
    out = BatchPreprocessor(TINY_MODEL, 64, 32, train=False)(batch)
    texts = [f"{t or ''} {g or ''}".strip() for t, g in zip(batch["title"], batch["tags"], strict=True)]
    assert np.array_equal(out["tokens"], create_backbone(TINY_MODEL).tokenize(texts).numpy())


# ---------------------------------------------------------------------------------------------
# The stage


def test_build_prototypes_with_ray_equals_in_process(ray_session, prepared, tmp_path):
    shots = 8
    summary = build_prototypes(prepared, str(tmp_path), backbone=TINY_MODEL, pretrained="", shots=shots,
                               time_buckets=3, batch_size=16, num_actors=1, num_gpus_per_actor=0.0, seed=0)
    train = read_split(prepared)
    labelled = [s for s in train["subcategory_id"] if s is not None]
    assert summary["posts"] == len(labelled) == 108
    assert summary["backbone_randomly_initialised"] is True
    bank = PrototypeBank.load(str(tmp_path / PROTOTYPES_FILE))
    members = json.loads((tmp_path / MEMBERS_FILE).read_text())
    assert bank.visual.shape == (88, 64) and len(members["classes"]) == 88

    # in-process: the same actor class called directly on every train post, then the same selection
    embedded = EmbedPosts(TINY_MODEL)(train)
    # Independently of the assembly code: each prototype row is the mean of its recorded members'
    # unit-norm embeddings (image for the visual bank, text for the textual one).
    np.testing.assert_allclose(np.linalg.norm(embedded["image_emb"], axis=1), 1.0, atol=1e-5)
    row_of = {str(p): i for i, p in enumerate(embedded["pid"])}
    for c in members["classes"]:
        if c["count"]:
            rows = [row_of[p] for p in c["pids"]]
            np.testing.assert_allclose(bank.visual[c["row"]].numpy(), embedded["image_emb"][rows].mean(0), atol=1e-5)
            np.testing.assert_allclose(bank.textual[c["row"]].numpy(), embedded["text_emb"][rows].mean(0), atol=1e-5)
    expected, expected_members = compute_prototypes(embedded, TAXONOMY, shots=shots, time_buckets=3, seed=0, embed_dim=64)
    got = {(c["level"], c["id"]): c for c in members["classes"]}
    for c in expected_members["classes"]:
        assert got[(c["level"], c["id"])]["pids"] == c["pids"], (c["level"], c["id"])
    torch.testing.assert_close(bank.visual, expected.visual, rtol=0, atol=1e-5)
    torch.testing.assert_close(bank.textual, expected.textual, rtol=0, atol=1e-5)
    assert torch.equal(bank.counts, expected.counts)

    sizes = {s: labelled.count(s) for s in set(labelled)}
    train_pids = set(train["pid"])
    for c in members["classes"]:
        assert c["count"] <= shots and set(c["pids"]) <= train_pids
        if c["level"] == "subcategory":
            assert c["available"] == sizes.get(c["id"], 0)
            assert c["count"] == min(shots, c["available"])  # small classes use all their posts
    for cat in range(11):
        children = [got[("subcategory", s)] for s in range(77) if TAXONOMY.parents[s] == cat]
        union = set().union(*(set(ch["pids"]) for ch in children))
        chosen = set(got[("category", cat)]["pids"])
        assert chosen <= union
        if len(union) <= shots:
            assert chosen == union
        else:
            assert len(chosen) == shots
    assert summary["empty_classes"] == sum(1 for c in members["classes"] if c["count"] == 0) > 0
    assert torch.equal(bank.visual[bank.counts == 0], torch.zeros(int((bank.counts == 0).sum()), 64))


def test_build_prototypes_rejects_a_folder_without_manifest(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        build_prototypes(str(tmp_path), str(tmp_path / "out"), backbone=TINY_MODEL)
