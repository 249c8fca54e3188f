"""Reading a raw SMPD folder: file names, row alignment and per-field parsing with validation.

The folder is a location (a local path or an ``s3://`` / ``gs://`` prefix) read through
:mod:`smpp_ray.storage`; file sets hold the locations of their files.

A raw folder holds one *file set* per prefix (``train_``, and optionally ``test_``), each of seven
row-aligned files (the 2023+ names; the 2019/2020 names are accepted as aliases)::

    text             train_text.json                          (2019/2020: train_tags.json)
    category         train_category.json
    temporalspatial  train_temporalspatial_information.json   (train_temporalspatial.json)
    additional       train_additional_information.json        (train_additional.json)
    user             train_user_data.json                     (train_userdata.json)
    label            train_label.txt                          (absent for test_: unlabelled)
    img_filepath     train_img_filepath.txt                   (train_img.txt)

Bad *usage* (a missing file, a file that is not a JSON array, files of different lengths) raises
``ValueError`` naming the file before any work. Bad *rows* never raise: :func:`parse_row` returns
a reject naming the source file, row index, field and reason, and the row is dropped.

Real-file quirks handled here: every value may be a string (``"1457068974"``), Pid may be an int,
``"0"`` and ``""`` mean "no geo", ``"None"`` means absent, names may contain commas
(``"Girls,Fashion"``), the user timezone field is ``timezone_timezone_id`` (or ``timezone_id``),
``timezone_offset`` may be ``"+01:00"``, and ``photo_firstdatetaken`` may be a date string.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from smpp_ray import storage

#: File kinds in the order rows are checked; the first failing check names the reject.
FILE_KINDS = ("text", "category", "temporalspatial", "additional", "user", "label", "img_filepath")
JSON_KINDS = ("text", "category", "temporalspatial", "additional", "user")

#: Accepted names per kind, current name first; ``{p}`` is the prefix (``train_`` or ``test_``).
FILE_NAMES: dict[str, tuple[str, ...]] = {
    "text": ("{p}text.json", "{p}tags.json"),
    "category": ("{p}category.json",),
    "temporalspatial": ("{p}temporalspatial_information.json", "{p}temporalspatial.json"),
    "additional": ("{p}additional_information.json", "{p}additional.json"),
    "user": ("{p}user_data.json", "{p}userdata.json"),
    "label": ("{p}label.txt",),
    "img_filepath": ("{p}img_filepath.txt", "{p}img.txt"),
}
PREFIXES = ("train_", "test_")

#: Postdates outside [1990, 2100) are corrupt, not old or future posts.
_MIN_TIMESTAMP, _MAX_TIMESTAMP = 631152000, 4102444800
_ABSENT = {"", "none", "null", "nan"}
_TZ_OFFSET = re.compile(r"^([+-])?(\d{1,2}):(\d{2})$")


class FieldError(Exception):
    """A bad value in one field of one row; becomes a reject row, never escapes parse_row."""

    def __init__(self, source_file: str, field_name: str, reason: str) -> None:
        super().__init__(f"{source_file}: {field_name}: {reason}")
        self.source_file, self.field, self.reason = source_file, field_name, reason


@dataclass
class FileSet:
    """The files (locations) of one prefix, with their rows loaded (JSON records or text lines)."""

    prefix: str
    files: dict[str, str]
    rows: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return "label" in self.files

    @property
    def num_rows(self) -> int:
        return len(self.rows["text"]) if self.rows else 0

    def name(self, kind: str) -> str:
        return storage.name(self.files[kind])


def find_file_set(raw_dir: str, prefix: str) -> FileSet | None:
    """The files of ``prefix`` in the folder ``raw_dir`` (a location); None when none of them exist.

    Raises ValueError naming every required file that is missing once any file of the set
    exists. The label file is optional for ``test_``.
    """
    # One listing rather than a probe per candidate name: a probe is a request on object storage.
    present = {storage.name(f) for f in storage.list_files(raw_dir, recursive=False)}
    found: dict[str, str] = {}
    missing: list[str] = []
    for kind, patterns in FILE_NAMES.items():
        names = [p.format(p=prefix) for p in patterns]
        hit = next((n for n in names if n in present), None)
        if hit is not None:
            found[kind] = storage.join(raw_dir, hit)
        elif not (kind == "label" and prefix == "test_"):
            missing.append(" or ".join(names))
    if not found:  # a folder may hold train_ files, test_ files or both (new posts to score)
        return None
    if missing:
        raise ValueError(f"raw SMPD folder {str(raw_dir)!r} lacks required file(s): {'; '.join(missing)}")
    return FileSet(prefix, found)


def load_file_set(file_set: FileSet) -> FileSet:
    """Read every file of the set; raise ValueError naming a malformed file or a length mismatch."""
    for kind, location in file_set.files.items():
        if kind in JSON_KINDS:
            try:
                rows = json.loads(storage.read_text(location))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{location!r} is not valid JSON: {err}") from err
            if not isinstance(rows, list):
                raise ValueError(f"{location!r} must hold a JSON array of records, got {type(rows).__name__}")
        else:
            try:
                lines = storage.read_text(location).splitlines()
            except UnicodeDecodeError as err:
                raise ValueError(f"{location!r} is not UTF-8 text: {err}") from err
            while lines and not lines[-1].strip():   # a trailing newline is not a row
                lines.pop()
            rows = lines
        file_set.rows[kind] = rows
    lengths = {file_set.name(k): len(v) for k, v in file_set.rows.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{n}: {c} rows" for n, c in lengths.items())
        raise ValueError(f"SMPD files must have the same number of rows (they align by position); got {detail}")
    return file_set


# ---------------------------------------------------------------------------------------------
# Scalar parsers: each returns the parsed value or None for "absent", raising FieldError on junk.

def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _ABSENT)


def _get(record: dict, source: str, *keys: str) -> Any:
    """The first of ``keys`` present in ``record`` (case-insensitive); FieldError when none is."""
    for key in keys:
        if key in record:
            return record[key]
    lowered = {str(k).lower(): v for k, v in record.items()}
    for key in keys:
        if key.lower() in lowered:
            return lowered[key.lower()]
    raise FieldError(source, keys[0], "missing field")


def parse_id(value: Any, source: str, name: str) -> str:
    """An id (Uid/Pid) as a string; JSON ints and integral floats are accepted."""
    if isinstance(value, bool) or _absent(value):
        raise FieldError(source, name, f"missing or empty {name} {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise FieldError(source, name, f"{name} {value!r} is not an id")
        value = int(value)
    text = str(value).strip()
    if any(c.isspace() for c in text) or "/" in text:
        raise FieldError(source, name, f"{name} {value!r} contains whitespace or '/'")
    return text


def parse_int(value: Any, source: str, name: str, *, optional: bool = True,
              low: float = -math.inf, high: float = math.inf) -> int | None:
    number = parse_float(value, source, name, optional=optional, low=low, high=high)
    if number is None:
        return None
    if not number.is_integer():
        raise FieldError(source, name, f"{name} {value!r} is not an integer")
    return int(number)


def parse_float(value: Any, source: str, name: str, *, optional: bool = True,
                low: float = -math.inf, high: float = math.inf) -> float | None:
    if _absent(value):
        if optional:
            return None
        raise FieldError(source, name, f"missing {name}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FieldError(source, name, f"{name} {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise FieldError(source, name, f"{name} {value!r} is not a finite number")
    if not low <= number <= high:
        raise FieldError(source, name, f"{name} {value!r} outside [{low}, {high}]")
    return number


def parse_flag(value: Any, source: str, name: str) -> int | None:
    number = parse_int(value, source, name)
    if number not in (None, 0, 1):
        raise FieldError(source, name, f"{name} {value!r} is not 0 or 1")
    return number


def parse_text(value: Any, source: str, name: str, *, empty_as_none: bool = False) -> str | None:
    if value is None:
        return None if empty_as_none else ""
    if isinstance(value, (dict, list)):
        raise FieldError(source, name, f"{name} is a {type(value).__name__}, not text")
    text = str(value).strip()
    if empty_as_none and _absent(text):
        return None
    return text


def parse_timestamp(value: Any, source: str, name: str, *, optional: bool = True) -> int | None:
    """Unix seconds from digits or from a ``YYYY-mm-dd HH:MM:SS`` date (read as UTC)."""
    if isinstance(value, str) and "-" in value.strip()[1:]:
        text = value.strip()
        if text.startswith("0000-00-00"):
            return None
        try:
            return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))
        except ValueError:
            raise FieldError(source, name, f"{name} {value!r} is neither unix seconds nor a date") from None
    return parse_int(value, source, name, optional=optional)


def parse_timezone_offset(value: Any, source: str) -> float | None:
    """Hours east of UTC from ``"8"``, ``"5.5"`` or ``"+05:30"``."""
    if isinstance(value, str) and (match := _TZ_OFFSET.match(value.strip())):
        sign = -1.0 if match.group(1) == "-" else 1.0
        return sign * (int(match.group(2)) + int(match.group(3)) / 60)
    return parse_float(value, source, "timezone_offset", low=-14, high=14)


def parse_float_list(value: Any, source: str, name: str) -> list[float] | None:
    """Comma-separated floats (``"0.08,-0.07,..."``) or a JSON list of numbers."""
    if _absent(value):
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    out: list[float] = []
    for position, item in enumerate(items):
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise FieldError(source, name, f"{name} item {position} {item!r} is not a number") from None
        if not math.isfinite(number):
            raise FieldError(source, name, f"{name} item {position} {item!r} is not finite")
        out.append(number)
    return out


def parse_geo(record: dict, source: str) -> tuple[float | None, float | None, float | None]:
    """(latitude, longitude, geoaccuracy); all None for "no geo" ("0"/""/"None" coordinates)."""
    lat = parse_float(_get(record, source, "Latitude"), source, "Latitude", low=-90, high=90)
    lon = parse_float(record.get("Longitude"), source, "Longitude", low=-180, high=180)
    accuracy = parse_float(record.get("Geoaccuracy"), source, "Geoaccuracy", low=0, high=16)
    if lat is None or lon is None or (lat == 0 and lon == 0):
        return None, None, None
    return lat, lon, accuracy or None


def parse_image_path(value: Any, source: str) -> str:
    """A relative image path inside the raw folder; absolute paths, URLs and ``..`` are rejected."""
    text = str(value).strip().strip('"').strip() if value is not None else ""
    if not text:
        raise FieldError(source, "image_path", "empty image path")
    posix = text.replace("\\", "/")
    if "://" in posix or posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise FieldError(source, "image_path", f"image path {text!r} is absolute; it must be relative to the raw folder")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FieldError(source, "image_path", f"image path {text!r} escapes the raw folder ('..')")
    return "/".join(parts)


# ---------------------------------------------------------------------------------------------

def _check_ids(record: Any, source: str, uid: str | None, pid: str | None, reference: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise FieldError(source, "row", f"row is a {type(record).__name__}, not a JSON object")
    row_uid = parse_id(_get(record, source, "Uid"), source, "Uid")
    row_pid = parse_id(_get(record, source, "Pid"), source, "Pid")
    if pid is not None and row_pid != pid:
        raise FieldError(source, "Pid", f"Pid {row_pid!r} disagrees with Pid {pid!r} in {reference} at this row")
    if uid is not None and row_uid != uid:
        raise FieldError(source, "Uid", f"Uid {row_uid!r} disagrees with Uid {uid!r} in {reference} at this row")
    return row_uid, row_pid


def parse_row(file_set: FileSet, index: int) -> tuple[dict | None, dict | None]:
    """One aligned row as a post record (names, no ids) or a reject; exactly one is not None."""
    uid = pid = None
    try:
        return _parse_row(file_set, index), None
    except FieldError as err:
        text = file_set.rows["text"][index]
        if isinstance(text, dict):
            uid, pid = text.get("Uid"), text.get("Pid")
        return None, {
            "source_file": err.source_file, "row_index": index,
            "pid": None if pid is None else str(pid), "uid": None if uid is None else str(uid),
            "field": err.field, "reason": err.reason,
        }


def _parse_row(fs: FileSet, i: int) -> dict:
    names = {k: fs.name(k) for k in fs.files}
    text, cat, ts, add, user = (fs.rows[k][i] for k in JSON_KINDS)
    uid, pid = _check_ids(text, names["text"], None, None, names["text"])
    for kind, record in (("category", cat), ("temporalspatial", ts), ("additional", add), ("user", user)):
        _check_ids(record, names[kind], uid, pid, names["text"])
    out: dict[str, Any] = {"pid": pid, "uid": uid, "row_index": i}
    src = names["text"]
    out["title"] = parse_text(_get(text, src, "Title"), src, "Title")
    out["tags"] = parse_text(_get(text, src, "Alltags"), src, "Alltags")
    out["mediatype"] = parse_text(text.get("Mediatype"), src, "Mediatype", empty_as_none=True)
    src = names["category"]
    required = fs.labelled   # unlabelled test posts may come without classes
    for key in ("Category", "Subcategory"):
        value = parse_text(_get(cat, src, key) if required else cat.get(key), src, key, empty_as_none=True)
        if value is None and required:
            raise FieldError(src, key, f"empty {key}")
        out[key.lower()] = value
    out["concept"] = parse_text(cat.get("Concept"), src, "Concept", empty_as_none=True)
    src = names["temporalspatial"]
    out["postdate"] = parse_timestamp(_get(ts, src, "Postdate"), src, "Postdate", optional=False)
    if not _MIN_TIMESTAMP <= out["postdate"] < _MAX_TIMESTAMP:
        raise FieldError(src, "Postdate", f"Postdate {ts.get('Postdate')!r} is not a plausible unix time")
    out["latitude"], out["longitude"], out["geoaccuracy"] = parse_geo(ts, src)
    src = names["additional"]
    out["ispublic"] = parse_flag(add.get("Ispublic"), src, "Ispublic")
    out["pathalias"] = parse_text(add.get("Pathalias"), src, "Pathalias", empty_as_none=True)
    src = names["user"]
    out["photo_firstdate"] = parse_timestamp(user.get("photo_firstdate"), src, "photo_firstdate")
    out["photo_firstdatetaken"] = parse_timestamp(user.get("photo_firstdatetaken"), src, "photo_firstdatetaken")
    out["photo_count"] = parse_int(user.get("photo_count"), src, "photo_count", low=0)
    out["ispro"] = parse_flag(user.get("ispro"), src, "ispro")
    out["canbuypro"] = parse_flag(user.get("canbuypro"), src, "canbuypro")
    out["timezone_offset"] = parse_timezone_offset(user.get("timezone_offset"), src)
    tz_id = user.get("timezone_timezone_id", user.get("timezone_id"))
    out["timezone_id"] = parse_text(tz_id, src, "timezone_timezone_id", empty_as_none=True)
    out["user_description"] = parse_float_list(user.get("user_description"), src, "user_description")
    out["location_description"] = parse_text(user.get("location_description"), src, "location_description",
                                              empty_as_none=True)
    out["label"] = None
    if fs.labelled:
        out["label"] = parse_float(fs.rows["label"][i].strip().strip('"'), names["label"], "label", optional=False)
    out["image_path"] = parse_image_path(fs.rows["img_filepath"][i], names["img_filepath"])
    return out
