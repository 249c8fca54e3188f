"""Reading a *table* corpus: posts as Parquet, JSON Lines or CSV, one file or many, any location.

``data.format: table`` takes any corpus whose posts are rows of a table, with ``data.columns``
mapping its column names to the roles below (``role=column`` entries; a role whose column has
the role's own name needs no entry)::

    pid, uid, postdate             required: post id, user id, time (unix seconds or
                                   "YYYY-mm-dd HH:MM:SS", or a Parquet timestamp)
    image_path | image             required, one of them: a path relative to the corpus folder
                                   (or to the folder of a single table file), or the image bytes
    label                          popularity; rows without one are unlabelled test posts
    category, subcategory, concept class names (labelled rows need category and subcategory)
    title, tags, mediatype         text ("tags": space-separated)
    latitude, longitude, geoaccuracy
    photo_count, ispro, photo_firstdate, timezone_offset, timezone_id, pathalias, ispublic,
    user_description, location_description       user statistics and text

Any other numeric columns named by ``data.extra_columns`` travel in the ``extra`` list, in that
order (features ``extra_<column>``): a number, or null when empty or absent.

Files are cut into *pieces* (a Parquet row group, or a whole JSON Lines / CSV file), and Ray
Data tasks read and validate the pieces in parallel: no whole-corpus object is ever built on the
driver. Each value is checked by the same parsers as the SMPD reader (:mod:`smpp_ray.data.smpd`),
so a bad value is the same reject with the same reason: the piece's task emits every row of its
piece, valid rows with their fields and rejected rows with ``_reject_field`` / ``_reject_reason``
set (file name and row number within the file name the row). A JSON line that does not parse is
a reject of that line only.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.data import smpd
from smpp_ray.data.schema import IMAGE_BYTES_COLUMN, POSTS_SCHEMA, PREFIX_COLUMN, SOURCE_COLUMN

logger = logging.getLogger(__name__)

#: Table file suffixes and the reader of each.
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
ROLES = ("pid", "uid", "postdate", "image_path", "image", "label", "category", "subcategory", "concept", "title",
         "tags", "mediatype", "latitude", "longitude", "geoaccuracy", "photo_count", "ispro", "photo_firstdate",
         "timezone_offset", "timezone_id", "pathalias", "ispublic", "user_description", "location_description")
REQUIRED = ("pid", "uid", "postdate")
#: Hidden columns of a validated row: its file, its piece (for file order), the raw image bytes
#: (the ``image`` role), the prefix it stands for (``train_`` labelled, ``test_`` not) and why
#: it was rejected (null for a valid row).
SOURCE, IMAGE_BYTES, PREFIX = SOURCE_COLUMN, IMAGE_BYTES_COLUMN, PREFIX_COLUMN
PIECE = "_piece"
REJECT_FIELD, REJECT_REASON = "_reject_field", "_reject_reason"
ROW_SCHEMA = pa.schema([f for f in POSTS_SCHEMA if f.name != "image"] + [
    pa.field(SOURCE, pa.string()), pa.field(PIECE, pa.int64()), pa.field(IMAGE_BYTES, pa.binary()),
    pa.field(PREFIX, pa.string()), pa.field(REJECT_FIELD, pa.string()), pa.field(REJECT_REASON, pa.string())])


@dataclass(frozen=True)
class Piece:
    """A unit of reading: ``row_group`` of a Parquet file (-1: the whole file); ``first_row`` is
    the row number of its first row within the file."""

    location: str
    kind: str
    row_group: int
    first_row: int
    index: int


def column_mapping(entries: tuple[str, ...]) -> dict[str, str]:
    """Role -> column name from ``data.columns`` entries ``role=column`` (identity by default)."""
    mapping = {role: role for role in ROLES}
    for entry in entries:
        role, sep, column = entry.partition("=")
        role, column = role.strip(), column.strip()
        if not sep or not column or role not in ROLES:
            raise ValueError(f"data.columns entry {entry!r} must be role=column with a role among {', '.join(ROLES)}")
        mapping[role] = column
    return mapping


def table_files(raw: str) -> tuple[str, list[str]]:
    """(the folder image paths are relative to, the table files): ``raw`` is one table file or a
    folder searched recursively. ValueError naming ``raw`` when it holds none."""
    suffix = _suffix(raw)
    if suffix and storage.is_file(raw):
        return storage.parent(raw), [raw]
    files = [f for f in storage.list_files(raw) if _suffix(f)]
    if not files:
        raise ValueError(f"table corpus {raw!r} holds no table file ({', '.join(sorted(SUFFIXES))})")
    return raw, files


def _suffix(location: str) -> str | None:
    lowered = location.lower()
    return next((kind for suffix, kind in SUFFIXES.items() if lowered.endswith(suffix)), None)


def plan_pieces(files: list[str]) -> list[Piece]:
    """The pieces of every file (Parquet: one per row group, from its footer)."""
    pieces: list[Piece] = []
    for location in files:
        kind = _suffix(location) or ""
        if kind == "parquet":
            with storage.open_input(location) as stream:
                metadata = pq.ParquetFile(stream).metadata
            first = 0
            for group in range(metadata.num_row_groups):
                pieces.append(Piece(location, kind, group, first, len(pieces)))
                first += metadata.row_group(group).num_rows
        else:
            pieces.append(Piece(location, kind, -1, 0, len(pieces)))
    return pieces


def read_piece(piece: Piece) -> list[Any]:
    """The rows of a piece: dicts, or an :class:`smpd.Unparsable` for a JSON line that does not parse."""
    if piece.kind == "parquet":
        with storage.open_input(piece.location) as stream:
            return pq.ParquetFile(stream).read_row_group(piece.row_group).to_pylist()
    data = storage.read_bytes(piece.location)   # read once; CSV and JSON Lines parse from these bytes
    if piece.kind == "csv":
        # Every column as text: the parsers decide what a value is, as for SMPD's string-typed JSON.
        header = pacsv.open_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(encoding="utf8")).schema.names
        columns = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(encoding="utf8"),
                                 convert_options=pacsv.ConvertOptions(strings_can_be_null=True,
                                                                      column_types=dict.fromkeys(header, pa.string())))
        return columns.to_pylist()
    lines = smpd.decode_text(data, piece.location).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows: list[Any] = []
    for line in lines:
        if not line.strip():
            rows.append(None)   # a blank line inside the file keeps its number, as a reject
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as err:
            rows.append(smpd.Unparsable(f"line is not valid JSON: {err}"))
    return rows


def validate_row(raw_row: Any, mapping: dict[str, str], source: str, extras: tuple[str, ...] = ()) -> dict[str, Any]:
    """One table row as a prepared post's fields (no image yet); raises smpd.FieldError.

    ``extras`` (``data.extra_columns``) are numeric columns kept as they are, in that order, in
    the ``extra`` list: a number, or null when empty or absent."""
    if isinstance(raw_row, smpd.Unparsable):
        raise smpd.FieldError(source, "row", raw_row.reason)
    if not isinstance(raw_row, dict):
        raise smpd.FieldError(source, "row", "blank line" if raw_row is None else
                              f"row is a {type(raw_row).__name__}, not an object")
    row = {role: _plain(raw_row.get(column)) for role, column in mapping.items()}
    for role in REQUIRED:
        if mapping[role] not in raw_row:
            raise smpd.FieldError(source, mapping[role], f"missing column {mapping[role]!r} (role {role})")
    out: dict[str, Any] = {
        "pid": smpd.parse_id(row["pid"], source, mapping["pid"]),
        "uid": smpd.parse_id(row["uid"], source, mapping["uid"]),
        "postdate": smpd.parse_timestamp(row["postdate"], source, mapping["postdate"], optional=False),
        "label": smpd.parse_float(row["label"], source, mapping["label"], low=smpd.LABEL_RANGE[0],
                                  high=smpd.LABEL_RANGE[1]),
    }
    for role in ("title", "tags"):
        out[role] = smpd.parse_text(row[role], source, mapping[role])
    for role in ("mediatype", "concept", "pathalias", "timezone_id", "location_description"):
        out[role] = smpd.parse_text(row[role], source, mapping[role], empty_as_none=True)
    out["user_description_text"] = smpd.parse_text(row["user_description"], source, mapping["user_description"],
                                                   empty_as_none=True)
    out["user_description"] = None
    for role in ("category", "subcategory"):
        out[role] = smpd.parse_text(row[role], source, mapping[role], empty_as_none=True)
        if out[role] is None and out["label"] is not None:
            raise smpd.FieldError(source, mapping[role], f"empty {role} (a labelled post needs its class)")
    geo = {"Latitude": row["latitude"], "Longitude": row["longitude"], "Geoaccuracy": row["geoaccuracy"]}
    out["latitude"], out["longitude"], out["geoaccuracy"] = smpd.parse_geo(geo, source)
    out.update(_user_fields(row, mapping, source))
    out["extra"] = [smpd.parse_float(_plain(raw_row.get(name)), source, name) for name in extras] if extras else None
    return out


def _user_fields(row: dict, mapping: dict[str, str], source: str) -> dict[str, Any]:
    return {
        "photo_count": smpd.parse_int(row["photo_count"], source, mapping["photo_count"], low=0, high=smpd.MAX_PHOTO_COUNT),
        "ispro": smpd.parse_flag(row["ispro"], source, mapping["ispro"]),
        "ispublic": smpd.parse_flag(row["ispublic"], source, mapping["ispublic"]),
        "canbuypro": None,
        "photo_firstdate": smpd.parse_timestamp(row["photo_firstdate"], source, mapping["photo_firstdate"]),
        "photo_firstdatetaken": None,
        "timezone_offset": smpd.parse_timezone_offset(row["timezone_offset"], source),
    }


def _plain(value: Any) -> Any:
    """A Parquet timestamp as unix seconds; every other value as it is."""
    if isinstance(value, datetime.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
        return int(stamp.timestamp())
    return value


def validate_pieces(batch: dict[str, Any], *, mapping: dict[str, str], extras: tuple[str, ...] = ()) -> pa.Table:
    """Ray Data UDF: a batch of piece descriptions in, every row of those pieces out (ROW_SCHEMA),
    rejected rows marked with ``_reject_field`` / ``_reject_reason``."""
    tables = []
    for i in range(len(batch["location"])):
        piece = Piece(str(batch["location"][i]), str(batch["kind"][i]), int(batch["row_group"][i]),
                      int(batch["first_row"][i]), int(batch["index"][i]))
        tables.append(_validate_piece(piece, mapping, extras))
    return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()


def _validate_piece(piece: Piece, mapping: dict[str, str], extras: tuple[str, ...]) -> pa.Table:
    source = storage.name(piece.location)
    rows = []
    for offset, raw_row in enumerate(read_piece(piece)):
        number = piece.first_row + offset
        base = {SOURCE: source, PIECE: piece.index, "row_index": number}
        try:
            record = validate_row(raw_row, mapping, source, extras)
            image_bytes, image_path = _image_of(raw_row, mapping, source)
        except smpd.FieldError as err:
            ids = raw_row if isinstance(raw_row, dict) else {}
            rows.append({**base, "pid": smpd.reject_id(ids.get(mapping["pid"])),
                         "uid": smpd.reject_id(ids.get(mapping["uid"])),
                         REJECT_FIELD: err.field, REJECT_REASON: err.reason})
            continue
        rows.append({**base, **record, "image_path": image_path, IMAGE_BYTES: image_bytes,
                     PREFIX: "train_" if record["label"] is not None else "test_",
                     "category_id": -1, "subcategory_id": -1, "concept_id": -1})
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _image_of(raw_row: dict, mapping: dict[str, str], source: str) -> tuple[bytes | None, str | None]:
    data = raw_row.get(mapping["image"])
    if data is not None:
        if not isinstance(data, (bytes, bytearray)):
            raise smpd.FieldError(source, mapping["image"], f"image column holds a {type(data).__name__}, not bytes")
        return bytes(data), None
    if raw_row.get(mapping["image_path"]) is None:
        raise smpd.FieldError(source, mapping["image_path"],
                              f"no image: neither {mapping['image_path']!r} nor {mapping['image']!r} is set")
    return None, smpd.parse_image_path(raw_row[mapping["image_path"]], source)
