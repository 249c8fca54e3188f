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
:data:`MAX_IMAGE_PIXELS` is rejected from its header before decoding.

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

import hashlib
import io
import logging
import os
import stat
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from smpp_ray import console, storage
from smpp_ray.data.manifest import MANIFEST_FILE, manifest_location
from smpp_ray.data.schema import (
    IMAGE_BYTES_COLUMN,
    POSTS_SCHEMA,
    REJECTS_SCHEMA,
    SOURCE_COLUMN,
    SPLITS,
    Taxonomy,
    imageless_path,
    posts_path,
    rejects_path,
)
from smpp_ray.data.taxonomy import InferredTaxonomy, corpus_taxonomy, infer_taxonomy
from smpp_ray.summary import SUMMARY_FILE

logger = logging.getLogger(__name__)

#: Rows whose images one call decodes and re-encodes: a sort partition holds thousands of rows, and
#: its images are held only a batch at a time.
IMAGE_BATCH_ROWS = 128
#: Concurrent image reads per task from object storage, where each read is a round trip.
_FETCH_THREADS = 16
#: Default of ``data.max_image_bytes``: a 20 MiB photo is already far above what SMPD holds.
MAXIMAGE_BYTES_COLUMN = 20 * 1024 * 1024
#: Images above 40 megapixels are rejected before decoding (Pillow's own limit is ~89 MP).
MAX_IMAGE_PIXELS = 40_000_000
#: The only decoders Pillow may try (EPS would run Ghostscript; others are rarely maintained).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


# --------------------------------------------------------------------------------- taxonomy

def resolve_taxonomy(taxonomy: Taxonomy | None, raw: str, labelled: list[tuple[str, str]],
                     pairs: list[tuple[str, str]], min_class_posts: int
                     ) -> tuple[Taxonomy, str, InferredTaxonomy | None]:
    """The class list posts are classified into, where it came from, and the inference (if any).

    ``taxonomy`` given (a file the user names, the packaged list, or a pipeline's list in
    ``predict``) is used as it is; else the corpus's own ``taxonomy.json``; else the classes of
    the labelled training rows ``labelled`` (see :mod:`smpp_ray.data.taxonomy`), or of all rows
    ``pairs`` when none is labelled. The data never renumbers a given list: class ids are the
    contract between a dataset, its checkpoints and its models.
    """
    if taxonomy is not None:
        return taxonomy, "given", None
    carried = corpus_taxonomy(raw)
    if carried is not None:
        return carried[0], f"corpus file {carried[1]}", None
    # A folder of unlabelled test_ posts only: their own names are all there is.
    inferred = infer_taxonomy(labelled or pairs, min_class_posts)
    return inferred.taxonomy, "inferred from the training rows" if labelled else "inferred from the rows", inferred


def class_problem(category: str | None, subcategory: str | None, taxonomy: Taxonomy,
                   cat_id: dict[str, int], sub_id: dict[str, int],
                   inferred: InferredTaxonomy | None = None) -> tuple[str, str] | None:
    """(field, reason) when a row's class names do not fit the taxonomy; None when they do."""
    if subcategory is not None and inferred is not None and subcategory in inferred.rare:
        return "Subcategory", (f"subcategory {subcategory!r} has {inferred.rare[subcategory]} labelled training "
                               "row(s), fewer than data.min_class_posts: not a class")
    if category is not None and category not in cat_id:
        return "Category", (f"category {category!r} is not in the taxonomy "
                            f"({taxonomy.num_categories} categories)")
    if subcategory is None:
        return None
    if subcategory not in sub_id:
        return "Subcategory", (f"subcategory {subcategory!r} is not in the taxonomy "
                               f"({taxonomy.num_subcategories} subcategories)")
    parent = taxonomy.categories[taxonomy.parents[sub_id[subcategory]]]
    if category is not None and category != parent:
        if inferred is not None and subcategory in inferred.majority:
            _, count, total = inferred.majority[subcategory]
            return "Category", (f"category {category!r} conflicts with {parent!r}, the majority parent of "
                                f"subcategory {subcategory!r} ({count} of its {total} training rows)")
        return "Category", (f"category {category!r} disagrees with {parent!r}, the parent of "
                            f"subcategory {subcategory!r}")
    return None


def _reject(record: dict, source_file: str, field: str, reason: str) -> dict:
    return {"source_file": source_file, "row_index": record["row_index"], "pid": record["pid"],
            "uid": record["uid"], "field": field, "reason": reason}


# --------------------------------------------------------------------------------- splits

def assign_splits(labelled: Any, method: str, val_fraction: float, test_fraction: float
                  ) -> tuple[np.ndarray, dict]:
    """The split (an index into SPLITS) of each labelled post, by time (chronological by
    (postdate, pid)) or by user; and the boundaries. ``labelled``: a frame (or records) with
    ``pid``, ``uid`` and ``postdate``; vectorised, as it runs over every post on the driver."""
    import pandas as pd

    if method not in ("time", "user"):
        raise ValueError(f"unknown split method {method!r}; expected 'time' or 'user'")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction!r} and test_fraction {test_fraction!r} must be in [0, 1) "
                         "and sum to < 1")
    frame = labelled.reset_index(drop=True) if isinstance(labelled, pd.DataFrame) else \
        pd.DataFrame(list(labelled), columns=["pid", "uid", "postdate"])
    n = len(frame)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    codes = np.zeros(n, np.int8)
    if method == "time":
        order = frame.sort_values(["postdate", "pid"], kind="stable").index.to_numpy()
        parts = {"train": order[: n - n_val - n_test], "val": order[n - n_val - n_test: n - n_test],
                 "test": order[n - n_test:]}
        dates = frame["postdate"].to_numpy()
        for code, name in enumerate(SPLITS):
            codes[parts[name]] = code
        return codes, {name: {"start": int(dates[rows[0]]), "end": int(dates[rows[-1]])} if len(rows) else None
                       for name, rows in parts.items()}
    sizes = frame.groupby("uid", sort=False).size()
    # A hash order is random-looking yet independent of seeds and of file order.
    users = sorted(sizes.index, key=lambda u: hashlib.sha256(str(u).encode()).hexdigest())
    filled, user_counts, split_of = [0, 0, 0], dict.fromkeys(SPLITS, 0), {}
    for user in users:
        code = 2 if filled[2] < n_test else 1 if filled[1] < n_val else 0
        split_of[user] = code
        filled[code] += int(sizes[user])
        user_counts[SPLITS[code]] += 1
    codes[:] = frame["uid"].map(split_of).to_numpy(dtype=np.int8) if n else codes
    return codes, {"users": user_counts}


# --------------------------------------------------------------------------------- images (Ray tasks)

class ImageError(Exception):
    """An image that cannot be used; the message is the reject reason."""


def read_image(fs: pafs.FileSystem, root: str, relative: str, real_root: str | None = None,
               max_bytes: int = MAXIMAGE_BYTES_COLUMN) -> bytes:
    """The raw bytes of ``root/relative`` on ``fs``; ImageError when missing, unreadable or too big.

    ``real_root`` (local folders only: the real path of ``root``) rejects a symlink that
    resolves outside the folder, a file that is not a regular file (a FIFO would block) and a file
    over ``max_bytes`` from its file info, before anything is read: a sparse 4.5 GB file costs
    nothing. On object storage the read itself stops after ``max_bytes + 1`` bytes (no extra
    request per image).
    """
    path = f"{root}/{relative}"
    if real_root is not None:
        _check_local_image(path, relative, real_root, max_bytes)
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    except OSError as err:
        if real_root is not None:   # a local file that passed the checks: its own problem (permissions)
            raise ImageError(f"image file {relative!r} cannot be read: {err}") from None
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise ImageError(f"image file {relative!r} does not exist") from None
        raise   # an unreadable existing object (or a storage outage) fails the task, which Ray retries
    if len(data) > max_bytes:
        raise ImageError(f"image file {relative!r} is larger than data.max_image_bytes={max_bytes}")
    return data


def _check_local_image(path: str, relative: str, real_root: str, max_bytes: int) -> None:
    full = os.path.realpath(path)
    if os.path.commonpath([real_root, full]) != real_root:
        raise ImageError(f"image path {relative!r} resolves outside the raw folder (symlink?)")
    try:
        info = os.stat(full)
    except OSError:
        raise ImageError(f"image file {relative!r} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"image file {relative!r} is not a regular file")
    if info.st_size > max_bytes:
        raise ImageError(f"image file {relative!r} is {info.st_size} bytes, larger than "
                         f"data.max_image_bytes={max_bytes}")


def fit_image(data: bytes, relative: str, max_side: int, quality: int, *,
              max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """JPEG bytes of an image, longest side <= max_side; ImageError when empty, corrupt, too big or
    not one of :data:`IMAGE_FORMATS`.

    Only those formats' decoders are tried: Pillow would otherwise hand an EPS file to
    Ghostscript (a PostScript interpreter fed untrusted input). ``max_pixels`` is checked from
    the header, before decoding: a 390 KB PNG of 13000x13000 would take 1.25 GB to decode.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 MP; our own, lower limit below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        with image:
            if image.width * image.height > max_pixels:
                raise ImageError(f"image {relative!r} is {image.width}x{image.height} pixels, more than the "
                                 f"limit of {max_pixels} pixels")
            if image.width == 0 or image.height == 0:
                raise ImageError(f"image {relative!r} is empty")
            if image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= max_side:
                image.load()   # decodes every byte: truncated files fail here, not later in training
                return data   # already what we store: keep the original bytes, no re-encode loss
            if image.format == "JPEG":
                # Decode at the smallest DCT scale (1/2 .. 1/8) still >= max_side: a large JPEG
                # then costs memory and time in proportion to what is kept, not to its pixels.
                image.draft("RGB", (max_side, max_side))
            image.load()
            rgb = _to_rgb(image)
    except UnidentifiedImageError:
        raise ImageError(f"image {relative!r} is not a {', '.join(IMAGE_FORMATS)} image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"image {relative!r} cannot be decoded: {err}") from None
    rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


#: Pillow modes of more than 8 bits per sample, and the value of their full scale.
_WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _to_rgb(image: Any) -> Any:
    """RGB of any decoded image. 16-bit (and 32-bit integer or float) grayscale is scaled to 8 bits
    rather than clipped: Pillow's ``convert("RGB")`` saturates every value above 255, so a 16-bit
    PNG would be stored nearly white."""
    from PIL import Image

    full_scale = _WIDE_MODES.get(image.mode)
    if full_scale is None:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    if image.mode in ("I", "F") and values.size and values.max() <= 255:
        full_scale = 255.0   # 8-bit values stored wide (PNG mode I with small values)
    gray = np.clip(np.rint(values / full_scale * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _read_images(raw_root: str, paths: list[str], max_bytes: int) -> list[bytes | ImageError]:
    """The bytes (or the ImageError) of each image of a batch, read by location."""
    fs, root = storage.resolve(raw_root)
    real_root = os.path.realpath(root) if isinstance(fs, pafs.LocalFileSystem) else None

    def fetch(relative: str) -> bytes | ImageError:
        try:
            return read_image(fs, root, relative, real_root, max_bytes)
        except ImageError as err:
            return err

    if real_root is not None or len(paths) < 2:
        return [fetch(p) for p in paths]
    with ThreadPoolExecutor(min(_FETCH_THREADS, len(paths))) as pool:
        return list(pool.map(fetch, paths))


def _batch_images(batch: pa.Table, raw_root: str, paths: list[str | None], max_bytes: int
                  ) -> list[bytes | ImageError]:
    """Each row's image: the bytes a table corpus carries (its ``_image_bytes``), else read from
    its path under ``raw_root``."""
    carried = batch.column(IMAGE_BYTES_COLUMN).to_pylist() if IMAGE_BYTES_COLUMN in batch.column_names else [None] * len(paths)
    wanted = [i for i, data in enumerate(carried) if data is None]
    read = iter(_read_images(raw_root, [paths[i] for i in wanted], max_bytes))
    out: list[bytes | ImageError] = []
    for data in carried:
        if data is None:
            out.append(next(read))
        elif len(data) > max_bytes:
            out.append(ImageError(f"image bytes ({len(data)}) are more than data.max_image_bytes={max_bytes}"))
        else:
            out.append(data)
    return out


def load_images(batch: pa.Table, *, raw_root: str, max_side: int, quality: int, collector: Any,
                max_bytes: int = MAXIMAGE_BYTES_COLUMN, keep_imageless: bool = False) -> pa.Table:
    """Ray Data UDF: metadata rows in, POSTS_SCHEMA rows with ``image`` out; bad images to ``collector``.

    ``raw_root`` is the raw folder's location; the images are read from it inside this task.
    ``keep_imageless`` also sends the metadata of each post with a bad image to the collector.
    """
    import ray

    paths = batch.column("image_path").to_pylist()
    images: list[bytes] = []
    keep: list[bool] = []
    rejects: list[dict] = []
    for i, (relative, data) in enumerate(zip(paths, _batch_images(batch, raw_root, paths, max_bytes), strict=True)):
        relative = relative if relative is not None else f"row {batch.column('row_index')[i].as_py()}"
        try:
            if isinstance(data, ImageError):
                raise data
            images.append(fit_image(data, relative, max_side, quality))
            keep.append(True)
        except ImageError as err:
            keep.append(False)
            rejects.append({"source_file": batch.column(SOURCE_COLUMN)[i].as_py(),
                            "row_index": batch.column("row_index")[i].as_py(), "pid": batch.column("pid")[i].as_py(),
                            "uid": batch.column("uid")[i].as_py(), "field": "image", "reason": str(err)})
    mask = pa.array(keep, pa.bool_())
    if rejects:
        imageless = None
        if keep_imageless:
            bad = batch.filter(pc.invert(mask)).select([n for n in POSTS_SCHEMA.names if n != "image"])
            imageless = bad.append_column("image", pa.array([b""] * len(bad), pa.binary())).to_pylist()
        ray.get(collector.add.remote(rejects, imageless))
    kept = batch.filter(mask)
    columns = [pa.array(images, pa.binary()) if f.name == "image" else kept.column(f.name) for f in POSTS_SCHEMA]
    return pa.Table.from_arrays(columns, schema=POSTS_SCHEMA)


def _collector_class():
    import ray

    @ray.remote(num_cpus=0)
    class RejectCollector:
        """Gathers image rejects from the tasks; keyed by (file, row) so task retries are harmless."""

        def __init__(self) -> None:
            self._rows: dict[tuple[str, int], dict] = {}
            self._imageless: dict[str, dict] = {}

        def add(self, rows: list[dict], imageless: list[dict] | None = None) -> None:
            for row in rows:
                self._rows[(row["source_file"], row["row_index"])] = row
            for post in imageless or ():
                self._imageless[post["pid"]] = post

        def rows(self) -> list[dict]:
            return list(self._rows.values())

        def imageless(self) -> list[dict]:
            return list(self._imageless.values())

    return RejectCollector


# --------------------------------------------------------------------------------- driver

#: What a prepare run owns in its folder, marker first (see :func:`smpp_ray.storage.swap_in`):
#: the stage's summary goes first (it describes the dataset being replaced) and the manifest,
#: which makes the folder a dataset, moves in last. Anything else in the folder is left alone.
_OUTPUT_ENTRIES = (SUMMARY_FILE, MANIFEST_FILE, "rejects", "imageless", "posts")


@contextmanager
def _staged_outputs(out: str) -> Iterator[str]:
    """A staging folder beside ``out`` for this run's outputs, deleted however the run ends.

    The previous dataset in ``out`` is untouched until the run swaps its finished outputs in,
    so a failed rerun leaves it byte-identical (its summary included)."""
    staging = storage.staging_location(out)
    try:
        yield staging
    finally:
        storage.remove(staging)


def _failed_location(out: str) -> str:
    """Where a failed run keeps its rejects: ``out`` itself, unless that holds a dataset (a
    manifest), which a failure must not touch; then ``<out>.failed`` beside it."""
    if storage.is_file(manifest_location(out)):
        return storage.join(storage.parent(out), f"{storage.name(out)}.failed")
    return out


def _keep_failed_rejects(staging: str, failed_at: str) -> None:
    """Move a failed run's rejects (only: no partial shards) to ``failed_at``."""
    storage.remove(storage.join(staging, "posts"))
    storage.swap_in(staging, failed_at, _OUTPUT_ENTRIES)


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

    folder = posts_path(out, split)
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


def _write_imageless(posts: list[dict], out: str) -> None:
    """The posts rejected for their image alone, in raw-file order (POSTS_SCHEMA, ``image`` empty)."""
    posts = sorted(posts, key=lambda r: (r["row_index"], r["pid"]))
    table = pa.Table.from_pylist(posts, schema=POSTS_SCHEMA)
    storage.write_bytes(storage.join(imageless_path(out), "part-00000.parquet"), _parquet_bytes(table))


def _write_rejects(rejects: list[dict], out: str) -> None:
    rejects = sorted(rejects, key=lambda r: (r["source_file"], r["row_index"]))
    rows = [{**r, "reason": _storable(r["reason"])} for r in rejects]
    table = pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)
    storage.write_bytes(storage.join(rejects_path(out), "part-00000.parquet"), _parquet_bytes(table))


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


def _reject_problem(input_rows: int, kept: int, rejects: list[dict], max_fraction: float, out: str) -> str | None:
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
            f"field: {_reject_summary(rejects)}. Every rejected row is in {rejects_path(out)!r}")


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
    with _staged_outputs(out) as staging:
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
        storage.swap_in(staging, out, _OUTPUT_ENTRIES)
    _log_done(manifest, out)
    return manifest


def _log_done(manifest: dict, out: str) -> None:
    counts = manifest["counts"]
    logger.info("prepare: %d rows in, %d written (%s), %d rejected, in %.1fs (%.0f rows/s) -> %s",
                counts["input_rows"], counts["written"], ", ".join(f"{k}={v}" for k, v in counts["per_split"].items()),
                counts["rejected"], manifest["run"]["seconds"], manifest["run"]["posts_per_s"], out)


@contextmanager
def image_collector() -> Iterator[Any]:
    """A started Ray with order-preserving Ray Data, and the actor the image tasks send their
    rejects (and imageless posts) to; see :func:`collected`."""
    import ray.data

    from smpp_ray.runtime import init_ray

    init_ray()
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True   # same rows in the same files on every rerun
    collector = _collector_class().remote()
    try:
        yield collector
    finally:
        context.execution_options.preserve_order = preserve
        ray.kill(collector)


def collected(collector: Any) -> tuple[list[dict], list[dict]]:
    """(image rejects, imageless posts) gathered by an :func:`image_collector`."""
    import ray

    return ray.get(collector.rows.remote()), ray.get(collector.imageless.remote())
