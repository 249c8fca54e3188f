"""A corpus that is not SMPD's seven files: posts as Parquet or JSON Lines rows (``data.format:
table``), its own column names mapped to roles, local and on the S3 test server, read and
validated by Ray Data tasks. Counts in = written + rejected, each reject naming file, row, field."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpp_ray.cli import EXIT_OK, main
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.prepare import prepare_dataset
from smpp_ray.data.schema import SPLITS
from smpp_ray.data.table import column_mapping

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "configs" / "smoke.yaml")
COLUMNS = ("pid=post_id", "uid=author", "postdate=created", "label=log_views", "category=topic",
           "subcategory=subtopic", "title=caption", "tags=hashtags", "image_path=photo", "image=photo_bytes",
           "photo_count=author_posts")
TOPICS = [("Food", "Ramen"), ("Food", "Tacos"), ("Pets", "Corgi"), ("Pets", "Parrot")]
ROWS = 32


def _jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (36, 24), (i * 7 % 255, 90, i * 13 % 255)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _rows() -> list[dict]:
    rows = []
    for i in range(ROWS):
        topic, subtopic = TOPICS[i % len(TOPICS)]
        rows.append({"post_id": f"p{1000 + i}", "author": f"u{i % 5}",
                     "created": f"2021-0{1 + i % 9}-1{i % 10} 12:00:00", "log_views": round(2 + (i % 7) * 0.4, 3),
                     "topic": topic, "subtopic": subtopic, "caption": f"post {i}", "hashtags": "food yum" if i % 2 else "",
                     "author_posts": 10 + i, "photo": f"images/{i}.jpg", "followers": 100.0 + i})
    rows[-2]["log_views"] = rows[-1]["log_views"] = None   # unlabelled: test posts
    return rows


def _break(rows: list[dict]) -> dict[int, str]:
    """Three bad rows; returns row -> the field its reject names."""
    rows[3]["created"] = "yesterday"
    rows[7]["post_id"] = rows[6]["post_id"]          # a duplicate Pid
    rows[11]["photo"] = "images/missing.jpg"
    return {3: "created", 7: "Pid", 11: "image"}


def _written(data: str) -> list[dict]:
    rows = []
    for split in SPLITS:
        fs, path = pafs.FileSystem.from_uri(Dataset(data).posts(split)) if data.startswith("s3://") \
            else (pafs.LocalFileSystem(), Dataset(data).posts(split))
        rows += pq.read_table(path, filesystem=fs).drop_columns(["image"]).to_pylist()
    return rows


def _rejects(data: str) -> dict[int, dict]:
    fs, path = pafs.FileSystem.from_uri(f"{data}/rejects") if data.startswith("s3://") \
        else (pafs.LocalFileSystem(), f"{data}/rejects")
    return {r["row_index"]: r for r in pq.read_table(path, filesystem=fs).to_pylist()}


def _check(manifest: dict, data: str, broken: dict[int, str], source: str) -> None:
    counts = manifest["counts"]
    assert counts["input_rows"] == ROWS == counts["written"] + counts["rejected"]
    rejects = _rejects(data)
    assert {i: r["field"] for i, r in rejects.items()} == broken
    assert all(r["source_file"] == source for r in rejects.values())
    written = _written(data)
    assert len(written) == counts["written"] and len({r["pid"] for r in written}) == len(written)
    assert manifest["format"] == "table" and manifest["taxonomy_source"] == "inferred from the training rows"
    assert {s["name"] for s in manifest["taxonomy"]["subcategories"]} == {s for _, s in TOPICS}
    assert sum(r["label"] is None for r in written) == 2 and manifest["split"]["unlabelled_test_rows"] == 2
    by_pid = {r["pid"]: r for r in written}
    assert by_pid["p1004"]["postdate"] == 1_620_993_600 and by_pid["p1004"]["photo_count"] == 14
    assert by_pid["p1004"]["category"] == "Food" and by_pid["p1004"]["subcategory"] == "Ramen"


def test_column_mapping_names_roles_and_refuses_unknown_ones():
    assert column_mapping(("pid=post_id",))["pid"] == "post_id"
    assert column_mapping(())["label"] == "label"
    with pytest.raises(ValueError, match="role=column"):
        column_mapping(("views=log_views",))


def test_a_parquet_corpus_with_image_bytes_in_row_groups(ray_session, tmp_path):
    rows = _rows()
    broken = _break(rows)
    rows[11]["photo_bytes"] = b"not a jpeg"   # bytes win over the path: an undecodable image
    for i, row in enumerate(rows):
        row.setdefault("photo_bytes", _jpeg(i))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "posts.parquet", row_group_size=8)   # 4 pieces
    manifest = prepare_dataset(str(tmp_path / "posts.parquet"), str(tmp_path / "data"), data_format="table",
                               columns=COLUMNS, val_fraction=0.2, test_fraction=0.2)
    _check(manifest, str(tmp_path / "data"), broken, "posts.parquet")
    assert "is not a JPEG" in _rejects(str(tmp_path / "data"))[11]["reason"]


def test_a_jsonl_corpus_through_the_cli(ray_session, tmp_path, capsys):
    rows = _rows()
    broken = _break(rows)
    folder = tmp_path / "corpus"
    (folder / "images").mkdir(parents=True)
    for i in range(ROWS):
        (folder / "images" / f"{i}.jpg").write_bytes(_jpeg(i))
    rows[13]["followers"] = "many"   # an extra numeric column's bad value: a reject naming the column
    broken[13] = "followers"
    del rows[14]["followers"]        # absent: missing, not a reject
    lines = [json.dumps(r) for r in rows]
    lines[20] = lines[20][:-5]   # a line cut short: that row only
    broken[20] = "row"
    (folder / "posts.jsonl").write_text("\n".join(lines) + "\n")
    columns = "[" + ", ".join(COLUMNS) + "]"
    assert main(["prepare", "--raw", str(folder), "--out", str(tmp_path / "data"), "--config", SMOKE,
                 "--set", "tracking.enabled=false", "--set", "data.format=table", "--set", f"data.columns={columns}",
                 "--set", "data.val_fraction=0.2", "--set", "data.test_fraction=0.2",
                 "--set", "data.extra_columns=[followers]"]) == EXIT_OK
    capsys.readouterr()
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    _check(manifest, str(tmp_path / "data"), broken, "posts.jsonl")
    assert "not valid JSON" in _rejects(str(tmp_path / "data"))[20]["reason"]
    assert "'many' is not a number" in _rejects(str(tmp_path / "data"))[13]["reason"]
    assert manifest["extra_columns"] == ["followers"]
    extra = {r["pid"]: r["extra"] for r in _written(str(tmp_path / "data"))}
    assert extra["p1004"] == [104.0] and extra["p1014"] == [None]
    assert all(len(values) == 1 for values in extra.values())


def test_extra_columns_must_name_columns_of_the_corpus(ray_session, tmp_path, capsys):
    """A misspelt extra column would be a feature missing everywhere: exit 2 naming it. An SMPD
    corpus has fixed fields, so the key is refused for it before any work."""
    rows = _rows()
    for i, row in enumerate(rows):
        row["photo_bytes"] = _jpeg(i)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "posts.parquet")
    with pytest.raises(ValueError, match=r"\['folowers'\] hold no value"):
        prepare_dataset(str(tmp_path / "posts.parquet"), str(tmp_path / "data"), data_format="table",
                        columns=COLUMNS, extra_columns=("followers", "folowers"))
    assert not (tmp_path / "data" / "manifest.json").exists()
    assert main(["prepare", "--raw", str(tmp_path), "--out", str(tmp_path / "smpd"), "--config", SMOKE,
                 "--set", "tracking.enabled=false", "--set", "data.extra_columns=[followers]"]) == 2
    assert "needs data.format: table" in capsys.readouterr().err


def test_a_jsonl_corpus_in_a_bucket(ray_with_s3, s3_bucket):
    rows = _rows()
    broken = _break(rows)
    fs, _ = pafs.FileSystem.from_uri(s3_bucket)
    root = s3_bucket.removeprefix("s3://")
    for i in range(ROWS):
        with fs.open_output_stream(f"{root}/corpus/images/{i}.jpg") as out:
            out.write(_jpeg(i))
    half = ROWS // 2   # two files: two pieces read in parallel; row numbers are per file
    for name, part in (("a.jsonl", rows[:half]), ("b.jsonl", rows[half:])):
        with fs.open_output_stream(f"{root}/corpus/{name}") as out:
            out.write(("\n".join(json.dumps(r) for r in part) + "\n").encode())
    manifest = prepare_dataset(f"{s3_bucket}/corpus", f"{s3_bucket}/data", data_format="table", columns=COLUMNS,
                               val_fraction=0.2, test_fraction=0.2)
    counts = manifest["counts"]
    assert counts["input_rows"] == ROWS == counts["written"] + counts["rejected"] == counts["written"] + len(broken)
    rejects = pq.read_table(f"{root}/data/rejects", filesystem=fs).to_pylist()
    assert sorted((r["source_file"], r["row_index"], r["field"]) for r in rejects) == \
        [("a.jsonl", 3, "created"), ("a.jsonl", 7, "Pid"), ("a.jsonl", 11, "image")]
