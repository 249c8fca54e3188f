"""`prepare` on bad input: every bad row is a reject, every bad file a ValueError naming it.

Each case is a copy of one tiny synthetic raw corpus with one file or one row changed. A case
expects either (a) success, with exactly the listed rejects (all at row ``ROW``: file, field and a
key word of the reason) and ``input_rows == written + rejected``; or (b) a ValueError whose
message holds the listed words (the file's name first), and then either nothing written at all
(a file-level problem, found before any work) or the rejects table with every reject and no
manifest (too many rejects: the rows are not lost, the folder is no dataset).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpp_ray.data.dataset import Dataset
from smpp_ray.data.prepare import prepare_dataset
from smpp_ray.data.schema import REJECTS_SCHEMA, SPLITS
from smpp_ray.data.synth import synthesize_corpus

POSTS, ROW = 30, 3
TEXT, CATEGORY, GEO = "train_text.json", "train_category.json", "train_temporalspatial_information.json"
ADDITIONAL, USER = "train_additional_information.json", "train_user_data.json"
LABEL, IMAGES = "train_label.txt", "train_img_filepath.txt"
ALL_JSON = (TEXT, CATEGORY, GEO, ADDITIONAL, USER)
ALL_FILES = (*ALL_JSON, LABEL, IMAGES)
#: A JSON string the edits put where raw JSON text (not expressible with json.dumps) goes.
PLACEHOLDER = "@@RAW@@"


@pytest.fixture(scope="module")
def base_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input") / "raw"
    synthesize_corpus(str(root), posts=POSTS, seed=5, image_size=16)
    return root


# ----------------------------------------------------------------------------- edits

Edit = Callable[[Path], None]


def set_json(name: str, **values) -> Edit:
    """Set fields of row ROW of a JSON file."""
    def edit(raw: Path) -> None:
        records = json.loads((raw / name).read_text())
        records[ROW].update(values)
        (raw / name).write_text(json.dumps(records))   # ensure_ascii: a lone surrogate stays "\ud800"
    return edit


def set_ids(**values) -> Edit:
    """Set Uid/Pid of row ROW in every JSON file (so the files still agree)."""
    def edit(raw: Path) -> None:
        for name in ALL_JSON:
            set_json(name, **values)(raw)
    return edit


def raw_json(name: str, key: str, text: str) -> Edit:
    """Put raw JSON ``text`` as the value of ``key`` in row ROW (deep nesting, 5,000-digit ints)."""
    def edit(raw: Path) -> None:
        set_json(name, **{key: PLACEHOLDER})(raw)
        path = raw / name
        path.write_text(path.read_text().replace(json.dumps(PLACEHOLDER), text, 1))
    return edit


def set_line(name: str, text: str) -> Edit:
    def edit(raw: Path) -> None:
        lines = (raw / name).read_text().split("\n")
        lines[ROW] = text
        (raw / name).write_text("\n".join(lines))
    return edit


def rewrite_file(name: str, transform: Callable[[str], bytes]) -> Edit:
    def edit(raw: Path) -> None:
        (raw / name).write_bytes(transform((raw / name).read_text()))
    return edit


def edit_records(name: str, transform: Callable[[list], list]) -> Edit:
    def edit(raw: Path) -> None:
        (raw / name).write_text(json.dumps(transform(json.loads((raw / name).read_text()))))
    return edit


def image_of_row(raw: Path) -> Path:
    return raw / (raw / IMAGES).read_text().split("\n")[ROW]


def replace_image(make: Callable[[Path], None]) -> Edit:
    """Replace row ROW's image file with what ``make(path)`` creates there."""
    def edit(raw: Path) -> None:
        path = image_of_row(raw)
        path.unlink()
        make(path)
    return edit


def write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def sparse_file(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with open(path, "wb") as stream:
            stream.truncate(size)   # no block is written: reading it would be the bug
    return make


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height with no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def reencode(fmt: str) -> Edit:
    """Row ROW's image re-encoded as ``fmt`` (the file name keeps its .jpg)."""
    def edit(raw: Path) -> None:
        path = image_of_row(raw)
        with Image.open(path) as image:
            image.load()
            image.save(path, format=fmt)
    return edit


def pad_image(extra: int) -> Edit:
    """Row ROW's image with ``extra`` bytes after its end (decoders ignore them; the size does not)."""
    def edit(raw: Path) -> None:
        path = image_of_row(raw)
        path.write_bytes(path.read_bytes() + b"\0" * extra)
    return edit


def every_file(edit_one: Callable[[str], Edit]) -> Edit:
    def edit(raw: Path) -> None:
        for name in ALL_FILES:
            edit_one(name)(raw)
    return edit


def empty_corpus(raw: Path) -> None:
    for name in ALL_JSON:
        (raw / name).write_text("[]")
    for name in (LABEL, IMAGES):
        (raw / name).write_text("")


DEEP = "[" * 100_000 + "]" * 100_000
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n"


# ----------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    name: str
    edit: Edit
    rejects: tuple[tuple[str, str, str], ...] = ()
    """(source file, field, key word of the reason) of each reject, all at row ROW."""
    error: tuple[str, ...] = ()
    """Words the ValueError message must hold; empty: prepare must succeed."""
    rejects_on_failure: int = 0
    """With an error: rows the rejects table must hold (0: nothing may be written at all)."""
    kwargs: dict = field(default_factory=dict)


def reject(name: str, edit: Edit, source: str, field_name: str, word: str, **kwargs) -> Case:
    return Case(name, edit, rejects=((source, field_name, word),), kwargs=kwargs)


def fails(name: str, edit: Edit, *words: str, rejects_on_failure: int = 0, **kwargs) -> Case:
    return Case(name, edit, error=words, rejects_on_failure=rejects_on_failure, kwargs=kwargs)


CASES = [
    # --- dates, numbers and ranges: each a reject of its row
    reject("postdate-zero-date", set_json(GEO, Postdate="0000-00-00 00:00:00"), GEO, "Postdate", "no date"),
    reject("postdate-before-1990", set_json(GEO, Postdate="100"), GEO, "Postdate", "plausible"),
    reject("postdate-arabic-indic-digits", set_json(GEO, Postdate="١٤٥٠٠٠٠٠٠٠"), GEO, "Postdate", "ASCII"),
    reject("photo-firstdate-1e20", set_json(USER, photo_firstdate="1e20"), USER, "photo_firstdate", "plausible"),
    reject("photo-firstdatetaken-arabic-date", set_json(USER, photo_firstdatetaken="٢٠١٥-01-01 00:00:00"),
           USER, "photo_firstdatetaken", "neither"),
    reject("photo-count-1e19", set_json(USER, photo_count="1e19"), USER, "photo_count", "outside"),
    reject("photo-count-json-float-1e19", set_json(USER, photo_count=1e19), USER, "photo_count", "outside"),
    reject("photo-count-negative", set_json(USER, photo_count="-3"), USER, "photo_count", "outside"),
    reject("label-negative-5", set_line(LABEL, "-5"), LABEL, "label", "outside"),
    reject("label-1e300", set_line(LABEL, "1e300"), LABEL, "label", "outside"),
    reject("label-underscore-1_000", set_line(LABEL, "1_000"), LABEL, "label", "ASCII"),
    reject("label-arabic-indic-digits", set_line(LABEL, "٣٫٥"), LABEL, "label", "ASCII"),
    reject("label-infinity", set_line(LABEL, "Infinity"), LABEL, "label", "ASCII"),
    reject("label-empty-line", set_line(LABEL, ""), LABEL, "label", "missing"),
    reject("latitude-95", set_json(GEO, Latitude="95", Longitude="10"), GEO, "Latitude", "outside"),
    reject("longitude-minus-181", set_json(GEO, Latitude="10", Longitude="-181"), GEO, "Longitude", "outside"),
    reject("latitude-json-nan", raw_json(GEO, "Latitude", "NaN"), GEO, "Latitude", "finite"),
    reject("timezone-offset-99-hours", set_json(USER, timezone_offset="+99:00"), USER, "timezone_offset", "outside"),
    reject("ispro-2", set_json(USER, ispro="2"), USER, "ispro", "0 or 1"),
    reject("ispublic-fraction", set_json(ADDITIONAL, Ispublic="0.5"), ADDITIONAL, "Ispublic", "integer"),
    reject("user-description-beyond-float32", set_json(USER, user_description="0.1,1e39"),
           USER, "user_description", "float32"),
    # --- ids, text and structure
    reject("pid-5000-digit-string", set_ids(Pid="7" * 5000), TEXT, "Pid", "too long"),
    reject("pid-5000-digit-json-int", raw_json(TEXT, "Pid", "7" * 5000), TEXT, "Pid", "too long"),
    reject("uid-with-tab", set_ids(Uid="12\t3@N01"), TEXT, "Uid", "whitespace"),
    reject("title-lone-surrogate", set_json(TEXT, Title="caf\ud800"), TEXT, "Title", "surrogate"),
    reject("title-is-an-object", set_json(TEXT, Title={"en": "x"}), TEXT, "Title", "not text"),
    reject("title-nested-100000-deep", raw_json(TEXT, "Title", DEEP), TEXT, "row", "nested"),
    reject("user-row-nested-100000-deep", raw_json(USER, "user_description", DEEP), USER, "row", "nested"),
    reject("user-row-is-a-scalar", edit_records(USER, lambda r: r[:ROW] + [42] + r[ROW + 1:]),
           USER, "row", "not a JSON object"),
    reject("pid-disagrees-in-category", set_json(CATEGORY, Pid="1"), CATEGORY, "Pid", "disagrees"),
    # --- class names come from the taxonomy
    reject("unknown-subcategory", set_json(CATEGORY, Subcategory="Rocket"), CATEGORY, "Subcategory",
           "not in the taxonomy"),
    reject("unknown-category", set_json(CATEGORY, Category="Space"), CATEGORY, "Category", "not in the taxonomy"),
    reject("category-contradicts-subcategory", set_json(CATEGORY, Category="Food", Subcategory="Dog"),
           CATEGORY, "Category", "parent"),
    # --- image paths and images
    reject("image-path-nul-byte", set_line(IMAGES, "train/a\0b.jpg"), IMAGES, "image_path", "control character"),
    reject("image-path-too-long", set_line(IMAGES, "train/" + "a" * 300 + ".jpg"), IMAGES, "image_path", "too long"),
    reject("image-sparse-4.5-GB", replace_image(sparse_file(4_500_000_000)), IMAGES, "image", "max_image_bytes"),
    reject("image-over-max-image-bytes", pad_image(5000), IMAGES, "image", "max_image_bytes", max_image_bytes=4000),
    reject("image-png-13000x13000-header", replace_image(write_bytes(png_header(13000, 13000))),
           IMAGES, "image", "pixels"),
    reject("image-eps", replace_image(write_bytes(EPS)), IMAGES, "image", "not a JPEG"),
    reject("image-tiff", reencode("TIFF"), IMAGES, "image", "not a JPEG"),
    reject("image-empty-file", replace_image(write_bytes(b"")), IMAGES, "image", "not a JPEG"),
    reject("image-is-a-directory", replace_image(lambda p: p.mkdir()), IMAGES, "image", "not a regular file"),
    reject("image-is-a-fifo", replace_image(lambda p: os.mkfifo(p)), IMAGES, "image", "not a regular file"),
    # --- accepted as they are
    Case("utf8-bom-in-every-file", every_file(lambda n: rewrite_file(n, lambda t: b"\xef\xbb\xbf" + t.encode()))),
    Case("crlf-line-endings", every_file(lambda n: rewrite_file(n, lambda t: t.replace("\n", "\r\n").encode()))),
    Case("png-image", reencode("PNG")),
    Case("gif-image", reencode("GIF")),
    # --- file-level problems: ValueError naming the file, nothing written
    fails("image-list-utf16", rewrite_file(IMAGES, lambda t: t.encode("utf-16")), IMAGES, "UTF-16"),
    fails("user-file-utf16-le-without-bom", rewrite_file(USER, lambda t: t.encode("utf-16-le")), USER, "UTF-16"),
    fails("text-file-latin1", rewrite_file(TEXT, lambda t: t.replace("[", "[\xe9", 1).encode("latin-1")),
          TEXT, "not UTF-8"),
    fails("user-file-of-scalars", edit_records(USER, lambda r: list(range(len(r)))), USER, "objects"),
    fails("geo-file-not-an-array", rewrite_file(GEO, lambda t: b'{"Uid": "1"}'), GEO, "JSON array"),
    fails("category-file-truncated", rewrite_file(CATEGORY, lambda t: t[: len(t) // 2].encode()),
          CATEGORY, "not valid JSON"),
    fails("label-file-one-row-short", rewrite_file(LABEL, lambda t: "\n".join(t.split("\n")[1:]).encode()),
          LABEL, f"{POSTS - 1} rows"),
    fails("missing-additional-file", lambda raw: (raw / ADDITIONAL).unlink(), ADDITIONAL, "lacks"),
    fails("empty-corpus", empty_corpus, TEXT, "no rows"),
    # --- too many rejects: ValueError with the per-field summary, the rejects kept
    fails("category-file-shifted-by-one-row", edit_records(CATEGORY, lambda r: r[:ROW] + r[ROW + 1:] + [r[ROW]]),
          CATEGORY, "Pid", "90.0%", "max_reject_fraction=0.5", rejects_on_failure=POSTS - ROW),
    fails("every-image-missing", lambda raw: shutil.rmtree(raw / "train"), IMAGES, "no image listed",
          "data.image_root"),
    fails("one-bad-label-over-max-reject-fraction-0", set_line(LABEL, "-5"), LABEL, "label",
          "max_reject_fraction=0", rejects_on_failure=1, max_reject_fraction=0.0),
]


# ----------------------------------------------------------------------------- the test

def _rejects(data: Path) -> list[dict]:
    table = pq.read_table(data / "rejects")
    assert table.schema.remove_metadata().equals(REJECTS_SCHEMA)
    return table.to_pylist()


def _check_failure(case: Case, raw: Path, data: Path) -> None:
    with pytest.raises(ValueError) as failure:
        prepare_dataset(str(raw), str(data), max_image_side=16, **case.kwargs)
    message = str(failure.value)
    assert all(word in message for word in case.error), message
    if case.rejects_on_failure == 0:
        assert not data.exists()   # a file-level problem stops the stage before any work
        return
    assert len(_rejects(data)) == case.rejects_on_failure   # nothing lost, even on failure
    assert not (data / "manifest.json").exists()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, ray_session, base_corpus, tmp_path):
    raw, data = tmp_path / "raw", tmp_path / "data"
    shutil.copytree(base_corpus, raw)
    case.edit(raw)
    if case.error:
        _check_failure(case, raw, data)
        return
    manifest = prepare_dataset(str(raw), str(data), max_image_side=16, **case.kwargs)
    counts, rejects = manifest["counts"], _rejects(data)
    assert counts["input_rows"] == POSTS == counts["written"] + counts["rejected"]
    assert counts["rejected"] == len(rejects)
    assert [(r["row_index"], r["source_file"], r["field"]) for r in rejects] == [
        (ROW, source, field_name) for source, field_name, _ in case.rejects]
    for row, (_, _, word) in zip(rejects, case.rejects, strict=True):
        assert word in row["reason"], row["reason"]
    assert sum(pq.read_table(Dataset(str(data)).posts(s)).num_rows for s in SPLITS) == counts["written"]


def test_the_table_covers_enough_cases():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
