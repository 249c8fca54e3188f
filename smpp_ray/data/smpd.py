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

Bad *files* raise ``ValueError`` naming the file before any work: a missing file, one that is
not UTF-8 (a UTF-8 BOM is accepted in every file), not JSON, not a JSON array, an array with no
JSON object at all, or files of different lengths. Bad *rows* never raise: :func:`parse_row`
returns a reject naming the source file, row index, field and reason, and the row is dropped.

Values are checked strictly, because a silently accepted bad value is worse than a reject: numbers
are plain ASCII decimal syntax (no ``1_000``, no Arabic-Indic digits, no ``Infinity``), within
plausible ranges (labels, dates, counts, geo), text is valid Unicode (no lone surrogates), ids are
short printable tokens, image paths hold no control characters, and a row nested too deeply for
the JSON parser is a reject of that row only.

Real-file quirks handled here: every value may be a string (``"1457068974"``), Pid may be an int,
``"0"`` and ``""`` mean "no geo", ``"None"`` means absent, names may contain commas
(``"Girls,Fashion"``), the user timezone field is ``timezone_timezone_id`` (or ``timezone_id``),
``timezone_offset`` may be ``"+01:00"``, and ``photo_firstdatetaken`` may be a date string
(``"0000-00-00 00:00:00"``, Flickr's "unknown", is absent).
"""

from __future__ import annotations

import calendar
import codecs
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from smpp_ray import storage

logger = logging.getLogger(__name__)

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

#: Postdates and upload dates outside [1990, 2100) are corrupt, not old or future posts.
_MIN_TIMESTAMP, _MAX_TIMESTAMP = 631152000, 4102444800
#: A photo may have been *taken* long before upload (scans), but not before 1800.
_MIN_TAKEN = -5364662400
#: Popularity labels are log-view scores (SMPD's lie in about 0..20; 30 would be 2^30 views a
#: day). The lower bound leaves room for the synthetic corpus's Gaussian tail (about -2.5 at
#: SMPD's size) while rejecting sign errors such as -5.
LABEL_RANGE = (-4.0, 30.0)
#: No Flickr account holds a billion photos; a bigger count is corrupt (and overflows int64 later).
MAX_PHOTO_COUNT = 1_000_000_000
#: float32 is what user_description is stored as; a bigger magnitude would become inf.
_FLOAT32_MAX = 3.4e38
#: SMPD ids are short tokens (``"59@N75"``, ``"775"``); a longer one is corrupt, not an id.
_MAX_ID_CHARS = 64
#: Longer paths (or components) fail in the OS with ENAMETOOLONG inside the image tasks.
_MAX_PATH_CHARS, _MAX_PATH_PART_BYTES = 1024, 255
#: JSON integers longer than this stay strings: Python refuses to convert a 4,300+ digit integer
#: (ValueError for the whole file), and no valid value has more than 20 digits anyway.
_MAX_JSON_INT_DIGITS = 20
#: A text file with this share of NUL bytes in its first 4 KiB is UTF-16/32, not UTF-8.
_NUL_SHARE = 0.25

_ABSENT = {"", "none", "null", "nan"}
# [0-9], never \d: in Python \d also matches Arabic-Indic and other Unicode digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_TZ_OFFSET = re.compile(r"([+-])?([0-9]{1,2}):([0-9]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Strings and the structural characters of JSON, for splitting an array without recursion.
JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},]')
_SHOW_CHARS = 60


class FieldError(Exception):
    """A bad value in one field of one row; becomes a reject row, never escapes parse_row."""

    def __init__(self, source_file: str, field_name: str, reason: str) -> None:
        super().__init__(f"{source_file}: {field_name}: {reason}")
        self.source_file, self.field, self.reason = source_file, field_name, reason


@dataclass(frozen=True)
class Unparsable:
    """A JSON row the parser cannot build (nested too deeply); parse_row turns it into a reject."""

    reason: str


@dataclass
class FileSet:
    """The files (locations) of one prefix, with their rows loaded (JSON records or text lines)."""

    prefix: str
    files: dict[str, str]
    rows: dict[str, list[Any]] = field(default_factory=dict)
    forms: dict[str, str] = field(default_factory=dict)
    """JSON kind -> ``records`` (an array, the 2019-2023 form) or ``columns`` (a pandas column
    dict, the user file's 2024+ form)."""
    first_row: int = 0
    """The file row of ``rows[...][0]``: a range of rows is loaded at a time (see
    :mod:`smpp_ray.data.smpd_rows`), and rows and rejects name the row of the file."""

    @property
    def labelled(self) -> bool:
        return "label" in self.files

    @property
    def num_rows(self) -> int:
        return len(self.rows["text"]) if self.rows else 0

    def name(self, kind: str) -> str:
        return storage.name(self.files[kind])


#: How deep below the raw folder metadata files are looked for: archives unpack one folder
#: deeper, sometimes two (``train_allmetadata_json/train_allmetadata_json/train_text.json``).
METADATA_SEARCH_DEPTH = 2
#: Folders with more entries than this hold images (one folder per user), never metadata files.
_MAX_ENTRIES_TO_DESCEND = 64


class FolderSearch:
    """The raw folder and the folders below it, listed lazily and once each (a listing is a
    request on object storage), breadth first: the raw folder itself, then its sub-folders in
    name order, then theirs."""

    def __init__(self, raw_dir: str, depth: int = METADATA_SEARCH_DEPTH) -> None:
        self.raw_dir, self.depth = raw_dir, depth
        self._names: dict[str, set[str]] = {}
        self._subfolders: dict[str, list[str]] = {}
        self.listed: list[str] = []

    def names(self, folder: str) -> set[str]:
        if folder not in self._names:
            self._names[folder] = set(storage.list_names(folder))
            self.listed.append(folder)
        return self._names[folder]

    def folders(self) -> Iterator[str]:
        level = [self.raw_dir]
        for depth in range(self.depth + 1):
            yield from level
            if depth == self.depth:
                return
            # A folder of many entries is an image folder (one folder per user): not descended.
            level = [sub for f in level if len(self.names(f)) <= _MAX_ENTRIES_TO_DESCEND for sub in self._below(f)]

    def _below(self, folder: str) -> list[str]:
        if folder not in self._subfolders:
            self._subfolders[folder] = [storage.join(folder, d) for d in storage.list_folders(folder)]
        return self._subfolders[folder]

    def find(self, candidates: list[str]) -> str | None:
        """The location of the first of ``candidates`` (file names) in the shallowest folder."""
        for folder in self.folders():
            hit = next((n for n in candidates if n in self.names(folder)), None)
            if hit is not None:
                return storage.join(folder, hit)
        return None


def find_file_set(raw_dir: str, prefix: str, search: FolderSearch | None = None) -> FileSet | None:
    """The files of ``prefix`` in the folder ``raw_dir`` (a location) or up to two folders below
    it (each file where it is found first); None when none of them exist.

    Raises ValueError naming every required file that is missing, and the folders searched, once
    any file of the set exists. The label file is optional for ``test_``.
    """
    # Breadth first, the raw folder's own listing first: when every file is there, nothing below
    # is listed (an image folder of 70,000 user folders is one expensive listing on object storage).
    search = search or FolderSearch(raw_dir)
    found: dict[str, str] = {}
    missing: list[str] = []
    for kind, patterns in FILE_NAMES.items():
        names = [p.format(p=prefix) for p in patterns]
        location = search.find(names)
        if location is not None:
            found[kind] = location
        elif not (kind == "label" and prefix == "test_"):
            missing.append(" or ".join(names))
    if not found:  # a folder may hold train_ files, test_ files or both (new posts to score)
        return None
    if missing:
        searched = ", ".join(repr(f) for f in search.listed[:12]) + (" ..." if len(search.listed) > 12 else "")
        raise ValueError(f"raw SMPD folder {str(raw_dir)!r} lacks required file(s): {'; '.join(missing)} "
                         f"(searched {searched})")
    return FileSet(prefix, found)


def load_file_set(file_set: FileSet) -> FileSet:
    """Read every file of the set; raise ValueError naming a malformed file or a length mismatch."""
    for kind, location in file_set.files.items():
        if kind in JSON_KINDS:
            file_set.rows[kind], file_set.forms[kind] = load_json_file(location)
        else:
            file_set.rows[kind] = load_lines(location)
    lengths = {file_set.name(k): len(v) for k, v in file_set.rows.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{n}: {c} rows" for n, c in lengths.items())
        raise ValueError(f"SMPD files must have the same number of rows (they align by position); got {detail}")
    return file_set


# ---------------------------------------------------------------------------------------------
# Files: decoding, JSON arrays, text lines. Every failure here is file-level and names the file.

def read_text(location: str) -> str:
    """A file's text: UTF-8 with or without a BOM; ValueError naming the file otherwise."""
    return decode_text(storage.read_bytes(location), location)


def _refuse_wide_text(data: bytes, location: str) -> None:
    sample = data[:4096]
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")) or sample.count(0) > _NUL_SHARE * len(sample):
        raise ValueError(f"{location!r} looks like UTF-16 or UTF-32 text; SMPD files must be UTF-8")


def check_utf8(data: bytes, location: str) -> int:
    """The length of ``data``'s BOM (0 or 3) when it is UTF-8 text; ValueError naming ``location``
    otherwise. Checked a MiB at a time: the decoded text of a file is never held (a Python string
    with one emoji takes 4 bytes per character)."""
    _refuse_wide_text(data, location)
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    step = 1 << 20
    for start in range(0, len(data), step):
        try:
            decoder.decode(data[start:start + step], final=start + step >= len(data))
        except UnicodeDecodeError as err:
            raise ValueError(f"{location!r} is not UTF-8 text: {err.reason} at byte {start + err.start}") from err
    return len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0


def decode_text(data: bytes, location: str) -> str:
    """The text of a file's bytes (UTF-8, a BOM allowed); ValueError naming ``location`` otherwise."""
    _refuse_wide_text(data, location)
    try:
        return data.decode("utf-8-sig")   # -sig: editors on Windows write a BOM
    except UnicodeDecodeError as err:
        raise ValueError(f"{location!r} is not UTF-8 text: {err}") from err


def load_lines(location: str) -> list[str]:
    """The lines of a text file, ``\\r\\n`` or ``\\n`` endings; a trailing blank line is not a row."""
    # split("\n"), not splitlines(): that also splits at \x0c, \x1c, \u2028 ..., which would shift
    # every later row of the file against the JSON files.
    lines = [line.removesuffix("\r") for line in read_text(location).split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _json_int(digits: str) -> int | str:
    return int(digits) if len(digits) <= _MAX_JSON_INT_DIGITS else digits


def _loads(text: str) -> Any:
    return json.loads(text, parse_int=_json_int)


def json_decoder() -> json.JSONDecoder:
    """The decoder of every SMPD JSON value (over-long integers stay text, see ``_json_int``)."""
    return json.JSONDecoder(parse_int=_json_int)


def load_row(data: bytes | str) -> Any:
    """One row's JSON value, or :class:`Unparsable` when it is nested too deeply to parse."""
    try:
        return json.loads(data, parse_int=_json_int)
    except RecursionError:
        return Unparsable("row is nested deeper than the JSON parser allows")


def load_json_file(location: str) -> tuple[list[Any], str]:
    """The rows of a JSON file and its form: ``records`` (an array) or ``columns`` (a dict of
    columns, what ``DataFrame.to_json()`` writes: the user file's 2024+ form)."""
    return parse_json_document(read_text(location), location)


def parse_json_document(text: str, location: str) -> tuple[list[Any], str]:
    """:func:`load_json_file` of a file's text (``location`` names it in errors)."""
    try:
        rows = _loads(text)
    except RecursionError:   # one deep row must not cost the whole file: parse row by row
        rows = _load_rows_one_by_one(text, location)
    except json.JSONDecodeError as err:
        raise ValueError(f"{location!r} is not valid JSON: {err}") from err
    form = "columns" if isinstance(rows, dict) else "records"
    if isinstance(rows, dict):
        rows = _columns_to_records(rows, location)
    if not isinstance(rows, list):
        raise ValueError(f"{location!r} must hold a JSON array of records or a dict of columns, "
                         f"got {type(rows).__name__}")
    if rows and not any(isinstance(r, dict) for r in rows):
        raise ValueError(f"{location!r} must hold a JSON array of records (objects), but its rows are "
                         f"{type(rows[0]).__name__}s")
    return rows, form


def row_order(key: Any) -> tuple[int, int | str]:
    """Row keys of a column dict in row order: ``"10"`` after ``"9"`` (pandas writes index labels)."""
    text = str(key)
    return (0, int(text)) if text.isdigit() and len(text) <= _MAX_JSON_INT_DIGITS else (1, text)


def _columns_to_records(columns: dict, location: str) -> list[dict]:
    """The records of a pandas column dict (``DataFrame.to_json()``'s default form: ``{"Uid":
    {"0": "27882@N8", ...}, "Pid": {"0": 194355, ...}}``), which the SMP Challenge uses for its
    user file since 2024. Rows follow the index labels in numeric order; a label missing from one
    column is a null there."""
    bad = next((name for name, values in columns.items() if not isinstance(values, dict)), None)
    if bad is not None or not columns:
        raise ValueError(f"{location!r} must hold a JSON array of records or a dict of columns "
                         "(column -> {row: value}); got an object "
                         + (f"whose {str(bad)[:60]!r} is a {type(columns[bad]).__name__}" if bad is not None
                            else "with no column"))
    labels: dict[Any, None] = {}
    for values in columns.values():
        labels.update(dict.fromkeys(values))
    order = sorted(labels, key=row_order)
    return [{name: values.get(label) for name, values in columns.items()} for label in order]


def _load_rows_one_by_one(text: str, location: str) -> list[Any]:
    rows: list[Any] = []
    for position, element in enumerate(_split_array(text, location)):
        try:
            rows.append(_loads(element))
        except RecursionError:
            rows.append(Unparsable("row is nested deeper than the JSON parser allows"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{location!r} is not valid JSON at row {position}: {err}") from err
    return rows


def _split_array(text: str, location: str) -> list[str]:
    """The texts of a top-level JSON array's elements, found by an iterative bracket count."""
    body = text.strip()
    if not body.startswith("["):
        raise ValueError(f"{location!r} must hold a JSON array of records")
    elements: list[str] = []
    depth, begin, end = 0, 1, -1
    for match in JSON_TOKEN.finditer(body):
        token = match.group()
        if token[0] == '"':
            continue
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                end = match.start()
                break
        elif depth == 1:   # a comma between two rows
            elements.append(body[begin:match.start()])
            begin = match.end()
    if end < 0 or body[end + 1:].strip():
        raise ValueError(f"{location!r} is not valid JSON: the top-level array is not closed once at the end")
    if elements or body[begin:end].strip():
        elements.append(body[begin:end])
    return elements


# ---------------------------------------------------------------------------------------------
# Scalar parsers: each returns the parsed value or None for "absent", raising FieldError on junk.

def _show(value: Any) -> str:
    """``repr`` of a value for a reject reason, cut short (a 5,000-digit Pid is not a reason)."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else f"{text[:_SHOW_CHARS - 3]}... ({len(str(value))} characters)"


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


def _check_unicode(text: str, source: str, name: str) -> str:
    """``text`` when it encodes as UTF-8; a lone surrogate (``\\ud800``) would fail every writer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FieldError(source, name, f"{name} {_show(text)} holds a lone surrogate (not valid Unicode)") from None
    return text


def parse_id(value: Any, source: str, name: str) -> str:
    """An id (Uid/Pid) as a string; JSON ints and integral floats are accepted."""
    if isinstance(value, bool) or _absent(value):
        raise FieldError(source, name, f"missing or empty {name} {value!r}")
    if not isinstance(value, (str, int, float)):
        raise FieldError(source, name, f"{name} is a {type(value).__name__}, not an id")
    if isinstance(value, float):
        if not value.is_integer():
            raise FieldError(source, name, f"{name} {value!r} is not an id")
        value = int(value)
    if isinstance(value, int) and value.bit_length() > 4 * _MAX_ID_CHARS:  # > 64 digits: str() may refuse
        raise FieldError(source, name, f"{name} is an integer of more than {_MAX_ID_CHARS} digits: too long for an id")
    text = _check_unicode(str(value).strip(), source, name)
    if len(text) > _MAX_ID_CHARS:
        raise FieldError(source, name, f"{name} {_show(text)} is too long for an id (at most {_MAX_ID_CHARS})")
    if not text.isprintable() or " " in text or "/" in text:
        raise FieldError(source, name, f"{name} {_show(text)} contains whitespace, a control character or '/'")
    return text


def _to_number(value: Any, source: str, name: str) -> float:
    """A float from a JSON number or from strict ASCII decimal text (no ``1_000``, ``١٢``, ``inf``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FieldError(source, name, f"{name} {_show(value)} is not a number")
    if isinstance(value, str):
        text = value.strip()
        if not _NUMBER.fullmatch(text):
            raise FieldError(source, name, f"{name} {_show(value)} is not a number (ASCII decimal syntax expected)")
        value = text
    try:
        return float(value)
    except OverflowError:   # an int too big for a float
        raise FieldError(source, name, f"{name} {_show(value)} is not a finite number") from None


def parse_float(value: Any, source: str, name: str, *, optional: bool = True,
                low: float = -math.inf, high: float = math.inf) -> float | None:
    if _absent(value):
        if optional:
            return None
        raise FieldError(source, name, f"missing {name}")
    number = _to_number(value, source, name)
    if not math.isfinite(number):
        raise FieldError(source, name, f"{name} {_show(value)} is not a finite number")
    if not low <= number <= high:
        raise FieldError(source, name, f"{name} {_show(value)} outside [{low}, {high}]")
    return number


def parse_int(value: Any, source: str, name: str, *, optional: bool = True,
              low: float = -math.inf, high: float = math.inf) -> int | None:
    number = parse_float(value, source, name, optional=optional, low=low, high=high)
    if number is None:
        return None
    if not number.is_integer():
        raise FieldError(source, name, f"{name} {_show(value)} is not an integer")
    return int(number)


def parse_flag(value: Any, source: str, name: str) -> int | None:
    number = parse_int(value, source, name)
    if number not in (None, 0, 1):
        raise FieldError(source, name, f"{name} {_show(value)} is not 0 or 1")
    return number


def parse_text(value: Any, source: str, name: str, *, empty_as_none: bool = False) -> str | None:
    if value is None:
        return None if empty_as_none else ""
    if isinstance(value, (dict, list, Unparsable)):
        raise FieldError(source, name, f"{name} is a {type(value).__name__}, not text")
    text = _check_unicode(str(value).strip(), source, name)
    if empty_as_none and _absent(text):
        return None
    return text


def _year(stamp: float) -> int:
    return time.gmtime(stamp).tm_year


def parse_timestamp(value: Any, source: str, name: str, *, optional: bool = True,
                    low: int = _MIN_TIMESTAMP, high: int = _MAX_TIMESTAMP) -> int | None:
    """Unix seconds in [low, high) from digits or from a ``YYYY-mm-dd HH:MM:SS`` date (read as UTC)."""
    if isinstance(value, str) and "-" in value.strip()[1:]:
        stamp = _parse_date(value, source, name)
    else:
        stamp = parse_int(value, source, name)
    if stamp is None:
        if optional:
            return None
        raise FieldError(source, name, f"missing {name} {_show(value)} (no date)")
    if not low <= stamp < high:
        raise FieldError(source, name, f"{name} {_show(value)} is not a plausible date "
                                       f"(outside {_year(low)}..{_year(high) - 1})")
    return stamp


def _parse_date(value: str, source: str, name: str) -> int | None:
    text = value.strip()
    if text.startswith("0000-00-00"):   # Flickr's "unknown date"
        return None
    if _DATE.fullmatch(text):
        try:
            return calendar.timegm(time.strptime(text, _DATE_FORMAT))
        except ValueError:
            pass
    raise FieldError(source, name, f"{name} {_show(value)} is neither unix seconds nor a date")


def _optional_date(value: Any, source: str, name: str, low: int) -> int | None:
    """A user-level date where ``0`` means unknown, as ``"0"`` means "no geo" elsewhere."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and str(value).strip() == "0":
        return None
    return parse_timestamp(value, source, name, low=low)


def parse_timezone_offset(value: Any, source: str) -> float | None:
    """Hours east of UTC from ``"8"``, ``"5.5"`` or ``"+05:30"``."""
    if isinstance(value, str) and (match := _TZ_OFFSET.fullmatch(value.strip())):
        sign = -1.0 if match.group(1) == "-" else 1.0
        hours, minutes = int(match.group(2)), int(match.group(3))
        if hours > 14 or minutes >= 60:
            raise FieldError(source, "timezone_offset", f"timezone_offset {_show(value)} outside [-14:00, +14:00]")
        return sign * (hours + minutes / 60)
    return parse_float(value, source, "timezone_offset", low=-14, high=14)


def parse_float_list(value: Any, source: str, name: str) -> list[float] | None:
    """Comma-separated floats (``"0.08,-0.07,..."``) or a JSON list of numbers."""
    if _absent(value):
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    out: list[float] = []
    for position, item in enumerate(items):
        try:
            number = _to_number(item, source, name)
        except FieldError:
            raise FieldError(source, name, f"{name} item {position} {_show(item)} is not a number") from None
        if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
            raise FieldError(source, name, f"{name} item {position} {_show(item)} is not a finite float32")
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
    _check_unicode(text, source, "image_path")
    if _CONTROL.search(text):   # a NUL byte fails deep inside the filesystem layer of a Ray task
        raise FieldError(source, "image_path", f"image path {_show(text)} holds a control character")
    posix = text.replace("\\", "/")
    if "://" in posix or posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise FieldError(source, "image_path", f"image path {text!r} is absolute; it must be relative to the raw folder")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FieldError(source, "image_path", f"image path {text!r} escapes the raw folder ('..')")
    if len(posix) > _MAX_PATH_CHARS or any(len(p.encode()) > _MAX_PATH_PART_BYTES for p in parts):
        raise FieldError(source, "image_path", f"image path {_show(text)} is too long for a file name")
    return "/".join(parts)


# ---------------------------------------------------------------------------------------------

def _check_ids(record: Any, source: str, uid: str | None, pid: str | None, reference: str) -> tuple[str, str]:
    if isinstance(record, Unparsable):
        raise FieldError(source, "row", record.reason)
    if not isinstance(record, dict):
        raise FieldError(source, "row", f"row is a {type(record).__name__}, not a JSON object")
    row_uid = parse_id(_get(record, source, "Uid"), source, "Uid")
    row_pid = parse_id(_get(record, source, "Pid"), source, "Pid")
    if pid is not None and row_pid != pid:
        raise FieldError(source, "Pid", f"Pid {row_pid!r} disagrees with Pid {pid!r} in {reference} at this row")
    if uid is not None and row_uid != uid:
        raise FieldError(source, "Uid", f"Uid {row_uid!r} disagrees with Uid {uid!r} in {reference} at this row")
    return row_uid, row_pid


def reject_id(value: Any) -> str | None:
    """An id for a reject row, or None when the raw value could not be stored or read back."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    if isinstance(value, int) and value.bit_length() > 4 * _MAX_ID_CHARS:
        return None  # longer than any id kept (and str() refuses past 4,300 digits)
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text if len(text) <= _MAX_ID_CHARS else None


def parse_row(file_set: FileSet, index: int) -> tuple[dict | None, dict | None]:
    """One aligned row as a post record (names, no ids) or a reject; exactly one is not None."""
    try:
        return _parse_row(file_set, index), None
    except FieldError as err:
        source, field_name, reason = err.source_file, err.field, err.reason
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as err:
        # A check this module lacks: the row is still a reject (the stage goes on), and the log
        # says which row reached the bug.
        logger.warning("smpd: unexpected %s parsing row %d of %s: %s", type(err).__name__, file_set.first_row + index,
                       file_set.name("text"), err)
        source, field_name, reason = file_set.name("text"), "row", f"unexpected {type(err).__name__}: {err}"
    text = file_set.rows["text"][index]
    uid, pid = (text.get("Uid"), text.get("Pid")) if isinstance(text, dict) else (None, None)
    return None, {"source_file": source, "row_index": file_set.first_row + index, "pid": reject_id(pid),
                  "uid": reject_id(uid), "field": field_name, "reason": reason}


def _parse_row(fs: FileSet, i: int) -> dict:
    names = {k: fs.name(k) for k in fs.files}
    text, cat, ts, add, user = (fs.rows[k][i] for k in JSON_KINDS)
    uid, pid = _check_ids(text, names["text"], None, None, names["text"])
    for kind, record in (("category", cat), ("temporalspatial", ts), ("additional", add), ("user", user)):
        _check_ids(record, names[kind], uid, pid, names["text"])
    out: dict[str, Any] = {"pid": pid, "uid": uid, "row_index": fs.first_row + i}
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
    out["latitude"], out["longitude"], out["geoaccuracy"] = parse_geo(ts, src)
    src = names["additional"]
    out["ispublic"] = parse_flag(add.get("Ispublic"), src, "Ispublic")
    out["pathalias"] = parse_text(add.get("Pathalias"), src, "Pathalias", empty_as_none=True)
    out.update(_parse_user(user, names["user"], text_descriptions=fs.forms.get("user") == "columns"))
    out["label"] = None
    if fs.labelled:
        out["label"] = parse_float(fs.rows["label"][i].strip().strip('"'), names["label"], "label",
                                   optional=False, low=LABEL_RANGE[0], high=LABEL_RANGE[1])
    out["image_path"] = parse_image_path(fs.rows["img_filepath"][i], names["img_filepath"])
    return out


def _parse_user(user: dict, src: str, *, text_descriptions: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["photo_firstdate"] = _optional_date(user.get("photo_firstdate"), src, "photo_firstdate", _MIN_TIMESTAMP)
    out["photo_firstdatetaken"] = _optional_date(user.get("photo_firstdatetaken"), src, "photo_firstdatetaken",
                                                 _MIN_TAKEN)
    out["photo_count"] = parse_int(user.get("photo_count"), src, "photo_count", low=0, high=MAX_PHOTO_COUNT)
    out["ispro"] = parse_flag(user.get("ispro"), src, "ispro")
    out["canbuypro"] = parse_flag(user.get("canbuypro"), src, "canbuypro")   # absent from the 2024+ form
    out["timezone_offset"] = parse_timezone_offset(user.get("timezone_offset"), src)
    tz_id = user.get("timezone_timezone_id", user.get("timezone_id"))
    out["timezone_id"] = parse_text(tz_id, src, "timezone_timezone_id", empty_as_none=True)
    vector, text = parse_description(user.get("user_description"), src, "user_description",
                                     as_text=text_descriptions)
    out["user_description"], out["user_description_text"] = vector, text
    out["location_description"] = _location_text(user.get("location_description"), src, text_descriptions)
    return out


def _location_text(value: Any, source: str, as_text: bool) -> str | None:
    """The location description as text; the older form's float vector is not a feature of ours
    (dropped), and text found there is kept as it always was."""
    if not as_text:
        try:
            parse_float_list(value, source, "location_description")
            return None
        except FieldError:
            pass
    return parse_text(value, source, "location_description", empty_as_none=True)


def parse_description(value: Any, source: str, name: str, *, as_text: bool = False
                      ) -> tuple[list[float] | None, str | None]:
    """(vector, text) of a user or location description; at most one is not None.

    The 2019-2023 files hold a description as comma-separated floats (399/400 of them, or a
    JSON list); the 2024+ user file (a dict of columns, ``as_text``) holds the raw text, HTML and
    URLs included. The file's form decides, never the value: a damaged vector is a reject, not text.
    """
    if _absent(value):
        return None, None
    if as_text:
        return None, parse_text(value, source, name, empty_as_none=True)
    return parse_float_list(value, source, name), None
