"""Locations: the one module that turns a path or URI into files.

A location is a local path, ``file://...``, ``s3://bucket/key``, ``gs://bucket/key`` or anything
else ``pyarrow.fs`` resolves; every other module passes locations around as plain strings and
reads and writes through these functions, so the same code runs on a laptop and on a cluster
whose nodes share nothing but object storage. Local paths are made absolute (Ray workers and
Tune trials run in other working folders). Credentials and endpoints come from the standard
variables pyarrow reads (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS).

Writes are atomic per file: a local file is written beside its target and renamed over it, an
object-store PUT is atomic by itself. A stage is complete when its ``summary.json`` exists, and
that file is always written last (see :mod:`smpp_ray.stages`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import IO, Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

#: Node-local cache of fetched objects (checkpoints, prototypes, pretrained weights).
CACHE_ENV = "SMPP_CACHE_DIR"


class StorageError(ValueError):
    """A location that cannot be read or written (missing file, unknown scheme, bad URI)."""


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` locations other than ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def normalize(location: str | os.PathLike[str]) -> str:
    """The canonical form: URIs without a trailing ``/``, local paths (and ``file://``) absolute."""
    text = os.fspath(location)
    if not text:
        raise StorageError("empty location")
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_uri(text):
        scheme, _, rest = text.partition("://")
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else f"{scheme}://{rest}"
    return os.path.abspath(os.path.expanduser(text))


def join(location: str, *parts: str) -> str:
    """``location/part/...``; never folds ``s3://`` into ``s3:/`` as ``pathlib`` does."""
    base = normalize(location)
    pieces = [p.strip("/") for p in parts if p and p.strip("/")]
    return "/".join([base.rstrip("/"), *pieces]) if pieces else base


def parent(location: str) -> str:
    base = normalize(location)
    head, _, _ = base.rstrip("/").rpartition("/")
    return head if not is_uri(base) or "://" in head else base


def name(location: str) -> str:
    """The last component (file or folder name)."""
    return normalize(location).rstrip("/").rpartition("/")[2]


@lru_cache(maxsize=32)
def _filesystem(scheme_and_authority: str, endpoint: str) -> pafs.FileSystem:
    # ``endpoint`` is only part of the key: pyarrow reads AWS_ENDPOINT_URL itself, when created
    return pafs.FileSystem.from_uri(scheme_and_authority + "/")[0]


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path inside it."""
    loc = normalize(location)
    if not is_uri(loc):
        return pafs.LocalFileSystem(), loc
    scheme, _, rest = loc.partition("://")
    bucket = rest.split("/", 1)[0]
    try:
        fs = _filesystem(f"{scheme}://{bucket}", os.environ.get("AWS_ENDPOINT_URL", ""))
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"cannot open {loc!r}: {err}") from err
    return fs, rest.rstrip("/")


def _info(location: str) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    """A folder; on object storage, any prefix that holds at least one object."""
    return _info(location).type == pafs.FileType.Directory


def size(location: str) -> int:
    info = _info(location)
    if info.type != pafs.FileType.File:
        raise StorageError(f"{normalize(location)!r} is not a file")
    return int(info.size)


def _missing(location: str) -> StorageError:
    return StorageError(f"no such file: {normalize(location)!r}")


@contextmanager
def open_input(location: str) -> Iterator[IO[bytes]]:
    """A seekable binary stream of a file (pyarrow's random-access file)."""
    fs, path = resolve(location)
    try:
        stream = fs.open_input_file(path)
    except FileNotFoundError as err:
        raise _missing(location) from err
    except OSError as err:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise _missing(location) from err
        raise
    with stream:
        yield stream


def read_bytes(location: str) -> bytes:
    with open_input(location) as stream:
        return stream.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str) -> Any:
    return json.loads(read_text(location))


def write_bytes(location: str, data: bytes) -> str:
    """Write a whole file atomically; returns the normalised location."""
    loc = normalize(location)
    fs, path = resolve(loc)
    if is_uri(loc):
        with fs.open_output_stream(path) as stream:  # a single PUT: readers see all or nothing
            stream.write(data)
        return loc
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return loc


def write_text(location: str, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def write_json(location: str, value: Any, *, indent: int | None = 2) -> str:
    """JSON with NaN/inf refused (they are not JSON): the writer must turn them into null."""
    return write_text(location, json.dumps(value, indent=indent, allow_nan=False, default=str) + "\n")


def make_dir(location: str) -> str:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    return normalize(location)


def list_files(location: str, *, suffix: str = "", recursive: bool = True) -> list[str]:
    """Sorted locations of the files under a folder (empty when it does not exist)."""
    loc = normalize(location)
    fs, path = resolve(loc)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    found = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)]
    return sorted(_relocate(loc, path, p) for p in found)


def list_names(location: str) -> list[str]:
    """Sorted names directly inside a folder (files and folders)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def list_parquet_files(location: str) -> list[str]:
    """Sorted Parquet files under a folder, recursively; empty when the folder is missing."""
    return list_files(location, suffix=".parquet")


def _relocate(location: str, fs_path: str, found: str) -> str:
    """A filesystem path found under ``fs_path`` as a location of the same scheme."""
    relative = found[len(fs_path):].lstrip("/")
    return join(location, relative)


def remove(location: str) -> None:
    """Delete a file or a folder with everything in it; missing is fine."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def reset_dir(location: str) -> None:
    """``location`` as an empty folder (a rerun overwrites cleanly instead of adding files)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)
    else:
        fs.create_dir(path, recursive=True)


def copy_file(source: str, target: str) -> str:
    return write_bytes(target, read_bytes(source))


def upload_dir(local_dir: str, location: str) -> str:
    """Copy a local folder's files to ``location`` (replacing what was there)."""
    target = normalize(location)
    if normalize(local_dir) == target:
        return target
    reset_dir(target)
    fs, path = resolve(target)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return target


def download_dir(location: str, local_dir: str) -> str:
    """Copy the files under ``location`` into a local folder (created)."""
    source = normalize(location)
    fs, path = resolve(source)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise StorageError(f"no such folder: {source!r}")
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def cache_root() -> str:
    """This node's cache of fetched objects: ``$SMPP_CACHE_DIR`` or ``~/.cache/smpp_ray``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "smpp_ray")


def _version_key(location: str) -> str:
    """What identifies one version of a remote file or folder: names, sizes and mtimes."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        entries = [(info.path, info.size, info.mtime_ns)]
    else:
        entries = [(i.path, i.size, i.mtime_ns) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File]
    return hashlib.sha256(json.dumps([normalize(location), sorted(entries)], default=str).encode()).hexdigest()[:20]


def local_copy(location: str) -> str:
    """A local path holding ``location`` (a file or a folder): itself when local, else a copy in
    this node's cache, fetched once per version (name, size and mtime of every file) and reused
    by every process on the node. The copy is made under a temporary name and renamed, so a
    reader never sees a half-fetched one."""
    loc = normalize(location)
    if not is_uri(loc):
        if not os.path.exists(loc):
            raise _missing(loc)
        return loc
    info = _info(loc)
    if info.type == pafs.FileType.NotFound:
        raise _missing(loc)
    target = os.path.join(cache_root(), _version_key(loc), name(loc))
    if os.path.exists(target):
        return target
    staging = tempfile.mkdtemp(prefix=".fetch-", dir=_ensure_dir(os.path.dirname(target)))
    try:
        staged = os.path.join(staging, name(loc))
        if info.type == pafs.FileType.File:
            with open(staged, "wb") as handle:
                handle.write(read_bytes(loc))
        else:
            download_dir(loc, staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not os.path.exists(target):  # not another process winning the same race
                raise
        logger.info("fetched %s into the node cache (%s)", loc, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
