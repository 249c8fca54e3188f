"""A prepared dataset folder as a run writes it: staged beside the output and swapped in whole,
each split's shards written by Ray Data tasks, the rejects and imageless posts as single files.

A failed run leaves the previous dataset byte-identical and keeps its rejects in the output folder
(when it held no dataset) or in ``<out>.failed`` beside it.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from smpp_ray import console, storage
from smpp_ray.data.dataset import IMAGELESS_DIR, MANIFEST_FILE, POSTS_DIR, REJECTS_DIR, Dataset
from smpp_ray.data.images import load_images
from smpp_ray.data.schema import POSTS_SCHEMA, REJECTS_SCHEMA
from smpp_ray.summary import SUMMARY_FILE

logger = logging.getLogger(__name__)

#: Rows whose images one call decodes and re-encodes: a sort partition holds thousands of rows, and
#: its images are held only a batch at a time.
IMAGE_BATCH_ROWS = 128

#: What a prepare run owns in its folder, marker first (see :func:`smpp_ray.storage.swap_in`):
#: the stage's summary goes first (it describes the dataset being replaced) and the manifest,
#: which makes the folder a dataset, moves in last. Anything else in the folder is left alone.
OUTPUT_ENTRIES = (SUMMARY_FILE, MANIFEST_FILE, REJECTS_DIR, IMAGELESS_DIR, POSTS_DIR)

@contextmanager
def staged_outputs(out: str) -> Iterator[str]:
    """A staging folder beside ``out`` for this run's outputs, deleted however the run ends.

    The previous dataset in ``out`` is untouched until the run swaps its finished outputs in,
    so a failed rerun leaves it byte-identical (its summary included)."""
    staging = storage.staging_location(out)
    try:
        yield staging
    finally:
        storage.remove(staging)

def failed_location(out: str) -> str:
    """Where a failed run keeps its rejects: ``out`` itself, unless that holds a dataset (a
    manifest), which a failure must not touch; then ``<out>.failed`` beside it."""
    if Dataset(out).has_manifest():
        return storage.join(storage.parent(out), f"{storage.name(out)}.failed")
    return out

def keep_failed_rejects(staging: str, failed_at: str) -> None:
    """Move a failed run's rejects (only: no partial shards) to ``failed_at``."""
    storage.remove(Dataset(staging).posts_root)
    storage.swap_in(staging, failed_at, OUTPUT_ENTRIES)

def _count_rows(folder: str) -> int:
    total = 0
    for location in storage.list_parquet_files(folder):
        with storage.open_input(location) as stream:
            total += pq.ParquetFile(stream).metadata.num_rows
    return total

def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()

def write_split_dataset(dataset: Any, rows: int, split: str, out: str, raw: str, *, max_side: int, quality: int,
                        max_bytes: int, rows_per_shard: int, collector: Any, keep_imageless: bool) -> int:
    """Read, check and re-encode the images of a split's metadata rows (a Ray Dataset, or None
    when the split is empty) and write its shards; returns the rows written."""
    import ray.data
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        """``part-<task>-<i>.parquet``: deterministic, so a rerun rewrites the same names."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}"

    folder = Dataset(out).posts(split)
    fs, path = storage.resolve(folder)
    started = time.perf_counter()
    if dataset is not None:
        dataset = dataset.map_batches(
            load_images, batch_format="pyarrow", batch_size=IMAGE_BATCH_ROWS, num_cpus=1,
            fn_kwargs={"raw_root": raw, "max_side": max_side, "quality": quality, "collector": collector,
                       "keep_imageless": keep_imageless, "max_bytes": max_bytes}
        ).repartition(target_num_rows_per_block=rows_per_shard, strict=True)   # same files on every rerun
        dataset.write_parquet(path, filesystem=fs, schema=POSTS_SCHEMA, filename_provider=PartNames(),
                              min_rows_per_file=rows_per_shard, max_rows_per_file=rows_per_shard,
                              mode=ray.data.SaveMode.OVERWRITE, **storage.PARQUET_CHECKSUM_WRITE)
    written = _count_rows(folder)
    if written == 0:   # an empty split still gets a file, so readers see the schema
        storage.write_bytes(storage.join(folder, "part-00000-0.parquet"), _parquet_bytes(POSTS_SCHEMA.empty_table()))
    seconds = time.perf_counter() - started
    console.details(__name__).info("prepare: split=%s wrote %d of %d posts in %.1fs (%.0f rows/s)", split, written,
                                   rows, seconds, rows / max(seconds, 1e-9))
    return written

def _storable(text: str) -> str:
    """Text Parquet can hold: a reason quoting a lone surrogate must not lose the rejects table."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")

def write_imageless(posts: list[dict], out: str) -> None:
    """The posts rejected for their image alone, in raw-file order (POSTS_SCHEMA, ``image`` empty)."""
    posts = sorted(posts, key=lambda r: (r["row_index"], r["pid"]))
    table = pa.Table.from_pylist(posts, schema=POSTS_SCHEMA)
    storage.write_bytes(storage.join(Dataset(out).imageless, "part-00000.parquet"), _parquet_bytes(table))

def write_rejects(rejects: list[dict], out: str) -> None:
    rejects = sorted(rejects, key=lambda r: (r["source_file"], r["row_index"]))
    rows = [{**r, "reason": _storable(r["reason"])} for r in rejects]
    table = pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)
    storage.write_bytes(storage.join(Dataset(out).rejects, "part-00000.parquet"), _parquet_bytes(table))

def _reject_summary(rejects: list[dict]) -> str:
    """Rejects per (file, field), most first, each with its first reason: what to fix, in one line."""
    counts = Counter((r["source_file"], r["field"]) for r in rejects)
    first: dict[tuple[str, str], dict] = {}
    for r in sorted(rejects, key=lambda r: r["row_index"]):
        first.setdefault((r["source_file"], r["field"]), r)
    parts = []
    for (source, field), count in counts.most_common():
        example = first[(source, field)]
        reason = example["reason"] if len(example["reason"]) <= 120 else example["reason"][:117] + "..."
        parts.append(f"{source} {field}: {count} (row {example['row_index']}: {reason})")
    return "; ".join(parts)

def reject_problem(input_rows: int, kept: int, rejects: list[dict], max_fraction: float, out: str) -> str | None:
    """Why the stage must fail: nothing left to write or more than ``max_fraction`` of rows rejected.

    A mostly rejected corpus is a file problem (a row-shifted file, a wrong taxonomy), and a run
    that reports success on a tenth of the data hides it.
    """
    share = len(rejects) / input_rows
    if kept and share <= max_fraction:
        return None
    problem = ("no row is left to write" if not kept else
               f"{share:.1%} of the rows were rejected, more than data.max_reject_fraction={max_fraction}")
    return (f"prepare: {problem} ({len(rejects)} of {input_rows} rows rejected). Rejects by file and "
            f"field: {_reject_summary(rejects)}. Every rejected row is in {Dataset(out).rejects!r}")
