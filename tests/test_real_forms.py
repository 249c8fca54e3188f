"""The SMPD as it is distributed, not as our generator writes it.

The fixtures here are written from the format's documented facts (issue: "The real SMPD as it is
distributed today"), never copied from the real data (licensed, identifies real users) and never
produced by ``smpp synth``:

- the user file of the 2024+ release is a pandas column dict (``DataFrame.to_json()``): ``Pid`` an
  int, counts and ``ispro`` floats, nulls, ``photo_firstdatetaken`` a datetime string,
  ``timezone_id``, no ``canbuypro``, text descriptions with HTML and URLs;
- Uid suffixes of one or two digits; rows ordered by Pid, not time; ``Alltags`` with machine tags;
  no-geo rows ``Latitude "0"``, ``Longitude ""``, ``Geoaccuracy "0"``; ``Pathalias``;
- images unpack under ``SMP_train_images/`` while the path file says ``train/<Uid>/<Pid>.jpg``,
  and the metadata sits two folders deep (``train_allmetadata_json/train_allmetadata_json/``);
- the classes are SMPD's own names (``StreetArt``, ``Good,Morning``, ...), which no list ships.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpp_ray.cli import EXIT_BAD_INPUT, EXIT_OK, main
from smpp_ray.data import smpd_rows
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.prepare import prepare_dataset
from smpp_ray.data.schema import SPLITS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "configs" / "smoke.yaml")
#: (Category, Subcategory) of real SMPD rows; four posts each.
CLASSES = [("Urban", "StreetArt"), ("Family", "Love"), ("Entertainment", "Books"),
           ("Social&People", "Good,Morning"), ("Travel&Active&Sports", "Health,Fitness")]
UIDS = ["27882@N8", "59@N75", "1043@N0", "88121@N21"]
POSTS = 4 * len(CLASSES)
META_2024 = Path("train_allmetadata_json", "train_allmetadata_json")


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (seed * 37 % 255, seed * 91 % 255, 120)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _posts() -> list[dict]:
    """One dict per post, in Pid order (the files' order); postdates deliberately not sorted."""
    posts = []
    for i in range(POSTS):
        category, subcategory = CLASSES[i % len(CLASSES)]
        geo = i % 3 == 0
        posts.append({
            "uid": UIDS[i % len(UIDS)], "pid": 194355 + 7 * i, "category": category, "subcategory": subcategory,
            "postdate": 1456000000 + ((i * 7919) % POSTS) * 86400,   # Pid order is not time order
            "tags": f"street art paris uploaded:by=flickstagram instagram:photo={1000 + i}" if i % 2 else "",
            "lat": "48.8566" if geo else "0", "lon": "2.3522" if geo else "", "acc": "16" if geo else "0",
            "label": f"{4 + (i % 9) * 0.55:.4f}",
        })
    return posts


def _write_common(raw: Path, meta: Path, posts: list[dict]) -> None:
    """The files both forms share: text, category, geo, additional (records), labels, paths."""
    (raw / meta).mkdir(parents=True, exist_ok=True)
    ids = [{"Uid": p["uid"], "Pid": str(p["pid"])} for p in posts]
    files = {
        "train_text.json": [{**k, "Title": f"Wall {i}" if i % 4 else "", "Mediatype": "photo", "Alltags": p["tags"]}
                            for i, (k, p) in enumerate(zip(ids, posts, strict=True))],
        "train_category.json": [{**k, "Category": p["category"], "Subcategory": p["subcategory"],
                                 "Concept": p["subcategory"].split(",")[0].lower()}
                                for k, p in zip(ids, posts, strict=True)],
        "train_temporalspatial_information.json": [
            {**k, "Postdate": str(p["postdate"]), "Latitude": p["lat"], "Longitude": p["lon"], "Geoaccuracy": p["acc"]}
            for k, p in zip(ids, posts, strict=True)],
        "train_additional_information.json": [{**k, "Mediastatus": "ready", "Pathalias": f"alias{i % 3}" if i % 2 else "None",
                                               "Ispublic": "1"} for i, k in enumerate(ids)],
    }
    for name, records in files.items():
        (raw / meta / name).write_text(json.dumps(records))
    (raw / "train_label.txt").write_text("".join(p["label"] + "\n" for p in posts))
    (raw / "train_img_filepath.txt").write_text("".join(f"train/{p['uid']}/{p['pid']}.jpg\n" for p in posts))


def write_smpd_2024(raw: Path, posts: list[dict] | None = None) -> list[dict]:
    """A raw folder in the 2024+ form; returns its posts."""
    posts = posts or _posts()
    _write_common(raw, META_2024, posts)
    user = {
        "Uid": {str(i): p["uid"] for i, p in enumerate(posts)},
        "Pid": {str(i): p["pid"] for i, p in enumerate(posts)},   # an int in this form
        "photo_firstdate": {str(i): 1262304000.0 if i % 5 else None for i in range(len(posts))},
        "photo_count": {str(i): 1813.0 + i for i in range(len(posts))},
        "ispro": {str(i): float(i % 2) for i in range(len(posts))},
        "timezone_offset": {str(i): "+01:00" if i % 3 else None for i in range(len(posts))},
        "photo_firstdatetaken": {str(i): "2013-04-02 17:52:16" if i % 4 else None for i in range(len(posts))},
        "timezone_id": {str(i): "Europe/Paris" for i in range(len(posts))},
        "user_description": {str(i): ('<p>Street photographer. <a href="https://www.example.org/u">portfolio</a></p>'
                                      if i % 2 else None) for i in range(len(posts))},
        "location_description": {str(i): "Paris, France" if i % 3 else None for i in range(len(posts))},
    }
    (raw / META_2024 / "train_user_data.json").write_text(json.dumps(user))
    _write_images(raw / "SMP_train_images", posts)
    return posts


def write_smpd_2019(raw: Path) -> list[dict]:
    """The same posts in the 2019-2023 form: every file a list of string-typed records at the top,
    user descriptions as comma-separated floats, images where the path file says."""
    posts = _posts()
    _write_common(raw, Path("."), posts)
    users = [{"Uid": p["uid"], "Pid": str(p["pid"]), "photo_firstdate": "1262304000", "photo_count": str(1813 + i),
              "ispro": str(i % 2), "canbuypro": "0", "timezone_offset": "1", "photo_firstdatetaken": "None",
              "timezone_timezone_id": "12", "user_description": ",".join(f"{(i + k) / 10:.6f}" for k in range(6)),
              "location_description": ",".join(f"{k / 7:.4f}" for k in range(8))} for i, p in enumerate(posts)]
    (raw / "train_user_data.json").write_text(json.dumps(users))
    _write_images(raw / "train", posts)
    return posts


def _write_images(folder: Path, posts: list[dict]) -> None:
    """``<folder>/<Uid>/<Pid>.jpg`` for every post."""
    for i, p in enumerate(posts):
        image = folder / p["uid"] / f"{p['pid']}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(_jpeg(i))


def _written(data: Path) -> list[dict]:
    rows = []
    for split in SPLITS:
        rows += pq.read_table(Dataset(str(data)).posts(split)).drop_columns(["image"]).to_pylist()
    return rows


def _rejects(data: Path) -> list[dict]:
    return pq.read_table(data / "rejects").to_pylist()


@pytest.mark.parametrize("in_process_bytes", [smpd_rows.IN_PROCESS_BYTES, 0], ids=["in-process", "ray-tasks"])
def test_the_2024_form_goes_in_whole(ray_session, tmp_path, monkeypatch, in_process_bytes):
    monkeypatch.setattr(smpd_rows, "IN_PROCESS_BYTES", in_process_bytes)   # both ways a folder is read
    posts = write_smpd_2024(tmp_path / "raw")
    manifest = prepare_dataset(str(tmp_path / "raw"), str(tmp_path / "data"), val_fraction=0.2, test_fraction=0.2)
    assert manifest["counts"]["written"] == POSTS and manifest["counts"]["rejected"] == 0
    assert manifest["forms"]["train_user_data.json"] == "columns"
    assert manifest["forms"]["train_text.json"] == "records"
    assert manifest["image_roots"] == {"train_": "first folder replaced by SMP_train_images/"}
    assert manifest["taxonomy_source"] == "inferred from the training rows"
    names = {s["name"] for s in manifest["taxonomy"]["subcategories"]}
    assert names == {s for _, s in CLASSES}
    rows = {r["pid"]: r for r in _written(tmp_path / "data")}
    assert set(rows) == {str(p["pid"]) for p in posts}
    first, second = rows[str(posts[0]["pid"])], rows[str(posts[1]["pid"])]
    assert first["uid"] == "27882@N8" and second["uid"] == "59@N75"
    assert first["photo_count"] == 1813 and second["ispro"] == 1 and first["canbuypro"] is None
    assert first["photo_firstdate"] is None and first["photo_firstdatetaken"] is None   # nulls
    assert rows[str(posts[1]["pid"])]["photo_firstdatetaken"] == 1364925136   # "2013-04-02 17:52:16" UTC
    assert second["timezone_offset"] == 1.0 and first["timezone_offset"] is None and first["timezone_id"] == "Europe/Paris"
    assert first["user_description"] is None and first["user_description_text"] is None
    assert "https://www.example.org/u" in second["user_description_text"] and second["user_description"] is None
    assert second["location_description"] == "Paris, France"
    assert first["latitude"] is not None and second["latitude"] is None and second["longitude"] is None
    assert "uploaded:by=flickstagram" in second["tags"]
    assert second["image_path"] == f"SMP_train_images/59@N75/{posts[1]['pid']}.jpg"
    assert {r["subcategory"] for r in rows.values()} == {s for _, s in CLASSES}


def test_the_2019_form_goes_in_whole(ray_session, tmp_path):
    write_smpd_2019(tmp_path / "raw")
    manifest = prepare_dataset(str(tmp_path / "raw"), str(tmp_path / "data"))
    assert manifest["counts"]["written"] == POSTS and manifest["counts"]["rejected"] == 0
    assert manifest["forms"]["train_user_data.json"] == "records"
    assert manifest["image_roots"] == {"train_": "as written"}
    rows = _written(tmp_path / "data")
    assert all(len(r["user_description"]) == 6 and r["user_description_text"] is None for r in rows)
    assert all(r["location_description"] is None for r in rows)   # the older location vector is dropped


def test_hierarchy_conflicts_and_rare_names_are_rejects_with_reasons(ray_session, tmp_path):
    posts = _posts()
    # A StreetArt post filed under Family (a conflict: the majority says Urban) and a typo.
    posts[5]["subcategory"], posts[5]["category"] = "StreetArt", "Family"
    posts[7]["subcategory"] = "Streetart"
    write_smpd_2024(tmp_path / "raw", posts)
    manifest = prepare_dataset(str(tmp_path / "raw"), str(tmp_path / "data"))
    rejects = {r["row_index"]: r for r in _rejects(tmp_path / "data")}
    assert set(rejects) == {5, 7}
    assert rejects[5]["field"] == "Category" and "majority parent" in rejects[5]["reason"] \
        and "'Urban'" in rejects[5]["reason"]
    assert rejects[7]["field"] == "Subcategory" and "min_class_posts" in rejects[7]["reason"]
    counts = manifest["counts"]
    assert counts["input_rows"] == POSTS == counts["written"] + counts["rejected"]
    assert "Streetart" not in {s["name"] for s in manifest["taxonomy"]["subcategories"]}


def test_an_unknown_image_folder_is_one_clear_error_and_image_root_names_it(ray_session, tmp_path, capsys):
    write_smpd_2024(tmp_path / "raw")
    (tmp_path / "raw" / "SMP_train_images").rename(tmp_path / "raw" / "photos_unpacked")
    (tmp_path / "raw" / "photos_unpacked").rename(tmp_path / "elsewhere")   # no folder holds them
    with pytest.raises(ValueError, match=r"no image listed in train_img_filepath.txt.*tried.*data.image_root"):
        prepare_dataset(str(tmp_path / "raw"), str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()
    # Named by the one config key, through the CLI (the probe would have found it too).
    (tmp_path / "elsewhere").rename(tmp_path / "raw" / "photos_unpacked")
    common = ["--config", SMOKE, "--set", "tracking.enabled=false"]
    assert main(["prepare", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "data"), *common,
                 "--set", "data.image_root=photos_unpacked"]) == EXIT_OK
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["written"] == POSTS and metrics["rejected"] == 0
    assert main(["prepare", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "data2"), *common,
                 "--set", "data.image_root=nowhere"]) == EXIT_BAD_INPUT


def test_synth_writes_the_2024_form_and_prepare_reads_it_through_the_cli(ray_session, tmp_path, capsys):
    common = ["--config", SMOKE, "--set", "tracking.enabled=false"]
    assert main(["synth", "--out", str(tmp_path / "raw"), "--posts", "30", "--test-posts", "4",
                 "--set", "synth.form=smpd2024", *common]) == EXIT_OK
    capsys.readouterr()
    raw = tmp_path / "raw"
    assert json.loads((raw / META_2024.parts[0] / "train_user_data.json").read_text())["Uid"]["0"]
    assert (raw / "SMP_train_images").is_dir() and not (raw / "train").exists()
    assert (raw / "taxonomy.json").is_file()
    assert main(["prepare", "--raw", str(raw), "--out", str(tmp_path / "data"), *common]) == EXIT_OK
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["input_rows"] == 34 and metrics["written"] == 34 and metrics["rejected"] == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["taxonomy_source"].startswith("corpus file") and len(manifest["taxonomy"]["subcategories"]) == 77
    assert manifest["forms"]["train_user_data.json"] == "columns"
    rows = _written(tmp_path / "data")
    assert any(r["user_description_text"] for r in rows) and all(r["user_description"] is None for r in rows)
