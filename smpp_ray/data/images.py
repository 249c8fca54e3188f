"""Images are untrusted input: reading one from the raw corpus (any location), checking it and
re-encoding it, on Ray Data tasks, with the rejects they find gathered by a small collector actor.

A file over ``max_image_bytes`` is rejected from its file info before it is read (on object
storage the read stops there), only the JPEG, PNG, WEBP, GIF and BMP decoders are tried, and an
image over :data:`MAX_IMAGE_PIXELS` is rejected from its header before decoding. Image paths must
resolve inside the raw folder: absolute paths and ``..`` are rejected; in a local raw folder,
symlinks that escape are rejected before reading (object stores have no symlinks). Rejects are
sent to the collector keyed by file and row, so a retried task cannot double-count.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from smpp_ray import storage
from smpp_ray.data.schema import (
    IMAGE_BYTES_COLUMN,
    POSTS_SCHEMA,
    SOURCE_COLUMN,
)

logger = logging.getLogger(__name__)

#: Concurrent image reads per task from object storage, where each read is a round trip.
_FETCH_THREADS = 16

#: Default of ``data.max_image_bytes``: a 20 MiB photo is already far above what SMPD holds.
MAXIMAGE_BYTES_COLUMN = 20 * 1024 * 1024

#: Images above 40 megapixels are rejected before decoding (Pillow's own limit is ~89 MP).
MAX_IMAGE_PIXELS = 40_000_000

#: The only decoders Pillow may try (EPS would run Ghostscript; others are rarely maintained).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

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
