"""The synthetic SMPD corpus: determinism, SMPD layout and typing, and the generative model's promises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.stats import spearmanr

from smpp_ray.data.synth import (
    class_look,
    generate_corpus,
    oracle_src,
    render_image,
    synthesize_corpus,
)
from smpp_ray.data.taxonomy_names import SMPD_TAXONOMY, default_taxonomy

JSON_FILES = {
    "train_text.json": ["Uid", "Pid", "Title", "Mediatype", "Alltags"],
    "train_category.json": ["Uid", "Pid", "Category", "Subcategory", "Concept"],
    "train_temporalspatial_information.json": ["Uid", "Pid", "Postdate", "Latitude", "Longitude", "Geoaccuracy"],
    "train_additional_information.json": ["Uid", "Pid", "Pathalias", "Ispublic", "Mediastatus"],
    "train_user_data.json": ["Uid", "Pid", "photo_firstdate", "photo_count", "ispro", "canbuypro",
                             "timezone_offset", "photo_firstdatetaken", "timezone_timezone_id",
                             "user_description", "location_description"],
}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_taxonomy_is_11_by_77_with_real_category_names():
    taxonomy = default_taxonomy()
    assert taxonomy.num_categories == 11 and taxonomy.num_subcategories == 77
    assert "Whether&Season" in taxonomy.categories and "Travel&Active&Sports" in taxonomy.categories
    assert len(set(taxonomy.subcategories)) == 77
    for category, names in SMPD_TAXONOMY.items():
        for name in names:
            assert taxonomy.categories[taxonomy.parents[taxonomy.subcategories.index(name)]] == category


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    kwargs = {"posts": 80, "image_size": 32, "test_posts": 8}
    first = _tree_bytes(Path(synthesize_corpus(str(tmp_path / "a"), seed=5, **kwargs)["out_dir"]))
    second = _tree_bytes(Path(synthesize_corpus(str(tmp_path / "b"), seed=5, **kwargs)["out_dir"]))
    assert first == second
    other = _tree_bytes(Path(synthesize_corpus(str(tmp_path / "c"), seed=6, **kwargs)["out_dir"]))
    assert other["train_text.json"] != first["train_text.json"]
    assert other["train_label.txt"] != first["train_label.txt"]


def test_rerun_into_the_same_folder_leaves_no_stale_files(tmp_path):
    synthesize_corpus(str(tmp_path / "x"), posts=60, seed=1, image_size=32, test_posts=5)
    synthesize_corpus(str(tmp_path / "x"), posts=40, seed=2, image_size=32)
    synthesize_corpus(str(tmp_path / "fresh"), posts=40, seed=2, image_size=32)
    assert _tree_bytes(tmp_path / "x") == _tree_bytes(tmp_path / "fresh")


def test_layout_and_string_typing_match_smpd(tmp_path):
    summary = synthesize_corpus(str(tmp_path), posts=150, seed=3, image_size=40, test_posts=12)
    assert summary["posts"] == 150 and summary["test_posts"] == 12 and summary["images"] == 162
    for name, keys in JSON_FILES.items():
        for prefix in ("train_", "test_"):
            records = json.loads((tmp_path / name.replace("train_", prefix)).read_text())
            assert len(records) == (150 if prefix == "train_" else 12)
            assert all(list(r) == keys for r in records), name
            assert all(isinstance(v, str) for r in records for v in r.values()), name
    assert not (tmp_path / "test_label.txt").exists()   # test posts are unlabelled
    labels = (tmp_path / "train_label.txt").read_text().splitlines()
    assert len(labels) == 150 and all(np.isfinite(float(x)) for x in labels)

    text = json.loads((tmp_path / "train_text.json").read_text())
    geo = json.loads((tmp_path / "train_temporalspatial_information.json").read_text())
    users = json.loads((tmp_path / "train_user_data.json").read_text())
    cats = json.loads((tmp_path / "train_category.json").read_text())
    assert all(g["Postdate"].isdigit() for g in geo)
    no_geo = [g for g in geo if g["Latitude"] == "0"]
    assert len(no_geo) > len(geo) / 2 and {g["Longitude"] for g in no_geo} <= {"", "0"}
    assert any(g["Longitude"] == "" for g in no_geo)
    descriptions = [u["user_description"] for u in users if u["user_description"]]
    assert descriptions and all(len([float(x) for x in d.split(",")]) == 16 for d in descriptions)
    assert sum(t["Title"] == "" for t in text) > 0.3 * len(text)   # titles are often empty
    taxonomy = default_taxonomy()
    for c in cats:
        sub = taxonomy.subcategories.index(c["Subcategory"])
        assert taxonomy.categories[taxonomy.parents[sub]] == c["Category"]

    for prefix, folder, n in (("train_", "train", 150), ("test_", "test", 12)):
        paths = (tmp_path / f"{prefix}img_filepath.txt").read_text().splitlines()
        records = json.loads((tmp_path / f"{prefix}text.json").read_text())
        assert len(paths) == n
        for path, record in zip(paths, records, strict=True):
            assert path == f"{folder}/{record['Uid']}/{record['Pid']}.jpg"
        with Image.open(tmp_path / paths[0]) as image:
            assert image.format == "JPEG" and image.size == (40, 40) and image.mode == "RGB"

    oracle = pq.read_table(tmp_path / "oracle.parquet").to_pydict()
    assert len(oracle["pid"]) == 162 and oracle["pid"][:150] == [t["Pid"] for t in text]
    assert len(set(oracle["pid"])) == 162   # Pids unique across train and test


@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_src_is_about_0_8(seed):
    corpus = generate_corpus(1500, seed)
    assert 0.7 <= oracle_src(corpus) <= 0.9


def test_appeal_is_worth_a_clear_share_of_the_achievable_src():
    """Without the pixel-only appeal latent even a perfect metadata model ranks clearly worse."""
    corpus = generate_corpus(3000, 2)
    with_pixels = spearmanr(corpus.label, corpus.score).statistic
    metadata_only = spearmanr(corpus.label, corpus.score - 0.9 * corpus.appeal).statistic
    assert with_pixels - metadata_only > 0.08


def test_popular_users_post_more_and_have_more_photos():
    corpus = generate_corpus(3000, 4)
    posts_per_user = np.bincount(corpus.user, minlength=len(corpus.uid))
    assert spearmanr(corpus.z, posts_per_user).statistic > 0.3
    assert spearmanr(corpus.z, corpus.photo_count).statistic > 0.7


def _downsample(pixels: np.ndarray, cells: int = 8) -> np.ndarray:
    size = pixels.shape[0]
    return pixels.reshape(cells, size // cells, cells, size // cells, 3).mean(axis=(1, 3)).ravel() / 255.0


def test_subcategory_is_learnable_from_pixels():
    """A nearest-centroid classifier on 8x8 thumbnails beats 5x chance on the 77 classes."""
    look, rng = class_look(), np.random.default_rng(0)
    train, test = [], []
    for sub in range(77):
        for k in range(9):
            vector = _downsample(render_image(look, sub, float(rng.normal()), 32, rng))
            (train if k < 6 else test).append((sub, vector))
    centroids = np.stack([np.mean([v for s, v in train if s == sub], axis=0) for sub in range(77)])
    hits = [int(np.argmin(((centroids - v) ** 2).sum(axis=1)) == sub) for sub, v in test]
    assert np.mean(hits) > 5 / 77


def test_appeal_is_visible_in_pixels():
    look, rng = class_look(), np.random.default_rng(1)
    appeal = rng.normal(size=60)
    contrast = [render_image(look, 3, float(a), 32, rng).astype(float).std() for a in appeal]
    assert spearmanr(appeal, contrast).statistic > 0.5


def test_synth_never_deletes_a_folder_it_did_not_write(tmp_path, caplog):
    """`smpp synth --out MYDIR` where MYDIR holds a user's train/ photos: exit 2, the photos intact."""
    from smpp_ray.cli import EXIT_BAD_INPUT, main

    mine = tmp_path / "MYDIR"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "holiday.jpg").write_bytes(b"my photo")
    assert main(["synth", "--out", str(mine), "--posts", "10", "--set", "tracking.enabled=false"]) == EXIT_BAD_INPUT
    assert "synth did not write" in caplog.text
    assert (mine / "train" / "holiday.jpg").read_bytes() == b"my photo"
    assert sorted(p.name for p in mine.rglob("*")) == ["holiday.jpg", "train"]
