"""`prepare`: raw SMPD folder -> Parquet shards with a real Ray; validation, splits, quirks, idempotence."""

from __future__ import annotations

import calendar
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpp_ray.data import smpd_rows
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.images import fit_image
from smpp_ray.data.prepare import prepare_dataset
from smpp_ray.data.schema import POSTS_SCHEMA, REJECTS_SCHEMA, SPLITS, Taxonomy
from smpp_ray.data.splits import assign_splits
from smpp_ray.data.synth import synthesize_corpus
from smpp_ray.data.taxonomy import chosen_taxonomy, infer_taxonomy
from smpp_ray.data.taxonomy_names import default_taxonomy

POSTS, TEST_POSTS = 240, 20
TEXT, CATEGORY, GEO = "train_text.json", "train_category.json", "train_temporalspatial_information.json"
ADDITIONAL, USER = "train_additional_information.json", "train_user_data.json"
LABEL, IMAGES = "train_label.txt", "train_img_filepath.txt"
ALL_JSON = (TEXT, CATEGORY, GEO, ADDITIONAL, USER)


@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    synthesize_corpus(str(root), posts=POSTS, seed=11, image_size=32, test_posts=TEST_POSTS)
    return root


@pytest.fixture
def raw_copy(raw_corpus, tmp_path) -> Path:
    target = tmp_path / "raw"
    shutil.copytree(raw_corpus, target)
    return target


def _read_split(data: Path, split: str):
    return pq.read_table(Dataset(str(data)).posts(split))


def _file_schemas(data: Path) -> list:
    return [pq.read_schema(f).remove_metadata() for f in sorted((data / "posts").rglob("part-*.parquet"))]


def _rejects(data: Path) -> list[dict]:
    table = pq.read_table(data / "rejects")
    assert table.schema.remove_metadata().equals(REJECTS_SCHEMA)
    return table.to_pylist()


def _edit_json(raw: Path, name: str, edit) -> None:
    records = json.loads((raw / name).read_text())
    edit(records)
    (raw / name).write_text(json.dumps(records))


def _edit_lines(raw: Path, name: str, edit) -> None:
    lines = (raw / name).read_text().splitlines()
    edit(lines)
    (raw / name).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- no Ray needed

def test_inferred_taxonomy_is_the_datas_own_in_a_deterministic_order():
    pairs = [("Urban", "StreetArt")] * 3 + [("Family", "Love")] * 4 + [("Family", "Good,Morning")] * 3
    inferred = infer_taxonomy(pairs, min_class_posts=3)
    assert inferred.taxonomy == Taxonomy(("Family", "Urban"), ("Good,Morning", "Love", "StreetArt"), (0, 0, 1))
    # The same rows in another order give the same ids.
    assert infer_taxonomy(list(reversed(pairs)), min_class_posts=3).taxonomy == inferred.taxonomy
    assert inferred.rare == {} and inferred.majority == {}


def test_inferred_taxonomy_takes_the_majority_parent_and_drops_rare_names():
    pairs = [("Urban", "StreetArt")] * 5 + [("Fashion", "StreetArt")] * 2 + [("Urban", "Streetart")]
    inferred = infer_taxonomy(pairs, min_class_posts=2)
    assert inferred.taxonomy == Taxonomy(("Urban",), ("StreetArt",), (0,))
    assert inferred.majority == {"StreetArt": ("Urban", 5, 7)}
    assert inferred.rare == {"Streetart": 1}   # a typo never becomes a class
    with pytest.raises(ValueError, match="min_class_posts=9"):
        infer_taxonomy(pairs, min_class_posts=9)


def test_the_packaged_list_and_a_named_file_are_explicit_choices(tmp_path):
    assert chosen_taxonomy("infer") is None
    assert chosen_taxonomy("packaged") == default_taxonomy()
    supplied = Taxonomy(("Space", "Sea"), ("Rocket", "Moon", "Fish"), (0, 0, 1))
    (tmp_path / "classes.json").write_text(json.dumps(supplied.to_dict()))
    assert chosen_taxonomy(str(tmp_path / "classes.json")) == supplied


def test_a_16_bit_grayscale_png_is_scaled_not_clipped():
    """Pillow's convert("RGB") saturates 16-bit values: mid-gray 32768 would be stored as white."""
    import numpy as np

    for values, mean in ((np.full((20, 30), 32768, np.uint16), 128.0),
                         (np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16), 127.5)):
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, format="PNG")
        assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
        stored = np.asarray(Image.open(io.BytesIO(fit_image(buffer.getvalue(), "x.png", 64, 95))).convert("L"),
                            dtype=np.float64)
        assert abs(stored.mean() - mean) < 1.5 and stored.max() - stored.min() == (0 if mean == 128.0 else 255)


def test_assign_splits_validates_arguments():
    with pytest.raises(ValueError, match="'random'"):
        assign_splits([], "random", 0.1, 0.1)
    with pytest.raises(ValueError, match="sum to < 1"):
        assign_splits([], "time", 0.6, 0.5)


def test_missing_folder_and_missing_file_raise_naming_them(raw_copy, tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        prepare_dataset(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (raw_copy / CATEGORY).unlink()
    with pytest.raises(ValueError, match="train_category.json"):
        prepare_dataset(str(raw_copy), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()   # stopped before any work


def test_missing_test_file_raises_once_any_test_file_exists(raw_copy, tmp_path):
    (raw_copy / "test_user_data.json").unlink()
    with pytest.raises(ValueError, match="test_user_data.json"):
        prepare_dataset(str(raw_copy), str(tmp_path / "out"))


def test_files_of_different_lengths_raise_naming_them(raw_copy, tmp_path):
    _edit_lines(raw_copy, LABEL, lambda lines: lines.pop())
    with pytest.raises(ValueError, match=r"same number of rows.*train_label.txt: 239 rows"):
        prepare_dataset(str(raw_copy), str(tmp_path / "out"))


def test_a_file_that_is_not_a_json_array_raises(raw_copy, tmp_path):
    (raw_copy / GEO).write_text('{"Uid": "1"}')
    with pytest.raises(ValueError, match="train_temporalspatial_information.json.*JSON array"):
        prepare_dataset(str(raw_copy), str(tmp_path / "out"))


# ----------------------------------------------------------------------------- with Ray

def test_round_trip_schema_counts_and_time_split(ray_session, raw_corpus, tmp_path):
    data = tmp_path / "data"
    manifest = prepare_dataset(str(raw_corpus), str(data), max_image_side=24, rows_per_shard=64)
    counts = manifest["counts"]
    assert counts["input_rows"] == POSTS + TEST_POSTS == counts["written"] + counts["rejected"]
    assert counts["rejected"] == 0 and _rejects(data) == []
    assert Dataset(str(data)).manifest().facts == manifest
    schemas = _file_schemas(data)
    assert schemas and all(s.equals(POSTS_SCHEMA) for s in schemas)
    assert len(list((data / "posts" / "split=train").glob("part-*.parquet"))) >= 2   # sharded

    tables = {s: _read_split(data, s) for s in SPLITS}
    assert {s: t.num_rows for s, t in tables.items()} == counts["per_split"]
    assert counts["per_split"] == {"train": 192, "val": 24, "test": 24 + TEST_POSTS}
    dates = {s: t.column("postdate").to_pylist() for s, t in tables.items()}
    test_labels = tables["test"].column("label").to_pylist()
    labelled_test = [d for d, y in zip(dates["test"], test_labels, strict=True) if y is not None]
    assert max(dates["train"]) <= min(dates["val"]) and max(dates["val"]) <= min(labelled_test)
    assert manifest["split"]["method"] == "time"
    assert manifest["split"]["boundaries"]["val"]["start"] == min(dates["val"])
    assert manifest["time_range"] == {"start": min(min(d) for d in dates.values()),
                                      "end": max(max(d) for d in dates.values())}
    assert tables["test"].column("label").null_count == TEST_POSTS    # unlabelled test_ posts
    assert tables["train"].column("label").null_count == 0

    taxonomy = Dataset(str(data)).taxonomy()
    assert taxonomy == default_taxonomy()
    rows = tables["train"].select(["category", "subcategory", "category_id", "subcategory_id"]).to_pylist()
    for row in rows:
        assert taxonomy.subcategories[row["subcategory_id"]] == row["subcategory"]
        assert taxonomy.parents[row["subcategory_id"]] == row["category_id"]
        assert taxonomy.categories[row["category_id"]] == row["category"]
    with Image.open(io.BytesIO(tables["val"].column("image")[0].as_py())) as image:
        assert image.format == "JPEG" and max(image.size) == 24   # resized from 32

    oracle = pq.read_table(raw_corpus / "oracle.parquet").to_pydict()
    label_of = dict(zip(oracle["pid"], oracle["label"], strict=True))
    train = tables["train"].select(["pid", "label"]).to_pydict()
    assert all(abs(label_of[p] - y) < 1e-9 for p, y in zip(train["pid"], train["label"], strict=True))


def test_rerun_overwrites_cleanly_with_identical_shards(ray_session, raw_corpus, tmp_path):
    data = tmp_path / "data"
    prepare_dataset(str(raw_corpus), str(data), rows_per_shard=100)
    first = {p.relative_to(data): pq.read_table(p) for p in sorted((data / "posts").rglob("*.parquet"))}
    (data / "posts" / "split=train" / "part-99999-0.parquet").write_bytes(b"stale")
    manifest = prepare_dataset(str(raw_corpus), str(data), rows_per_shard=100)
    second = {p.relative_to(data): pq.read_table(p) for p in sorted((data / "posts").rglob("*.parquet"))}
    assert list(first) == list(second)
    assert all(first[k].equals(second[k]) for k in first)
    assert sum(_read_split(data, s).num_rows for s in SPLITS) == manifest["counts"]["written"] == POSTS + TEST_POSTS


def test_user_split_keeps_each_user_in_one_split(ray_session, raw_corpus, tmp_path):
    data = tmp_path / "data"
    manifest = prepare_dataset(str(raw_corpus), str(data), split="user", val_fraction=0.2, test_fraction=0.2)
    users = {s: set(_read_split(data, s).column("uid").to_pylist()) for s in SPLITS}
    labelled_test = set(_read_split(data, "test").filter(
        _read_split(data, "test").column("label").is_valid()).column("uid").to_pylist())
    assert not users["train"] & users["val"] and not users["train"] & labelled_test
    assert not users["val"] & labelled_test
    assert manifest["split"]["method"] == "user"
    assert sum(manifest["split"]["boundaries"]["users"].values()) == len(users["train"] | users["val"] | labelled_test)
    assert manifest["counts"]["written"] == POSTS + TEST_POSTS


def test_every_bad_input_becomes_exactly_its_reject(ray_session, raw_copy, tmp_path, monkeypatch):
    # Scanned and parsed by Ray tasks, as a large corpus is (a small one is read in-process).
    monkeypatch.setattr(smpd_rows, "IN_PROCESS_BYTES", 0)
    text = json.loads((raw_copy / TEXT).read_text())
    paths = (raw_copy / IMAGES).read_text().splitlines()
    cats = json.loads((raw_copy / CATEGORY).read_text())
    expected: dict[int, tuple[str, str]] = {}   # row -> (source file, field)

    # 1. truncated JPEG
    image = raw_copy / paths[3]
    image.write_bytes(image.read_bytes()[:200])
    expected[3] = (IMAGES, "image")
    # 2. non-numeric label
    _edit_lines(raw_copy, LABEL, lambda lines: lines.__setitem__(5, "abc"))
    expected[5] = (LABEL, "label")
    # 3. duplicate Pid (row 9 reuses row 8's Pid in every file)
    def copy_pid(records):
        records[9]["Pid"], records[9]["Uid"] = records[8]["Pid"], records[8]["Uid"]
    for name in ALL_JSON:
        _edit_json(raw_copy, name, copy_pid)
    expected[9] = (TEXT, "Pid")
    # 4. Uid disagreeing across files
    _edit_json(raw_copy, CATEGORY, lambda r: r[12].__setitem__("Uid", "999@N99"))
    expected[12] = (CATEGORY, "Uid")
    # 5. deleted image
    (raw_copy / paths[14]).unlink()
    expected[14] = (IMAGES, "image")
    # 6./7. paths that escape the raw folder: '..' and absolute
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((raw_copy / paths[0]).read_bytes())
    _edit_lines(raw_copy, IMAGES, lambda lines: lines.__setitem__(16, "../outside.jpg"))
    _edit_lines(raw_copy, IMAGES, lambda lines: lines.__setitem__(17, str(outside)))
    expected[16] = expected[17] = (IMAGES, "image_path")
    # 8. symlink escaping the raw folder (never read)
    (raw_copy / paths[18]).unlink()
    (raw_copy / paths[18]).symlink_to(outside)
    expected[18] = (IMAGES, "image")
    # 9. missing field, 10. invalid Postdate, 11. out-of-range latitude
    _edit_json(raw_copy, GEO, lambda r: r[20].pop("Postdate"))
    _edit_json(raw_copy, GEO, lambda r: r[21].__setitem__("Postdate", "yesterday"))
    _edit_json(raw_copy, GEO, lambda r: r[22].update(Latitude="123.5", Longitude="10.0"))
    expected[20] = expected[21] = (GEO, "Postdate")
    expected[22] = (GEO, "Latitude")
    # 12. bad user_description, 13. non-numeric photo_count, 14. Pid disagreeing in the user file
    _edit_json(raw_copy, USER, lambda r: r[24].__setitem__("user_description", "0.1,abc,0.3"))
    _edit_json(raw_copy, USER, lambda r: r[25].__setitem__("photo_count", "many"))
    _edit_json(raw_copy, USER, lambda r: r[26].__setitem__("Pid", "123"))
    expected[24], expected[25], expected[26] = (USER, "user_description"), (USER, "photo_count"), (USER, "Pid")
    # 15. empty subcategory, 16. category contradicting the subcategory's parent
    _edit_json(raw_copy, CATEGORY, lambda r: r[28].__setitem__("Subcategory", ""))
    subs = [c["Subcategory"] for c in cats]
    moved = next(i for i in range(29, POSTS) if subs.count(subs[i]) >= 3)   # majority keeps the parent
    other = next(c for c in SMPD_CATEGORIES if c != cats[moved]["Category"])
    _edit_json(raw_copy, CATEGORY, lambda r: r[moved].__setitem__("Category", other))
    expected[28], expected[moved] = (CATEGORY, "Subcategory"), (CATEGORY, "Category")
    # 17. ispublic not a flag
    _edit_json(raw_copy, ADDITIONAL, lambda r: r[27].__setitem__("Ispublic", "2"))
    expected[27] = (ADDITIONAL, "Ispublic")

    data = tmp_path / "data"
    manifest = prepare_dataset(str(raw_copy), str(data))
    rejects = _rejects(data)
    assert {r["row_index"]: (r["source_file"], r["field"]) for r in rejects} == expected
    assert len(rejects) == len(expected) == manifest["counts"]["rejected"]
    by_row = {r["row_index"]: r for r in rejects}
    assert "cannot be decoded" in by_row[3]["reason"] and "does not exist" in by_row[14]["reason"]
    assert "outside the raw folder" in by_row[18]["reason"] and "'..'" in by_row[16]["reason"]
    assert "absolute" in by_row[17]["reason"] and "duplicate Pid" in by_row[9]["reason"]
    assert "'abc'" in by_row[5]["reason"] and by_row[5]["pid"] == text[5]["Pid"]
    assert "missing field" in by_row[20]["reason"]
    counts = manifest["counts"]
    assert counts["written"] == POSTS + TEST_POSTS - len(expected)
    assert counts["input_rows"] == counts["written"] + counts["rejected"]
    written = {p for s in SPLITS for p in _read_split(data, s).column("pid").to_pylist()}
    assert text[8]["Pid"] in written and text[3]["Pid"] not in written
    assert counts["rejected_by_field"]["image"] == 3


SMPD_CATEGORIES = default_taxonomy().categories


def test_real_file_quirks_are_parsed(ray_session, raw_copy, tmp_path):
    text = json.loads((raw_copy / TEXT).read_text())
    for name in ALL_JSON:   # Pid as a JSON int in every file
        _edit_json(raw_copy, name, lambda r: r[2].__setitem__("Pid", int(r[2]["Pid"])))
    _edit_json(raw_copy, USER, lambda r: r[2].update(
        timezone_offset="+05:30", photo_firstdatetaken="2001-05-03 10:00:00", photo_count="None", ispro="None"))
    _edit_json(raw_copy, USER, lambda r: r[4].update(timezone_id="7", user_description=""))
    _edit_json(raw_copy, USER, lambda r: r[4].pop("timezone_timezone_id"))
    _edit_json(raw_copy, GEO, lambda r: r[2].update(Latitude="0", Longitude="", Geoaccuracy="0"))
    _edit_json(raw_copy, GEO, lambda r: r[4].update(Latitude="48.858", Longitude="2.294", Geoaccuracy="16"))
    _edit_json(raw_copy, ADDITIONAL, lambda r: r[2].update(Pathalias="None"))
    _edit_json(raw_copy, CATEGORY, lambda r: r[2].update(Category="Fashion", Subcategory="Girls,Fashion"))
    _edit_json(raw_copy, TEXT, lambda r: r[4].update(Title=None))

    data = tmp_path / "data"
    manifest = prepare_dataset(str(raw_copy), str(data))
    assert manifest["counts"]["rejected"] == 0
    rows = {r["pid"]: r for s in SPLITS for r in _read_split(data, s).drop_columns(["image"]).to_pylist()}
    quirky, other = rows[text[2]["Pid"]], rows[text[4]["Pid"]]
    assert quirky["timezone_offset"] == 5.5
    assert quirky["photo_firstdatetaken"] == calendar.timegm((2001, 5, 3, 10, 0, 0))
    assert quirky["photo_count"] is None and quirky["ispro"] is None and quirky["pathalias"] is None
    assert quirky["latitude"] is None and quirky["longitude"] is None and quirky["geoaccuracy"] is None
    assert quirky["subcategory"] == "Girls,Fashion" and quirky["category"] == "Fashion"
    taxonomy = Dataset(str(data)).taxonomy()
    assert taxonomy.subcategories[quirky["subcategory_id"]] == "Girls,Fashion"
    assert (other["latitude"], other["longitude"], other["geoaccuracy"]) == (48.858, 2.294, 16.0)
    assert other["timezone_id"] == "7" and other["user_description"] is None and other["title"] == ""
    assert any(r["user_description"] is not None and len(r["user_description"]) == 16 for r in rows.values())


def test_2019_file_names_are_accepted_as_aliases(ray_session, raw_copy, tmp_path):
    aliases = {TEXT: "train_tags.json", GEO: "train_temporalspatial.json", ADDITIONAL: "train_additional.json",
               USER: "train_userdata.json", IMAGES: "train_img.txt"}
    for current, old in aliases.items():
        (raw_copy / current).rename(raw_copy / old)
    for path in raw_copy.glob("test_*"):
        path.unlink()
    _edit_lines(raw_copy, LABEL, lambda lines: lines.__setitem__(1, "oops"))
    manifest = prepare_dataset(str(raw_copy), str(tmp_path / "data"))
    assert manifest["counts"]["written"] == POSTS - 1
    assert manifest["files"]["train"]["text"] == "train_tags.json" and "test" not in manifest["files"]
    assert manifest["files"]["train"]["img_filepath"] == "train_img.txt"
    assert _rejects(tmp_path / "data")[0]["source_file"] == LABEL


def test_labelled_test_files_stay_in_the_test_split(ray_session, raw_copy, tmp_path):
    (raw_copy / "test_label.txt").write_text("".join(f"{3 + i / 10}\n" for i in range(TEST_POSTS)))
    manifest = prepare_dataset(str(raw_copy), str(tmp_path / "data"))
    assert manifest["counts"]["per_split"] == {"train": 192, "val": 24, "test": 24 + TEST_POSTS}
    assert manifest["split"]["unlabelled_test_rows"] == 0
    assert manifest["files"]["test"]["label"] == "test_label.txt"
    test = _read_split(tmp_path / "data", "test")
    assert test.column("label").null_count == 0


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_with_the_same_picture():
    """fit_image decodes a big JPEG at the DCT scale nearest max_side (draft mode), so its cost
    follows what is kept; the stored picture matches a full decode then resize."""
    import numpy as np

    from smpp_ray.data.images import fit_image

    y, x = np.mgrid[0:3000, 0:4000]
    picture = np.stack([(x / 16) % 256, (y / 12) % 256, ((x + y) / 20) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=92)
    stored = Image.open(io.BytesIO(fit_image(buffer.getvalue(), "big.jpg", 256, 92)))
    assert stored.format == "JPEG" and max(stored.size) == 256

    reference = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    reference.thumbnail((256, 256), Image.Resampling.BICUBIC)
    assert stored.size == reference.size
    difference = np.abs(np.asarray(stored, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert difference.mean() < 6  # the same picture: JPEG re-encoding and scaling noise only

    with Image.open(io.BytesIO(buffer.getvalue())) as probe:
        probe.draft("RGB", (256, 256))
        assert max(probe.size) < 4000  # the decoder really was asked for a smaller scale
