"""A raw SMPD folder's rows, read and validated by Ray tasks: the driver never holds the corpus.

The seven files of a file set align by row (:mod:`smpp_ray.data.smpd`), and the real training set
is 305,613 rows of them: parsed into Python objects on one process, that is gigabytes. So:

1. **Scan**: one Ray task per file (:func:`scan_file`) reads it, checks it as a whole (UTF-8,
   valid JSON, an array of records or a dict of columns: the same ValueErrors, naming the file,
   as :func:`smpd.load_json_file`) and finds the byte span of every row. The driver gets the
   row count and form; the spans stay in the object store. A user file in the 2024+ column form
   has no rows to cut, so its task parses it one column at a time and writes the rows as JSON
   Lines into the run's scratch folder, read from then on instead. A scan task holds its file's
   bytes (and a one-byte-per-character view of them), never the file as Python objects.
   (A folder of at most :data:`IN_PROCESS_BYTES` is scanned, and parsed, in the calling process.)
2. **Parse**: Ray Data tasks take ranges of :data:`ROWS_PER_TASK` aligned rows
   (:func:`parse_ranges`): each reads only its rows' bytes of the seven files, validates them with
   :func:`smpd.parse_row` and emits them in the table reader's row schema
   (:data:`smpp_ray.data.table.ROW_SCHEMA`), rejected rows marked. The corpus-wide decisions
   (duplicates, classes, splits) and the writing are then the table path's
   (:mod:`smpp_ray.data.table_prepare`), from the key columns only.

A row's ``_source`` is its image-list file (what an image reject names) or, for a rejected row,
the file its reject names; ``_piece`` is its file set (0 ``train_``, 1 ``test_``), so rows sort
in file order: train then test, each by row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from smpp_ray import storage
from smpp_ray.data import smpd
from smpp_ray.data.image_root import choose_image_rule
from smpp_ray.data.table import PIECE, PREFIX, REJECT_FIELD, REJECT_REASON, ROW_SCHEMA, SOURCE

logger = logging.getLogger(__name__)

#: Aligned rows per parse task: a few MB of JSON, enough tasks to keep every worker busy.
ROWS_PER_TASK = 4096
#: Raw folders whose files hold at most this many bytes in all (a few thousand posts) are scanned
#: and parsed in this process: a Ray job's start-up would cost more than their parse, and their
#: rows take a few MB here.
IN_PROCESS_BYTES = 8 * 1024 * 1024
#: Lines of the image-list file the scan returns, for probing where the images are.
PROBE_LINES = 64
_WHITESPACE = re.compile(r"[ \t\n\r]*")
#: Rows as (start, end) byte offsets, one int64 pair per row.
Spans = np.ndarray


@dataclass(frozen=True)
class SetPlan:
    """One file set, scanned: what a parse task needs to read and validate a range of its rows."""

    piece: int
    prefix: str
    files: dict[str, str]
    """Kind -> the file's location (it names the rejects)."""
    read_from: dict[str, str]
    """Kind -> where the rows are read: the file, or the JSON Lines copy of a column-form file."""
    forms: dict[str, str]
    spans: dict[str, Any]
    """Kind -> the ObjectRef of the file's :data:`Spans`."""
    rows: int
    image_rule: Callable[[str], str]
    image_rule_name: str


@dataclass(frozen=True)
class SmpdRows:
    """Every row of a raw folder (a materialised Ray Dataset in ``ROW_SCHEMA``), and its facts."""

    rows: Any
    input_rows: int
    facts: dict[str, Any]
    """The manifest's ``files``, ``forms``, ``image_roots`` and (none) ``extra_columns``."""
    reject_files: dict[int, dict[str, str]]
    """Piece -> the file a duplicate-Pid reject (``Pid``) and a class reject (``class``) names."""


# --------------------------------------------------------------------------------- scan (a task per file)

def scan_file(location: str, kind: str, scratch: str) -> tuple[dict[str, Any], Spans]:
    """Ray task: ({rows, form, read_from, probes, error}, the rows' byte spans) of one file.

    A file-level problem is returned as ``error`` (the ValueError's text), not raised: the
    driver raises it as a ValueError naming the file, in file order, without a Ray traceback.
    """
    try:
        data = storage.read_bytes(location)
        start = smpd.check_utf8(data, location)
        # One character per byte: a position in this text is a byte offset in the file, and the
        # JSON structure (quotes, brackets, commas: ASCII, never inside a UTF-8 sequence) parses
        # exactly as in the UTF-8 text. The values parsed from it are discarded.
        text = data.decode("latin-1")
        del data
        read_from, probes = location, []
        first = _WHITESPACE.match(text, start).end()
        if kind not in smpd.JSON_KINDS:
            form, spans = "lines", _line_spans(text, start)
            if kind == "img_filepath":
                probes = [_utf8(text[s:e]) for s, e in spans[:PROBE_LINES].tolist()]
        elif text.startswith("[", first):
            form, spans = "records", _record_spans(text, first, location)
        elif text.startswith("{", first):
            form, spans = "columns", _copy_columns_as_lines(text, first, location, scratch)
            read_from = _lines_copy(location, scratch)
        else:   # not an array nor an object: the reader's own error for the whole file
            smpd.parse_json_document(_utf8(text[start:]), location)
            raise ValueError(f"{location!r} must hold a JSON array of records or a dict of columns")
    except ValueError as err:
        return {"error": str(err)}, np.empty((0, 2), np.int64)
    return {"rows": len(spans), "form": form, "read_from": read_from, "probes": probes, "error": None}, spans


def _utf8(latin1: str) -> str:
    """The text of a slice of the one-byte-per-character view."""
    return latin1.encode("latin-1").decode("utf-8")


def _as_spans(positions: list[int]) -> Spans:
    return np.asarray(positions, np.int64).reshape(-1, 2)


def _line_spans(text: str, start: int) -> Spans:
    """Lines as :func:`smpd.load_lines` cuts them: at ``\n`` only, trailing blank lines dropped."""
    lines = text[start:].split("\n")
    while lines and not _utf8(lines[-1]).strip():
        lines.pop()
    positions: list[int] = []
    for line in lines:
        positions += (start, start + len(line))
        start += len(line) + 1
    return _as_spans(positions)


def _record_spans(text: str, position: int, location: str) -> Spans:
    """The spans of a top-level JSON array's elements (``position``: its ``[``), each parsed once
    to find its end."""
    decoder, skip = smpd.json_decoder(), _WHITESPACE.match
    position = skip(text, position + 1).end()
    positions: list[int] = []
    first_type, any_record = "", False
    closed = text.startswith("]", position)
    while not closed:
        try:
            value, end = decoder.raw_decode(text, position)
            kind = type(value).__name__
            any_record = any_record or isinstance(value, dict)
        except RecursionError:   # one deep row is a reject of that row, as in smpd.load_json_file
            end, kind = _element_end(text, position, location), smpd.Unparsable.__name__
        except json.JSONDecodeError as err:
            raise ValueError(f"{location!r} is not valid JSON: {err}") from err
        first_type = first_type or kind
        positions += (position, end)
        position = skip(text, end).end()
        closed = text.startswith("]", position)
        if not closed and not text.startswith(",", position):
            raise ValueError(f"{location!r} is not valid JSON: expected ',' or ']' after row "
                             f"{len(positions) // 2 - 1} (byte {position})")
        position = position if closed else skip(text, position + 1).end()
    position = skip(text, position + 1).end()
    if position != len(text):
        raise ValueError(f"{location!r} is not valid JSON: extra data after the top-level array (byte {position})")
    if positions and not any_record:
        raise ValueError(f"{location!r} must hold a JSON array of records (objects), but its rows are {first_type}s")
    return _as_spans(positions)


def _element_end(text: str, start: int, location: str) -> int:
    """The end of the array or object at ``start``, by an iterative bracket count (no recursion)."""
    depth = 0
    for match in smpd.JSON_TOKEN.finditer(text, start):
        token = match.group()
        if token[0] == '"' or token == ",":
            continue
        depth += 1 if token in "[{" else -1
        if depth == 0:
            return match.end()
    raise ValueError(f"{location!r} is not valid JSON: the row at char {start} is not closed")


def _lines_copy(location: str, scratch: str) -> str:
    return storage.join(scratch, f"{storage.name(location)}.jsonl")


def _column_spans(text: str, position: int, location: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of each column of a top-level ``{"col": {row: value, ...}, ...}``
    (``position``: its ``{``); ValueError when it is not that shape."""
    decoder, skip = smpd.json_decoder(), _WHITESPACE.match
    columns: list[tuple[str, int, int]] = []
    position = skip(text, position + 1).end()
    closed = text.startswith("}", position)
    try:
        while not closed:
            if not text.startswith('"', position):
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, position)
            name, position = decoder.raw_decode(text, position)
            position = skip(text, position).end()
            if not text.startswith(":", position):
                raise json.JSONDecodeError("Expecting ':' delimiter", text, position)
            start = skip(text, position + 1).end()
            value, position = decoder.raw_decode(text, start)
            if not isinstance(value, dict):
                raise ValueError(f"{location!r} must hold a JSON array of records or a dict of columns (column -> "
                                 f"{{row: value}}); got an object whose {_utf8(name)[:60]!r} is a "
                                 f"{type(value).__name__}")
            del value
            columns.append((_utf8(name), start, position))
            position = skip(text, position).end()
            closed = text.startswith("}", position)
            if not closed and not text.startswith(",", position):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
            position = position if closed else skip(text, position + 1).end()
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{location!r} is not valid JSON: {err}") from err
    if skip(text, position + 1).end() != len(text):
        raise ValueError(f"{location!r} is not valid JSON: extra data after the top-level object")
    if not columns:
        raise ValueError(f"{location!r} must hold a JSON array of records or a dict of columns (column -> "
                         "{row: value}); got an object with no column")
    return columns


def _copy_columns_as_lines(text: str, position: int, location: str, scratch: str) -> Spans:
    """Write a dict-of-columns file (``DataFrame.to_json()``: the user file's 2024+ form) as
    JSON Lines of records, as :func:`smpd.parse_json_document` reads it (rows in index-label
    order; a label missing from a column is a null there), and return the copy's spans.

    One column is parsed at a time (twice: once for the row labels, once for the values, each
    column written to a local file), then the column files are zipped into rows: the worker
    holds the file's bytes and one column, never the whole table as objects. Values round-trip
    exactly (floats by ``repr``, over-long integers stay text, lone surrogates stay escaped).
    """
    columns = _column_spans(text, position, location)

    def column(start: int, end: int) -> dict:
        return smpd.load_row(text[start:end].encode("latin-1"))

    labels: dict[Any, None] = {}
    for _, start, end in columns:
        labels.update(dict.fromkeys(column(start, end)))
    order = sorted(labels, key=smpd.row_order)
    del labels
    with tempfile.TemporaryDirectory(prefix="smpd-columns-") as folder:
        paths = []
        for n, (_, start, end) in enumerate(columns):
            values = column(start, end)
            paths.append(os.path.join(folder, f"{n}.txt"))
            with open(paths[-1], "w", encoding="ascii") as out:
                out.writelines(json.dumps(values.get(label)) + "\n" for label in order)
            del values
        names = [json.dumps(name) for name, _, _ in columns]
        positions: list[int] = []
        rows_path = os.path.join(folder, "rows.jsonl")
        with open(rows_path, "wb") as out, contextlib.ExitStack() as stack:
            readers = [stack.enter_context(open(p, encoding="ascii")) for p in paths]
            offset = 0
            for _ in order:
                line = ("{" + ", ".join(f"{k}: {r.readline().rstrip()}" for k, r in zip(names, readers,
                                                                                          strict=True)) + "}").encode()
                positions += (offset, offset + len(line))
                out.write(line + b"\n")
                offset += len(line) + 1
        with open(rows_path, "rb") as copy:
            storage.write_bytes(_lines_copy(location, scratch), copy.read())
    return _as_spans(positions)


# --------------------------------------------------------------------------------- parse (Ray Data tasks)

def parse_ranges(batch: dict[str, np.ndarray], *, sets: list[SetPlan]) -> pa.Table:
    """Ray Data UDF: ranges ``(set, first, stop)`` of aligned rows in, their rows out (ROW_SCHEMA)."""
    tables = [_parse_range(sets[int(s)], int(first), int(stop))
              for s, first, stop in zip(batch["set"], batch["first"], batch["stop"], strict=True)]
    return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()


def _read_rows(plan: SetPlan, kind: str, first: int, stop: int) -> list[Any]:
    import ray

    spans = ray.get(plan.spans[kind])[first:stop]
    base = int(spans[0, 0])
    data = storage.read_range(plan.read_from[kind], base, int(spans[-1, 1]) - base)
    pieces = [data[start - base:end - base] for start, end in spans.tolist()]
    if kind in smpd.JSON_KINDS:
        return [smpd.load_row(piece) for piece in pieces]
    return [piece.decode().removesuffix("\r") for piece in pieces]   # the scan checked it is UTF-8


def _parse_range(plan: SetPlan, first: int, stop: int) -> pa.Table:
    rows = {kind: _read_rows(plan, kind, first, stop) for kind in plan.files}
    file_set = smpd.FileSet(plan.prefix, plan.files, rows, plan.forms, first_row=first)
    image_file = file_set.name("img_filepath")
    out = []
    for i in range(stop - first):
        record, reject = smpd.parse_row(file_set, i)
        base = {PIECE: plan.piece, PREFIX: plan.prefix}
        if reject is not None:
            out.append({**base, SOURCE: reject["source_file"], "row_index": reject["row_index"],
                        "pid": reject["pid"], "uid": reject["uid"], REJECT_FIELD: reject["field"],
                        REJECT_REASON: reject["reason"]})
            continue
        record["image_path"] = plan.image_rule(record["image_path"])
        if record["user_description"] is not None:
            record["user_description"] = np.asarray(record["user_description"], np.float32)
        out.append({**record, **base, SOURCE: image_file, "category_id": -1, "subcategory_id": -1,
                    "concept_id": -1})
    return pa.Table.from_pylist(out, schema=ROW_SCHEMA)


# --------------------------------------------------------------------------------- driver

def read_smpd_rows(raw: str, scratch: str, image_root: str = "") -> SmpdRows:
    """Every row of the raw SMPD folder ``raw``, validated by Ray tasks (module docstring).

    ``scratch`` is a folder of this run's (the column-form user file's copy goes there). Raises
    ValueError naming the file on a file-level problem, before any row is parsed.
    """
    import ray
    import ray.data

    from smpp_ray.runtime import init_ray

    search = smpd.FolderSearch(raw)   # one listing per folder for both prefixes
    sets = [s for s in (smpd.find_file_set(raw, p, search) for p in smpd.PREFIXES) if s is not None]
    if not sets:
        expected = "; ".join(" or ".join(n.format(p="train_") for n in names) for names in smpd.FILE_NAMES.values())
        raise ValueError(f"raw SMPD folder {raw!r} holds neither train_ nor test_ files; expected {expected} "
                         "(or the same with the test_ prefix)")
    init_ray()
    in_process = sum(storage.size(location) for s in sets for location in s.files.values()) <= IN_PROCESS_BYTES
    if in_process:
        done = [{kind: scan_file(location, kind, scratch) for kind, location in s.files.items()} for s in sets]
        scanned = [{kind: meta for kind, (meta, _) in files.items()} for files in done]
        spans = [{kind: ray.put(found) for kind, (_, found) in files.items()} for files in done]
    else:
        scan = ray.remote(num_cpus=1, num_returns=2)(scan_file)
        refs = [{kind: scan.remote(location, kind, scratch) for kind, location in s.files.items()} for s in sets]
        scanned = [{kind: ray.get(meta) for kind, (meta, _) in files.items()} for files in refs]
        spans = [{kind: found for kind, (_, found) in files.items()} for files in refs]
    plans = [_plan(piece, s, metas, spans[piece], raw, image_root)
             for piece, (s, metas) in enumerate(zip(sets, scanned, strict=True))]
    input_rows = sum(p.rows for p in plans)
    if input_rows == 0:
        names = ", ".join(s.name(k) for s in sets for k in ("text", "img_filepath"))
        raise ValueError(f"the raw SMPD files hold no rows ({names} are empty); nothing to prepare")
    ranges = [{"set": p.piece, "first": first, "stop": min(first + ROWS_PER_TASK, p.rows)}
              for p in plans for first in range(0, p.rows, ROWS_PER_TASK)]
    if in_process:
        rows = ray.data.from_arrow([_parse_range(plans[r["set"]], r["first"], r["stop"]) for r in ranges])
    else:
        rows = ray.data.from_items(ranges, override_num_blocks=len(ranges)).map_batches(
            parse_ranges, batch_size=1, batch_format="numpy", num_cpus=1, fn_kwargs={"sets": plans}).materialize()
    facts = {"files": {s.prefix.rstrip("_"): {k: s.name(k) for k in s.files} for s in sets},
             "forms": {s.name(k): m["form"] for s, metas in zip(sets, scanned, strict=True)
                       for k, m in sorted(metas.items()) if k in smpd.JSON_KINDS},
             "image_roots": {p.prefix: p.image_rule_name for p in plans if p.rows}, "extra_columns": []}
    reject_files = {p.piece: {"Pid": storage.name(p.files["text"]), "class": storage.name(p.files["category"])}
                    for p in plans}
    return SmpdRows(rows, input_rows, facts, reject_files)


def _plan(piece: int, file_set: smpd.FileSet, metas: dict[str, dict], spans: dict[str, Any], raw: str,
          image_root: str) -> SetPlan:
    """The set's plan; ValueError for its first file-level problem (in file order) or for files
    of different lengths."""
    for meta in metas.values():
        if meta["error"]:
            raise ValueError(meta["error"])
    lengths = {file_set.name(k): m["rows"] for k, m in metas.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{n}: {c} rows" for n, c in lengths.items())
        raise ValueError(f"SMPD files must have the same number of rows (they align by position); got {detail}")
    rows = metas["text"]["rows"]
    image_file = file_set.name("img_filepath")
    probes = []
    for line in metas["img_filepath"]["probes"]:
        try:
            probes.append(smpd.parse_image_path(line, image_file))
        except smpd.FieldError:
            continue
    name, rule = choose_image_rule(raw, image_file, probes, image_root) if rows else ("as written", _as_written)
    if name != "as written":
        logger.info("prepare: %s images are read with their path's %s", file_set.prefix.rstrip("_"), name)
    return SetPlan(piece, file_set.prefix, dict(file_set.files), {k: m["read_from"] for k, m in metas.items()},
                   {k: m["form"] for k, m in metas.items() if k in smpd.JSON_KINDS}, spans, rows, rule, name)


def _as_written(path: str) -> str:
    return path
