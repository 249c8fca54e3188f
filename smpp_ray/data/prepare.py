"""``smpp prepare``: a raw SMPD folder -> Parquet shards, rejects and a manifest (a Ray Data job).

Ray tasks read and validate every field of the row-aligned JSON/text files
(:mod:`smpp_ray.data.smpd_rows`, with the parsers of :mod:`smpp_ray.data.smpd`); the driver pulls
only the key columns to remove duplicate Pids, check class names against the taxonomy (the
corpus's own by default, or one the caller supplies; an unknown name rejects its row, it never
renumbers the classes) and assign splits (:mod:`smpp_ray.data.table_prepare`, shared with table
corpora). Each split's rows then flow through Ray Data ``map_batches`` tasks that read, check,
resize and re-encode the images, and ``write_parquet`` writes the shards from the workers::

    DATA/posts/split={train,val,test}/part-*.parquet   exactly POSTS_SCHEMA
    DATA/rejects/part-00000.parquet                    REJECTS_SCHEMA: one row per rejected input row
    DATA/manifest.json                                 see smpp_ray.data.manifest

Nothing is lost: every input row is either written or rejected with its file, row, field and
reason (``input_rows == written + rejected`` is checked before the manifest is written). Images
rejected inside the Ray tasks are sent to a small collector actor (keyed by file and row, so a
retried task cannot double-count). Image paths must resolve inside the raw folder: absolute paths
and ``..`` are rejected by the driver; in a local raw folder, symlinks that escape are rejected by
the tasks before reading (object stores have no symlinks).

Images are untrusted input (``smpp predict`` runs this on new posts): a file over
``max_image_bytes`` is rejected from its file info before it is read (on object storage the read
stops there), only the JPEG, PNG, WEBP, GIF and BMP decoders are tried, and an image over
:data:`~smpp_ray.data.images.MAX_IMAGE_PIXELS` is rejected from its header before decoding.

A corpus that is mostly rejects is a file problem, not bad rows: with nothing written, or more
than ``max_reject_fraction`` of the rows rejected, the stage raises ValueError with a per-file,
per-field summary, after writing the rejects and without a manifest.

Both folders are locations (:mod:`smpp_ray.storage`): a local path, or an ``s3://`` / ``gs://``
prefix. Each image task resolves the raw folder's filesystem itself and reads its images by
location, so on a cluster the raw posts need only be on storage every node reaches (a local raw
folder must then be mounted on every node).

A run writes into a staging folder beside the output (``.<name>.staging-<id>``) and swaps its
``posts/``, ``rejects/`` and manifest in only when it succeeds (:func:`smpp_ray.storage.swap_in`:
the old ``summary.json`` and manifest are removed first, the new manifest moves in last), so a
failed rerun leaves the previous dataset byte-identical. Its rejects then go to ``<out>.failed``
beside it (or into the output folder itself when that held no dataset). Rows keep their order
and files have deterministic names, so a rerun gives the same shards.
"""

from __future__ import annotations

import logging
import time

import pyarrow.compute as pc

from smpp_ray import console, storage
from smpp_ray.data.images import MAXIMAGE_BYTES_COLUMN
from smpp_ray.data.outputs import OUTPUT_ENTRIES, staged_outputs
from smpp_ray.data.schema import (
    Taxonomy,
)
from smpp_ray.data.splits import assign_splits

logger = logging.getLogger(__name__)


def _check_arguments(raw: str, split: str, val_fraction: float, test_fraction: float, max_image_side: int,
                     jpeg_quality: int, rows_per_shard: int, max_reject_fraction: float, max_image_bytes: int,
                     data_format: str = "smpd") -> None:
    if data_format not in ("smpd", "table"):
        raise ValueError(f"unknown data format {data_format!r}; expected 'smpd' or 'table'")
    if data_format == "table" and not storage.exists(raw):
        raise ValueError(f"table corpus {raw!r} does not exist")
    if data_format == "smpd" and not storage.is_dir(raw):
        raise ValueError(f"raw SMPD folder {raw!r} does not exist or is not a directory")
    if split not in ("time", "user"):
        raise ValueError(f"unknown split method {split!r}; expected 'time' or 'user'")
    if max_image_side < 16 or not 1 <= jpeg_quality <= 100 or rows_per_shard < 1 or max_image_bytes < 1:
        raise ValueError(f"bad image/shard settings: max_image_side={max_image_side!r} (>= 16), "
                         f"jpeg_quality={jpeg_quality!r} (1..100), rows_per_shard={rows_per_shard!r} (>= 1), "
                         f"max_image_bytes={max_image_bytes!r} (>= 1)")
    if not 0 <= max_reject_fraction <= 1:
        raise ValueError(f"max_reject_fraction {max_reject_fraction!r} must be in [0, 1]")
    assign_splits([], split, val_fraction, test_fraction)   # validates the fractions


def prepare_dataset(raw_dir: str, out_dir: str, *, split: str = "time",
                    val_fraction: float = 0.1, test_fraction: float = 0.1, max_image_side: int = 256,
                    jpeg_quality: int = 90, rows_per_shard: int = 2048, max_reject_fraction: float = 0.5,
                    max_image_bytes: int = MAXIMAGE_BYTES_COLUMN, taxonomy: Taxonomy | None = None,
                    min_class_posts: int = 3, image_root: str = "", keep_imageless: bool = False,
                    data_format: str = "smpd", columns: tuple[str, ...] = (),
                    extra_columns: tuple[str, ...] = ()) -> dict:
    """Turn a raw SMPD folder into Parquet shards + rejects + manifest; returns the manifest.

    ``raw_dir`` and ``out_dir`` are locations (local paths or ``s3://`` / ``gs://`` URIs).
    Raises ValueError naming the folder or file on bad usage (missing folder or required file,
    malformed file, files of different lengths, no rows, bad arguments) before any work. Bad rows
    are rejects; when nothing is left to write or more than ``max_reject_fraction`` of the rows
    are rejected, it raises ValueError with a per-field summary, after keeping the rejects (no
    shards, no manifest: that folder is not a dataset) in ``out_dir``, or in ``<out_dir>.failed``
    when ``out_dir`` holds a dataset. Outputs are staged and swapped in on success: a failed run
    leaves a previous dataset in ``out_dir`` byte-identical. ``taxonomy`` fixes the class names and
    ids (rows naming other classes are rejects); None takes the corpus's own (its
    ``taxonomy.json``, else inferred from the training rows with ``min_class_posts``; see
    :func:`resolve_taxonomy`). ``image_root`` names the folder the images are under (see
    :func:`smpp_ray.data.image_root.choose_image_rule`; empty: found by probing). ``keep_imageless`` also writes the
    posts rejected for their image alone to ``imageless/`` (what ``predict`` scores with its
    fallback regressor). ``data_format`` ``table`` reads a table corpus instead (a file or a folder
    of Parquet / JSON Lines / CSV files, ``columns`` mapping its column names to roles; see
    :mod:`smpp_ray.data.table_prepare`), ``extra_columns`` its numeric columns kept as features.
    """
    raw, out = storage.normalize(raw_dir), storage.normalize(out_dir)
    _check_arguments(raw, split, val_fraction, test_fraction, max_image_side, jpeg_quality, rows_per_shard,
                     max_reject_fraction, max_image_bytes, data_format)
    if data_format == "table":
        from smpp_ray.data.table_prepare import prepare_table

        manifest = prepare_table(raw, out, columns=columns, split=split, val_fraction=val_fraction,
                                 test_fraction=test_fraction, max_image_side=max_image_side, jpeg_quality=jpeg_quality,
                                 rows_per_shard=rows_per_shard, max_reject_fraction=max_reject_fraction,
                                 max_image_bytes=max_image_bytes, taxonomy=taxonomy, min_class_posts=min_class_posts,
                                 keep_imageless=keep_imageless, extra_columns=extra_columns)
        _log_done(manifest, out)
        return manifest
    from smpp_ray.data.smpd_rows import read_smpd_rows
    from smpp_ray.data.table_prepare import decide, pull_keys, write_dataset

    started = time.perf_counter()
    with staged_outputs(out) as staging:
        read = read_smpd_rows(raw, storage.join(staging, "_rows"), image_root)
        keys = pull_keys(read.rows)
        console.details(__name__).info("prepare: parsed %d rows (%d rejected) from %s in %.1fs", read.input_rows,
                                       pc.sum(pc.is_valid(keys.column("_reject_field"))).as_py() or 0, raw,
                                       time.perf_counter() - started)
        decision = decide(keys, raw, taxonomy, min_class_posts, split, val_fraction, test_fraction,
                          read.reject_files)
        del keys
        manifest = write_dataset(read.rows, decision, staging, out, raw, read.input_rows, facts=read.facts,
                                 split=split, val_fraction=val_fraction, test_fraction=test_fraction,
                                 max_image_side=max_image_side, jpeg_quality=jpeg_quality,
                                 rows_per_shard=rows_per_shard, max_reject_fraction=max_reject_fraction,
                                 max_image_bytes=max_image_bytes, keep_imageless=keep_imageless, started=started)
        storage.swap_in(staging, out, OUTPUT_ENTRIES)
    _log_done(manifest, out)
    return manifest


def _log_done(manifest: dict, out: str) -> None:
    counts = manifest["counts"]
    logger.info("prepare: %d rows in, %d written (%s), %d rejected, in %.1fs (%.0f rows/s) -> %s",
                counts["input_rows"], counts["written"], ", ".join(f"{k}={v}" for k, v in counts["per_split"].items()),
                counts["rejected"], manifest["run"]["seconds"], manifest["run"]["posts_per_s"], out)


