"""``smpp prepare`` of a table corpus (``data.format: table``): Ray Data end to end.

The same outputs, rejects and checks as the SMPD path (:mod:`smpp_ray.data.prepare`), but the
driver never holds the corpus:

1. Ray Data tasks read and validate the files' pieces (:mod:`smpp_ray.data.table`) into a
   materialised dataset in the object store: every row, rejected ones marked.
2. The driver pulls only the key columns (ids, time, label, class names, file and row) to decide
   what needs the whole corpus at once: duplicate Pids, the class list, class rejects, the split.
3. Per split, tasks join those decisions back by Pid, the rows are sorted by (postdate, pid), the
   images are read (or taken from the ``image`` column), checked and re-encoded, and the shards
   are written from the workers.

``input_rows == written + rejected`` is checked before the manifest is written, and a corpus that
is mostly rejects fails with the same per-field summary as the SMPD path.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from smpp_ray import console, storage
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.images import MAX_IMAGE_PIXELS, collected, image_collector
from smpp_ray.data.outputs import (
    OUTPUT_ENTRIES,
    failed_location,
    keep_failed_rejects,
    reject_problem,
    staged_outputs,
    write_imageless,
    write_rejects,
    write_split_dataset,
)
from smpp_ray.data.schema import SCHEMA_VERSION, SPLITS, Taxonomy
from smpp_ray.data.splits import assign_splits, class_problem, resolve_taxonomy
from smpp_ray.data.table import (
    PIECE,
    PREFIX,
    REJECT_FIELD,
    REJECT_REASON,
    SOURCE,
    column_mapping,
    plan_pieces,
    table_files,
    validate_pieces,
)

#: The columns the driver pulls: everything a corpus-wide decision needs, nothing bulky.
KEY_COLUMNS = ("pid", "uid", "postdate", "label", "category", "subcategory", "concept", "row_index", SOURCE, PIECE,
               PREFIX, REJECT_FIELD, REJECT_REASON)


def prepare_table(raw: str, out: str, *, columns: tuple[str, ...], split: str, val_fraction: float,
                  test_fraction: float, max_image_side: int, jpeg_quality: int, rows_per_shard: int,
                  max_reject_fraction: float, max_image_bytes: int, taxonomy: Taxonomy | None,
                  min_class_posts: int, keep_imageless: bool, extra_columns: tuple[str, ...] = ()) -> dict:
    """A table corpus at ``raw`` (a file or folder) -> the dataset at ``out``; returns the manifest.

    ValueError names an ``extra_columns`` column that holds no value in any valid row (a typo
    would otherwise be a feature that is missing everywhere)."""
    import ray.data

    from smpp_ray.runtime import init_ray

    started = time.perf_counter()
    mapping = column_mapping(columns)
    root, files = table_files(raw)
    pieces = plan_pieces(files)
    init_ray()
    rows = ray.data.from_items([asdict(p) for p in pieces], override_num_blocks=max(1, len(pieces))).map_batches(
        validate_pieces, batch_size=1, batch_format="numpy", num_cpus=1, fn_kwargs={"mapping": mapping, "extras": tuple(extra_columns)}).materialize()
    keys = pull_keys(rows)
    input_rows = keys.num_rows
    if input_rows == 0:
        raise ValueError(f"table corpus {raw!r} holds no rows ({len(files)} file(s)); nothing to prepare")
    console.details(__name__).info("prepare: validated %d rows of %d table file(s) (%d pieces) in %.1fs", input_rows,
                                   len(files), len(pieces), time.perf_counter() - started)
    _check_extra_columns(rows, extra_columns, raw)
    decision = decide(keys, root, taxonomy, min_class_posts, split, val_fraction, test_fraction)
    facts = {"format": "table", "files": {"table": [storage.name(f) for f in files]}, "columns": mapping,
             "extra_columns": list(extra_columns)}
    with staged_outputs(out) as staging:
        manifest = write_dataset(rows, decision, staging, out, root, input_rows, facts=facts, split=split, val_fraction=val_fraction, test_fraction=test_fraction,
                          max_image_side=max_image_side, jpeg_quality=jpeg_quality, rows_per_shard=rows_per_shard,
                          max_reject_fraction=max_reject_fraction, max_image_bytes=max_image_bytes,
                          keep_imageless=keep_imageless, started=started)
        storage.swap_in(staging, out, OUTPUT_ENTRIES)
    return manifest


def _check_extra_columns(rows: Any, extra_columns: tuple[str, ...], raw: str) -> None:
    if not extra_columns:
        return
    import ray

    valued = np.zeros(len(extra_columns), np.int64)
    for ref in rows.select_columns(["extra", REJECT_FIELD]).to_arrow_refs():
        table = ray.get(ref).filter(pc.is_null(pc.field(REJECT_FIELD)))
        values = pc.list_flatten(table.column("extra")).to_numpy(zero_copy_only=False)
        if len(values):
            valued += (~np.isnan(values.reshape(-1, len(extra_columns)))).sum(axis=0)
    empty = [name for name, count in zip(extra_columns, valued, strict=True) if count == 0]
    if empty:
        raise ValueError(f"data.extra_columns: column(s) {empty} hold no value in any valid row of table corpus "
                         f"{raw!r}; check the names against the corpus's columns")


def pull_keys(rows: Any) -> pa.Table:
    """The key columns of every row of ``rows`` (a materialised Ray Dataset), in file order."""
    import ray

    return pa.concat_tables(ray.get(rows.select_columns(list(KEY_COLUMNS)).to_arrow_refs())) \
        .sort_by([(PIECE, "ascending"), ("row_index", "ascending")])


def decide(keys: pa.Table, root: str, taxonomy: Taxonomy | None, min_class_posts: int, split: str,
           val_fraction: float, test_fraction: float, reject_files: dict[int, dict[str, str]] | None = None
           ) -> dict[str, Any]:
    """Everything decided over the whole corpus, from its key columns only (in file order).

    A reject names the row's own file, or ``reject_files[piece]["Pid"]`` (duplicates) and
    ``["class"]`` (class names) where the corpus keeps those in files of their own (SMPD).
    """
    def file_of(row: Any, role: str) -> str:
        return reject_files[int(row[PIECE])][role] if reject_files else row[SOURCE]

    # Few distinct values (names, files): categorical, not a Python string per row (486k rows: ~200 MB).
    frame = keys.to_pandas(categories=["category", "subcategory", "concept", SOURCE, PREFIX, REJECT_FIELD,
                                       REJECT_REASON])
    valid = frame[frame[REJECT_FIELD].isna()]
    rejects = [_reject(r, r[REJECT_FIELD], r[REJECT_REASON]) for r in frame[frame[REJECT_FIELD].notna()]
               .to_dict(orient="records")]
    duplicated = valid["pid"].duplicated(keep="first")
    first_at = valid[~duplicated].set_index("pid")
    for r in valid[duplicated].to_dict(orient="records"):
        first = first_at.loc[r["pid"]]
        rejects.append(_reject(r, "Pid", f"duplicate Pid {r['pid']!r} (first at row {first['row_index']} of "
                                         f"{file_of(first, 'Pid')})", file_of(r, "Pid")))
    valid = valid[~duplicated]
    named = valid[valid["category"].notna() & valid["subcategory"].notna()]
    labelled = named[_labelled(named)]
    taxonomy, source, inferred = resolve_taxonomy(
        taxonomy, root, list(zip(labelled["category"], labelled["subcategory"], strict=True)),
        list(zip(named["category"], named["subcategory"], strict=True)), min_class_posts)
    cat_id, sub_id = taxonomy.category_ids, taxonomy.subcategory_ids
    keep = np.ones(len(valid), dtype=bool)
    # A row's class problem depends on its (category, subcategory) pair alone: checked once per pair.
    pairs = valid.groupby(["category", "subcategory"], dropna=False, observed=True, sort=False).indices
    for (category, subcategory), positions in pairs.items():
        problem = class_problem(_none(category), _none(subcategory), taxonomy, cat_id, sub_id, inferred)
        if problem is not None:
            keep[positions] = False
            rejects += [_reject(valid.iloc[i], *problem, file_of(valid.iloc[i], "class")) for i in sorted(positions)]
    kept = valid[keep]
    concepts = sorted({c for c in kept["concept"].dropna().unique()})
    codes, boundaries = _splits(kept, split, val_fraction, test_fraction)
    assignment = pa.table({
        "row": pa.array(row_keys(kept[PIECE].to_numpy(), kept["row_index"].to_numpy())),
        "split": pa.array(codes, pa.int8()),
        "category_id": pa.array(_ids(kept["category"], cat_id), pa.int32()),
        "subcategory_id": pa.array(_ids(kept["subcategory"], sub_id), pa.int32()),
        "concept_id": pa.array(_ids(kept["concept"], {n: i for i, n in enumerate(concepts)}), pa.int32()),
    })
    return {"taxonomy": taxonomy, "taxonomy_source": source, "concepts": concepts, "rejects": rejects,
            "kept": kept[[SOURCE, "row_index", "postdate"]],
            "assignment": assignment, "boundaries": boundaries,
            "sizes": dict(zip(SPLITS, np.bincount(codes, minlength=len(SPLITS)).tolist(), strict=True)),
            "unlabelled": int(kept["label"].isna().sum())}


def _ids(names: Any, ids: dict[str, int]) -> np.ndarray:
    """The id of each name (-1: none, or not in ``ids``)."""
    return names.astype(object).map(ids).fillna(-1).to_numpy(dtype=np.int64)


def _none(value: Any) -> Any:
    return value if isinstance(value, str) else None


def _labelled(frame: Any) -> Any:
    """Rows to split: labelled rows of training files (an SMPD ``test_`` set may carry labels,
    and stays the test split; a table row's prefix is ``train_`` exactly when it is labelled)."""
    return frame["label"].notna() & (frame[PREFIX] == "train_")


def _reject(row: Any, field: str, reason: str, source_file: str | None = None) -> dict:
    return {"source_file": source_file or row[SOURCE], "row_index": int(row["row_index"]), "pid": _none(row["pid"]),
            "uid": _none(row["uid"]), "field": field, "reason": reason}


def _splits(kept: Any, split: str, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, dict]:
    """The split code (index into SPLITS) of every kept row: labelled training rows split by time
    or user, other rows test; and the boundaries."""
    labelled = _labelled(kept).to_numpy()
    codes = np.full(len(kept), SPLITS.index("test"), np.int8)
    codes[labelled], boundaries = assign_splits(kept.loc[labelled, ["pid", "uid", "postdate"]], split,
                                                             val_fraction, test_fraction)
    return codes, boundaries


def row_keys(pieces: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One int64 per row of the corpus (its piece and its row in the file): what joins a decision
    back to its row. Not the Pid: a duplicated Pid names two rows, and only the first is kept."""
    return (pieces.astype(np.int64) << 32) | rows.astype(np.int64)


def assign_rows(batch: pa.Table, *, assignment: pa.Table, split: int) -> pa.Table:
    """Ray Data UDF: the batch's kept rows of split ``split`` with their class and concept ids."""
    keys = row_keys(batch.column(PIECE).to_numpy(), batch.column("row_index").to_numpy())
    position = pc.index_in(pa.array(keys), value_set=assignment.column("row"))
    chosen = pc.fill_null(pc.equal(pc.take(assignment.column("split"), position), pa.scalar(split, pa.int8())), False)
    rows = batch.filter(chosen)
    where = position.filter(chosen)
    for name in ("category_id", "subcategory_id", "concept_id"):
        rows = rows.set_column(rows.schema.get_field_index(name), name, pc.take(assignment.column(name), where))
    return rows


def write_dataset(rows: Any, decision: dict[str, Any], staging: str, out: str, root: str, input_rows: int, *,
                  facts: dict[str, Any], split: str, val_fraction: float, test_fraction: float,
                  max_image_side: int, jpeg_quality: int, rows_per_shard: int, max_reject_fraction: float,
                  max_image_bytes: int, keep_imageless: bool, started: float) -> dict:
    """Write the decided rows' shards (images read from ``root``), rejects and manifest into
    ``staging``; returns the manifest (``facts`` are the reader's: format, files, ...)."""
    rejects = decision["rejects"]
    failed_at = failed_location(out)
    kept = sum(decision["sizes"].values())
    problem = reject_problem(input_rows, kept, rejects, max_reject_fraction, failed_at)
    if problem is not None:
        write_rejects(rejects, staging)
        keep_failed_rejects(staging, failed_at)
        raise ValueError(problem)
    assignment = decision["assignment"]   # Ray Data puts fn_kwargs in the object store once
    per_split: dict[str, int] = {}
    with image_collector() as collector:
        for code, name in enumerate(SPLITS):
            size = decision["sizes"][name]
            dataset = rows.map_batches(assign_rows, batch_format="pyarrow", batch_size=None, num_cpus=0.5,
                                       fn_kwargs={"assignment": assignment, "split": code}
                                       ).sort(["postdate", "pid"]) if size else None
            per_split[name] = write_split_dataset(
                dataset, size, name, staging, root, max_side=max_image_side, quality=jpeg_quality,
                max_bytes=max_image_bytes, rows_per_shard=rows_per_shard, collector=collector,
                keep_imageless=keep_imageless)
        image_rejects, imageless = collected(collector)
    if keep_imageless:
        write_imageless(imageless, staging)
    rejects = rejects + image_rejects
    write_rejects(rejects, staging)
    written = sum(per_split.values())
    if input_rows != written + len(rejects):
        raise RuntimeError(f"prepare lost rows: {input_rows} in, {written} written + {len(rejects)} rejected")
    problem = reject_problem(input_rows, written, rejects, max_reject_fraction, failed_at)
    if problem is not None:
        keep_failed_rejects(staging, failed_at)
        raise ValueError(problem)
    seconds = time.perf_counter() - started
    manifest = {
        "schema_version": SCHEMA_VERSION, "raw_dir": root, **facts,
        "counts": {"input_rows": input_rows, "written": written, "rejected": len(rejects), "per_split": per_split,
                   "rejected_by_field": dict(sorted(Counter(r["field"] for r in rejects).items()))},
        "taxonomy": decision["taxonomy"].to_dict(), "taxonomy_source": decision["taxonomy_source"],
        "concepts": decision["concepts"],
        "split": {"method": split, "val_fraction": val_fraction, "test_fraction": test_fraction,
                  "boundaries": decision["boundaries"], "unlabelled_test_rows": decision["unlabelled"]},
        "time_range": _time_range(decision["kept"], image_rejects),
        "image": {"max_side": max_image_side, "jpeg_quality": jpeg_quality, "max_bytes": max_image_bytes,
                  "max_pixels": MAX_IMAGE_PIXELS},
        "rows_per_shard": rows_per_shard,
        "run": {"seconds": round(seconds, 2), "posts_per_s": round(input_rows / max(seconds, 1e-9), 1)},
    }
    Dataset(staging).write_manifest(manifest)
    return manifest


def _time_range(kept: Any, image_rejects: list[dict]) -> dict[str, int | None]:
    """First and last postdate of the posts written: the kept rows less those whose image failed."""
    bad = {(r["source_file"], r["row_index"]) for r in image_rejects}
    dates = [int(d) for f, i, d in zip(kept[SOURCE], kept["row_index"], kept["postdate"], strict=True)
             if (f, int(i)) not in bad]
    return {"start": min(dates), "end": max(dates)} if dates else {"start": None, "end": None}
