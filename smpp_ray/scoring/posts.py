"""Posts given as records (the registered model's table, the Serve endpoint's JSON) -> prepared rows.

A record is one post with SMPD's own field names, flat: ``Pid``, ``Uid``, ``Title``, ``Alltags``,
``Category``/``Subcategory``/``Concept`` (optional), ``Postdate``, ``Latitude``/``Longitude``/
``Geoaccuracy``, the user fields (``photo_firstdate``, ``photo_count``, ``ispro``, ``canbuypro``,
``timezone_offset``, ``user_description``, ...) and ``image``: JPEG (or PNG, ...) bytes, or the
same base64-encoded in JSON. Every field goes through prepare's own parsers
(:func:`smpp_ray.data.smpd.parse_row`) and its image check (:func:`smpp_ray.data.images.fit_image`),
so a post scored online is validated exactly as a post of a batch run, and a bad one becomes a
reject naming the row, field and reason. A post whose only problem is its image keeps its
metadata (``image`` empty, as ``prepare(keep_imageless=True)`` writes it), so the fallback
regressor can still score it (:func:`parse_records`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from smpp_ray.data.schema import POSTS_SCHEMA, Taxonomy

#: The name rejects give as the source of a record (there is no file).
SOURCE = "request"
#: Shown in errors: the fields a record must have.
REQUIRED_FIELDS = ("Pid", "Uid", "Postdate", "image")
_JSON_KINDS = ("text", "category", "temporalspatial", "additional", "user")
#: Fields every SMPD file row has but an online post may leave out: their SMPD meaning of "none".
DEFAULTS = {"Title": "", "Alltags": "", "Latitude": "0", "Longitude": "0", "Geoaccuracy": "0"}


def _image_bytes(value: Any) -> bytes:
    """Image bytes of a record's ``image`` (bytes, or base64 text); ValueError names what is wrong."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"image is not valid base64: {err}") from None
    elif value is None:
        raise ValueError("image missing: give the JPEG bytes (base64 in JSON)")
    else:
        raise ValueError(f"image must be bytes or base64 text, got {type(value).__name__}")
    if not data:
        raise ValueError("image is empty")
    return data


def _reject(index: int, record: Any, field: str, reason: str) -> dict[str, Any]:
    from smpp_ray.data.smpd import reject_id

    pid = uid = None
    if isinstance(record, dict):
        pid, uid = reject_id(record.get("Pid")), reject_id(record.get("Uid"))
    return {"source_file": SOURCE, "row_index": index, "pid": pid, "uid": uid, "field": field, "reason": reason}


def _parse_one(record: Any, index: int, *, max_side: int, quality: int,
               classes: _Classes | None, extra_columns: tuple[str, ...] = ()) -> tuple[dict | None, dict | None]:
    """One record -> (prepared row, None), (None, reject), or (row with ``image`` b"", image reject)
    when the image is the only problem."""
    from smpp_ray.data import smpd
    from smpp_ray.data.images import ImageError, fit_image

    if not isinstance(record, dict):
        return None, _reject(index, record, "row", f"post must be an object of SMPD fields, got {type(record).__name__}")
    record = {**DEFAULTS, **record}
    # One post is all five JSON files' records at once: each parser reads its fields from it.
    files = {kind: SOURCE for kind in (*_JSON_KINDS, "img_filepath")}
    rows: dict[str, list] = {kind: [record] for kind in _JSON_KINDS}
    rows["img_filepath"] = [f"post-{index}.jpg"]
    row, reject = smpd.parse_row(smpd.FileSet("test_", files, rows), 0)
    if reject is not None:
        return None, {**reject, "row_index": index}
    problem = classes.problem(row["category"], row["subcategory"]) if classes is not None else None
    if problem is not None:
        return None, _reject(index, record, *problem)
    try:   # a table corpus's extra numeric columns: the post's fields of the same names
        row["extra"] = [smpd.parse_float(record.get(name), SOURCE, name) for name in extra_columns] or None
    except smpd.FieldError as err:
        return None, _reject(index, record, err.field, err.reason)
    row.update({"row_index": index, "image": b"", "image_path": None,
                "category_id": -1, "subcategory_id": -1, "concept_id": -1})
    try:
        row["image"] = fit_image(_image_bytes(record.get("image")), f"post {index}", max_side, quality)
    except (ValueError, ImageError) as err:
        return row, _reject(index, record, "image", str(err))
    return row, None


@dataclass(frozen=True)
class _Classes:
    """The scorer's taxonomy, checked as prepare checks a row (:func:`smpp_ray.data.splits.class_problem`)."""

    taxonomy: Taxonomy
    category_ids: dict[str, int]
    subcategory_ids: dict[str, int]

    @classmethod
    def of(cls, taxonomy: Taxonomy) -> _Classes:
        return cls(taxonomy, taxonomy.category_ids, taxonomy.subcategory_ids)

    def problem(self, category: str | None, subcategory: str | None) -> tuple[str, str] | None:
        from smpp_ray.data.splits import class_problem

        return class_problem(category, subcategory, self.taxonomy, self.category_ids, self.subcategory_ids)


@dataclass
class ParsedPosts:
    """Records sorted into what can be scored by the network, by the fallback, or not at all."""

    rows: pd.DataFrame
    """Valid posts (POSTS_SCHEMA columns), in record order."""
    imageless: pd.DataFrame
    """Posts whose image alone is bad: metadata intact, ``image`` b"" (each also in ``rejects``)."""
    rejects: list[dict[str, Any]] = field(default_factory=list)
    """One per invalid record, the imageless ones included; ``row_index`` is the record's position."""


def parse_records(records: Sequence[Any], *, max_side: int, quality: int,
                  taxonomy: Taxonomy | None = None, extra_columns: tuple[str, ...] = ()) -> ParsedPosts:
    """Validate every record as prepare would; ``len(records) == len(rows) + len(rejects)``.

    ``taxonomy`` (the scorer's classes) rejects a post whose Category or Subcategory is not one of
    its classes, or whose Category is not the parent of its Subcategory, as prepare does; that
    check comes before the image's, so an imageless post has nothing else wrong with it.
    ``extra_columns`` (the scorer's) are read from the record's fields of those names.
    """
    classes = _Classes.of(taxonomy) if taxonomy is not None else None
    kept, imageless, rejects = [], [], []
    for index, record in enumerate(records):
        row, reject = _parse_one(record, index, max_side=max_side, quality=quality, classes=classes,
                                 extra_columns=extra_columns)
        if reject is not None:
            rejects.append(reject)
            if row is not None:
                imageless.append(row)
        else:
            kept.append(row)
    return ParsedPosts(pd.DataFrame(kept, columns=POSTS_SCHEMA.names),
                       pd.DataFrame(imageless, columns=POSTS_SCHEMA.names), rejects)


def parse_posts(records: Sequence[Any], *, max_side: int, quality: int, taxonomy: Taxonomy | None = None,
                extra_columns: tuple[str, ...] = ()) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Prepared rows (POSTS_SCHEMA columns) of the valid records and a reject per invalid one
    (see :func:`parse_records`, which also keeps the metadata of imageless posts)."""
    parsed = parse_records(records, max_side=max_side, quality=quality, taxonomy=taxonomy,
                           extra_columns=extra_columns)
    return parsed.rows, parsed.rejects


def records_from_frame(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A table of posts (one column per SMPD field) as records; missing values dropped, as an
    absent JSON key would be."""
    records = []
    for row in frame.to_dict(orient="records"):
        records.append({k: v for k, v in row.items() if not _is_missing(v)})
    return records


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and arrays are values, not missing
        return False
