"""``smpp prepare``: a raw SMPD folder -> Parquet shards, rejects and a manifest (a Ray Data job).

The driver reads the small row-aligned JSON/text files (:mod:`smpp_ray.data.smpd`), validates
every field, removes duplicate Pids, derives the taxonomy and assigns splits; it never opens an
image. Each split's metadata rows then flow through Ray Data ``map_batches`` tasks that read,
check, resize and re-encode the images, and ``write_parquet`` writes the shards from the workers::

    DATA/posts/split={train,val,test}/part-*.parquet   exactly POSTS_SCHEMA
    DATA/rejects/part-00000.parquet                    REJECTS_SCHEMA: one row per rejected input row
    DATA/manifest.json                                 see smpp_ray.data.manifest

Nothing is lost: every input row is either written or rejected with its file, row, field and
reason (``input_rows == written + rejected`` is checked before the manifest is written). Images
rejected inside the Ray tasks are sent to a small collector actor (keyed by file and row, so a
retried task cannot double-count). Image paths must resolve inside the raw folder: absolute paths
and ``..`` are rejected by the driver; in a local raw folder, symlinks that escape are rejected by
the tasks before reading (object stores have no symlinks).

Both folders are locations (:mod:`smpp_ray.storage`): a local path, or an ``s3://`` / ``gs://``
prefix. Each image task resolves the raw folder's filesystem itself and reads its images by
location, so on a cluster the raw posts need only be on storage every node reaches (a local raw
folder must then be mounted on every node).

Rerunning into the same folder first removes the previous ``posts/``, ``rejects/`` and manifest,
and writes with row order preserved and deterministic file names, so a rerun gives the same shards.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.data import smpd
from smpp_ray.data.manifest import manifest_location, write_manifest
from smpp_ray.data.schema import (
    POSTS_SCHEMA,
    REJECTS_SCHEMA,
    SCHEMA_VERSION,
    SPLITS,
    Taxonomy,
    posts_path,
    rejects_path,
)
from smpp_ray.data.taxonomy_names import default_taxonomy

logger = logging.getLogger(__name__)

#: Rows per Ray Data block of metadata: small enough that a 2-core machine gets parallel tasks.
_BLOCK_ROWS = 128
#: Hidden column carrying the image-list file name of a row into the image tasks (for rejects).
_SOURCE_COLUMN = "_img_source"
#: Driver-only keys of a record (not columns): its category file (for class rejects) and prefix.
_CATEGORY_FILE = "_category_file"
_PREFIX = "_prefix"
#: Concurrent image reads per task from object storage, where each read is a round trip.
_FETCH_THREADS = 16
#: Log parsing progress every this many rows (the real corpus has ~300k).
_LOG_EVERY = 50_000
_META_SCHEMA = pa.schema([f for f in POSTS_SCHEMA if f.name != "image"] + [pa.field(_SOURCE_COLUMN, pa.string())])


# --------------------------------------------------------------------------------- taxonomy

def build_taxonomy(pairs: list[tuple[str, str]]) -> Taxonomy:
    """The taxonomy of the (category, subcategory) pairs seen in the data.

    When every name is one of :data:`SMPD_TAXONOMY` and under its usual category, this is the
    full default taxonomy (stable 11/77 ids even if a small corpus misses some classes).
    Otherwise it is exactly the names in the data: known names in the default order, unknown
    ones appended in order of first appearance; a subcategory's parent is the category it
    appears under most often (first seen on ties).
    """
    default = default_taxonomy()
    counts: dict[str, Counter] = {}
    for category, subcategory in pairs:
        counts.setdefault(subcategory, Counter())[category] += 1
    parent_name = {s: max(c.items(), key=lambda kv: kv[1])[0] for s, c in counts.items()}  # first max wins
    default_parent = {s: default.categories[p] for s, p in zip(default.subcategories, default.parents, strict=True)}
    if all(default_parent.get(s) == c for s, c in parent_name.items()):
        return default
    seen_categories = list(dict.fromkeys(c for c, _ in pairs))
    categories = [c for c in default.categories if c in seen_categories]
    categories += [c for c in seen_categories if c not in categories]
    subcategories = [s for s in default.subcategories if s in parent_name]
    subcategories += [s for s in parent_name if s not in subcategories]
    parents = [categories.index(parent_name[s]) for s in subcategories]
    return Taxonomy(tuple(categories), tuple(subcategories), tuple(parents))


def _assign_class_ids(records: list[dict], taxonomy: Taxonomy
                      ) -> tuple[list[dict], list[dict], list[str]]:
    """Set category/subcategory/concept ids; rows whose category contradicts the taxonomy are rejected."""
    cat_id = {n: i for i, n in enumerate(taxonomy.categories)}
    sub_id = {n: i for i, n in enumerate(taxonomy.subcategories)}
    concepts = sorted({r["concept"] for r in records if r["concept"] is not None})
    concept_id = {n: i for i, n in enumerate(concepts)}
    kept, rejects = [], []
    for r in records:
        category, subcategory = r["category"], r["subcategory"]
        r["category_id"] = cat_id.get(category, -1) if category is not None else -1
        r["subcategory_id"] = sub_id.get(subcategory, -1) if subcategory is not None else -1
        r["concept_id"] = concept_id.get(r["concept"], -1) if r["concept"] is not None else -1
        if r["subcategory_id"] >= 0 and taxonomy.parents[r["subcategory_id"]] != r["category_id"]:
            parent = taxonomy.categories[taxonomy.parents[r["subcategory_id"]]]
            rejects.append(_reject(r, r[_CATEGORY_FILE], "Category",
                                   f"category {category!r} disagrees with {parent!r}, the parent of "
                                   f"subcategory {subcategory!r}"))
            continue
        kept.append(r)
    return kept, rejects, concepts


def _reject(record: dict, source_file: str, field: str, reason: str) -> dict:
    return {"source_file": source_file, "row_index": record["row_index"], "pid": record["pid"],
            "uid": record["uid"], "field": field, "reason": reason}


# --------------------------------------------------------------------------------- splits

def assign_splits(labelled: list[dict], method: str, val_fraction: float, test_fraction: float
                  ) -> tuple[dict[str, list[dict]], dict]:
    """Split labelled posts by time (chronological) or by user; returns rows per split and boundaries."""
    if method not in ("time", "user"):
        raise ValueError(f"unknown split method {method!r}; expected 'time' or 'user'")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction!r} and test_fraction {test_fraction!r} must be in [0, 1) "
                         "and sum to < 1")
    n = len(labelled)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if method == "time":
        ordered = sorted(labelled, key=lambda r: (r["postdate"], r["pid"]))
        parts = {"train": ordered[: n - n_val - n_test], "val": ordered[n - n_val - n_test: n - n_test],
                 "test": ordered[n - n_test:]}
        boundaries = {s: {"start": rows[0]["postdate"], "end": rows[-1]["postdate"]} if rows else None
                      for s, rows in parts.items()}
        return parts, boundaries
    by_user: dict[str, list[dict]] = {}
    for r in labelled:
        by_user.setdefault(r["uid"], []).append(r)
    # A hash order is random-looking yet independent of seeds and of file order.
    users = sorted(by_user, key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    parts = {s: [] for s in SPLITS}
    user_counts = dict.fromkeys(SPLITS, 0)
    for u in users:
        split = ("test" if len(parts["test"]) < n_test else "val" if len(parts["val"]) < n_val else "train")
        parts[split].extend(by_user[u])
        user_counts[split] += 1
    return parts, {"users": user_counts}


# --------------------------------------------------------------------------------- images (Ray tasks)

class ImageError(Exception):
    """An image that cannot be used; the message is the reject reason."""


def read_image(fs: pafs.FileSystem, root: str, relative: str, real_root: str | None = None) -> bytes:
    """The raw bytes of ``root/relative`` on ``fs``; ImageError when it does not exist.

    ``real_root`` (local folders only: the real path of ``root``) rejects a symlink that
    resolves outside the folder before anything is read.
    """
    path = f"{root}/{relative}"
    if real_root is not None:
        full = os.path.realpath(path)
        if os.path.commonpath([real_root, full]) != real_root:
            raise ImageError(f"image path {relative!r} resolves outside the raw folder (symlink?)")
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except OSError:
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise ImageError(f"image file {relative!r} does not exist") from None
        raise   # an unreadable existing file (or a storage outage) fails the task, which Ray retries


def fit_image(data: bytes, relative: str, max_side: int, quality: int) -> bytes:
    """JPEG bytes of an image, longest side <= max_side; ImageError when empty or corrupt."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()   # decodes every byte: truncated files fail here, not later in training
            if image.width == 0 or image.height == 0:
                raise ImageError(f"image {relative!r} is empty")
            if image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= max_side:
                return data   # already what we store: keep the original bytes, no re-encode loss
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"image {relative!r} cannot be decoded: {err}") from None
    rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _read_images(raw_root: str, paths: list[str]) -> list[bytes | ImageError]:
    """The bytes (or the ImageError) of each image of a batch, read by location."""
    fs, root = storage.resolve(raw_root)
    real_root = os.path.realpath(root) if isinstance(fs, pafs.LocalFileSystem) else None

    def fetch(relative: str) -> bytes | ImageError:
        try:
            return read_image(fs, root, relative, real_root)
        except ImageError as err:
            return err

    if real_root is not None or len(paths) < 2:
        return [fetch(p) for p in paths]
    with ThreadPoolExecutor(min(_FETCH_THREADS, len(paths))) as pool:
        return list(pool.map(fetch, paths))


def load_images(batch: pa.Table, *, raw_root: str, max_side: int, quality: int, collector: Any) -> pa.Table:
    """Ray Data UDF: metadata rows in, POSTS_SCHEMA rows with ``image`` out; bad images to ``collector``.

    ``raw_root`` is the raw folder's location; the images are read from it inside this task.
    """
    import ray

    paths = batch.column("image_path").to_pylist()
    images: list[bytes] = []
    keep: list[bool] = []
    rejects: list[dict] = []
    for i, (relative, data) in enumerate(zip(paths, _read_images(raw_root, paths), strict=True)):
        try:
            if isinstance(data, ImageError):
                raise data
            images.append(fit_image(data, relative, max_side, quality))
            keep.append(True)
        except ImageError as err:
            keep.append(False)
            rejects.append({"source_file": batch.column(_SOURCE_COLUMN)[i].as_py(),
                            "row_index": batch.column("row_index")[i].as_py(), "pid": batch.column("pid")[i].as_py(),
                            "uid": batch.column("uid")[i].as_py(), "field": "image", "reason": str(err)})
    if rejects:
        ray.get(collector.add.remote(rejects))
    kept = batch.filter(pa.array(keep, pa.bool_()))
    columns = [pa.array(images, pa.binary()) if f.name == "image" else kept.column(f.name) for f in POSTS_SCHEMA]
    return pa.Table.from_arrays(columns, schema=POSTS_SCHEMA)


def _collector_class():
    import ray

    @ray.remote(num_cpus=0)
    class RejectCollector:
        """Gathers image rejects from the tasks; keyed by (file, row) so task retries are harmless."""

        def __init__(self) -> None:
            self._rows: dict[tuple[str, int], dict] = {}

        def add(self, rows: list[dict]) -> None:
            for row in rows:
                self._rows[(row["source_file"], row["row_index"])] = row

        def rows(self) -> list[dict]:
            return list(self._rows.values())

    return RejectCollector


# --------------------------------------------------------------------------------- driver

def _read_raw(raw: str) -> tuple[list[smpd.FileSet], list[dict], list[dict]]:
    """Parse every row of every file set; returns the sets, the post records and the rejects."""
    sets = [s for s in (smpd.find_file_set(raw, p) for p in smpd.PREFIXES) if s is not None]
    if not sets:
        expected = "; ".join(" or ".join(n.format(p="train_") for n in names) for names in smpd.FILE_NAMES.values())
        raise ValueError(f"raw SMPD folder {raw!r} holds neither train_ nor test_ files; expected {expected} "
                         "(or the same with the test_ prefix)")
    for file_set in sets:   # every set's files checked before any row is parsed
        smpd.load_file_set(file_set)
    records: list[dict] = []
    rejects: list[dict] = []
    first_seen: dict[str, tuple[str, int]] = {}
    started = time.perf_counter()
    for file_set in sets:
        text_name, img_name = file_set.name("text"), file_set.name("img_filepath")
        for i in range(file_set.num_rows):
            record, reject = smpd.parse_row(file_set, i)
            if reject is not None:
                rejects.append(reject)
                continue
            previous = first_seen.get(record["pid"])
            if previous is not None:
                rejects.append(_reject(record, text_name, "Pid", f"duplicate Pid {record['pid']!r} "
                                       f"(first at row {previous[1]} of {previous[0]})"))
                continue
            first_seen[record["pid"]] = (text_name, i)
            if record["user_description"] is not None:
                record["user_description"] = np.asarray(record["user_description"], np.float32)
            record[_SOURCE_COLUMN] = img_name
            record[_CATEGORY_FILE] = file_set.name("category")
            record[_PREFIX] = file_set.prefix
            if len(records) % _LOG_EVERY == 0 and records:
                logger.info("prepare: parsed %d rows (%.0f rows/s)", len(records) + len(rejects),
                            (len(records) + len(rejects)) / max(time.perf_counter() - started, 1e-9))
            records.append(record)
        file_set.rows.clear()   # the raw JSON is the bulk of driver memory; parsed rows suffice now
    return sets, records, rejects


def _clear_outputs(out: str) -> None:
    storage.remove(storage.join(out, "posts"))
    storage.remove(rejects_path(out))
    storage.remove(manifest_location(out))


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


def _write_split(rows: list[dict], split: str, out: str, raw: str, *, max_side: int,
                 quality: int, rows_per_shard: int, collector: Any) -> int:
    import ray.data
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        """``part-<task>-<i>.parquet``: deterministic, so a rerun rewrites the same names."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}"

    folder = posts_path(out, split)
    fs, path = storage.resolve(folder)
    started = time.perf_counter()
    if rows:
        table = pa.Table.from_pylist(rows, schema=_META_SCHEMA)
        blocks = [table.slice(i, _BLOCK_ROWS) for i in range(0, len(table), _BLOCK_ROWS)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            load_images, batch_format="pyarrow", batch_size=None, num_cpus=1,
            fn_kwargs={"raw_root": raw, "max_side": max_side, "quality": quality, "collector": collector})
        dataset.write_parquet(path, filesystem=fs, schema=POSTS_SCHEMA, filename_provider=PartNames(),
                              min_rows_per_file=rows_per_shard, max_rows_per_file=rows_per_shard,
                              mode=ray.data.SaveMode.OVERWRITE)
    written = _count_rows(folder)
    if written == 0:   # an empty split still gets a file, so readers see the schema
        storage.write_bytes(storage.join(folder, "part-00000-0.parquet"), _parquet_bytes(POSTS_SCHEMA.empty_table()))
    seconds = time.perf_counter() - started
    logger.info("prepare: split=%s wrote %d of %d posts in %.1fs (%.0f rows/s)", split, written, len(rows),
                seconds, len(rows) / max(seconds, 1e-9))
    return written


def _write_rejects(rejects: list[dict], out: str) -> None:
    rejects = sorted(rejects, key=lambda r: (r["source_file"], r["row_index"]))
    table = pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA)
    storage.write_bytes(storage.join(rejects_path(out), "part-00000.parquet"), _parquet_bytes(table))


def prepare_dataset(raw_dir: str, out_dir: str, *, split: str = "time",
                    val_fraction: float = 0.1, test_fraction: float = 0.1, max_image_side: int = 256,
                    jpeg_quality: int = 90, rows_per_shard: int = 2048) -> dict:
    """Turn a raw SMPD folder into Parquet shards + rejects + manifest; returns the manifest.

    ``raw_dir`` and ``out_dir`` are locations (local paths or ``s3://`` / ``gs://`` URIs).
    Raises ValueError naming the folder or file on bad usage (missing folder or required file,
    malformed file, files of different lengths, bad split arguments) before any work.
    """
    import ray

    from smpp_ray.runtime import init_ray

    raw, out = storage.normalize(raw_dir), storage.normalize(out_dir)
    if not storage.is_dir(raw):
        raise ValueError(f"raw SMPD folder {raw!r} does not exist or is not a directory")
    if split not in ("time", "user"):
        raise ValueError(f"unknown split method {split!r}; expected 'time' or 'user'")
    if max_image_side < 16 or not 1 <= jpeg_quality <= 100 or rows_per_shard < 1:
        raise ValueError(f"bad image/shard settings: max_image_side={max_image_side!r} (>= 16), "
                         f"jpeg_quality={jpeg_quality!r} (1..100), rows_per_shard={rows_per_shard!r} (>= 1)")
    assign_splits([], split, val_fraction, test_fraction)   # validates the fractions up front
    started = time.perf_counter()
    sets, records, rejects = _read_raw(raw)
    input_rows = len(records) + len(rejects)
    logger.info("prepare: parsed %d rows (%d rejected) from %s in %.1fs", input_rows, len(rejects), raw,
                time.perf_counter() - started)
    taxonomy = build_taxonomy([(r["category"], r["subcategory"]) for r in records
                               if r["category"] is not None and r["subcategory"] is not None])
    records, class_rejects, concepts = _assign_class_ids(records, taxonomy)
    rejects += class_rejects
    # Only labelled train_ posts are split; test_ posts (the challenge's test set) are all test.
    labelled = [r for r in records if r["label"] is not None and r[_PREFIX] == "train_"]
    parts, boundaries = assign_splits(labelled, split, val_fraction, test_fraction)
    parts["test"] = parts["test"] + [r for r in records if r["label"] is None or r[_PREFIX] != "train_"]
    for name in SPLITS:
        parts[name].sort(key=lambda r: (r["postdate"], r["pid"]))

    init_ray()
    _clear_outputs(out)
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True   # same rows in the same files on every rerun
    collector = _collector_class().remote()
    try:
        per_split = {name: _write_split(parts[name], name, out, raw, max_side=max_image_side,
                                        quality=jpeg_quality, rows_per_shard=rows_per_shard, collector=collector)
                     for name in SPLITS}
        image_rejects = ray.get(collector.rows.remote())
    finally:
        context.execution_options.preserve_order = preserve
        ray.kill(collector)
    rejects += image_rejects
    _write_rejects(rejects, out)
    written = sum(per_split.values())
    if input_rows != written + len(rejects):
        raise RuntimeError(f"prepare lost rows: {input_rows} in, {written} written + {len(rejects)} rejected")
    bad_images = {(r["source_file"], r["row_index"]) for r in image_rejects}
    dates = [r["postdate"] for r in records if (r[_SOURCE_COLUMN], r["row_index"]) not in bad_images]
    seconds = time.perf_counter() - started
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "raw_dir": raw,
        "files": {s.prefix.rstrip("_"): {k: s.name(k) for k in s.files} for s in sets},
        "counts": {"input_rows": input_rows, "written": written, "rejected": len(rejects), "per_split": per_split,
                   "rejected_by_field": dict(sorted(Counter(r["field"] for r in rejects).items()))},
        "taxonomy": taxonomy.to_dict(),
        "concepts": concepts,
        "split": {"method": split, "val_fraction": val_fraction, "test_fraction": test_fraction,
                  "boundaries": boundaries,
                  "unlabelled_test_rows": sum(r["label"] is None for r in records)},
        "time_range": {"start": min(dates), "end": max(dates)} if dates else {"start": None, "end": None},
        "image": {"max_side": max_image_side, "jpeg_quality": jpeg_quality},
        "rows_per_shard": rows_per_shard,
        "run": {"seconds": round(seconds, 2), "posts_per_s": round(input_rows / max(seconds, 1e-9), 1)},
    }
    write_manifest(out, manifest)
    logger.info("prepare: %d rows in, %d written (%s), %d rejected, in %.1fs (%.0f rows/s) -> %s", input_rows,
                written, ", ".join(f"{k}={v}" for k, v in per_split.items()), len(rejects), seconds,
                manifest["run"]["posts_per_s"], out)
    return manifest
