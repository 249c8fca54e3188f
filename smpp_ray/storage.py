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

Whole outputs are swapped, not overwritten: a run writes into :func:`staging_location` (a hidden
folder beside its target, or inside it when the target is a mount point, so the swap never
copies across filesystems) and :func:`swap_in` makes the finished entries the target's.

Locally, when the target holds only entries the output owns, the two folders are exchanged in
one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``): a process killed at any moment, ``kill
-9`` included, leaves the whole old output or the whole new one. Otherwise (other entries in the
target, no ``renameat2``) each entry moves with one ``rename`` and a failed move puts the old
entries back. On object storage, which has no rename, the swap is copy-then-delete (a
server-side copy of each object, then the staging objects are deleted). Those two paths are not
one atomic step for the whole folder, so they order their work by marker: the entry that says
"complete" (``summary.json``, a manifest) is removed first and moved in last, and a reader who
checks the marker never takes a half-swapped folder for a whole one.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import IO, Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

#: Node-local cache of fetched objects (checkpoints, prototypes, pretrained weights).
CACHE_ENV = "SMPP_CACHE_DIR"
#: ``.<name><mark><id>``: a run's staging folder beside its target (hidden from folder readers).
STAGING_MARK = ".staging-"
#: ``.<name><mark><id>``: a complete previous output moved out of a stage's way (see set_aside).
PREVIOUS_MARK = ".previous-"


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


def relative_within(root: str, base: str, location: str) -> str:
    """``location`` relative to ``base`` (``../train/x``) when both lie inside ``root``, else
    ``location`` itself: references between folders of one tree survive moving or copying the
    tree, and a reference outside it keeps pointing where it did."""
    top = normalize(root).rstrip("/") + "/"
    here, there = normalize(base), normalize(location)
    if not (here + "/").startswith(top) or not there.startswith(top):
        return location
    # Both as absolute paths under the root ("/" + the rest): relpath never consults the cwd.
    return posixpath.relpath("/" + there[len(top):], "/" + (here + "/")[len(top):])


def resolve_reference(base: str, value: str) -> str:
    """A recorded location: absolute paths and URIs as they are, relative ones (``..`` included,
    as :func:`relative_within` writes them) from ``base``."""
    if is_uri(value) or value.startswith(("/", "file://")):
        return normalize(value)
    home = normalize(base)
    if not is_uri(home):
        return os.path.normpath(os.path.join(home, value))
    scheme, _, rest = home.partition("://")
    bucket, _, key = rest.partition("/")
    inside = posixpath.normpath(posixpath.join("/" + key, value))
    return f"{scheme}://{bucket}{inside}".rstrip("/")


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


def read_range(location: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a file from ``offset`` (one ranged request on object storage)."""
    with open_input(location) as stream:
        return stream.read_at(length, offset)


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


def list_folders(location: str) -> list[str]:
    """Sorted names of the folders directly inside a folder (empty when it does not exist)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


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


def _siblings(target: str, mark: str) -> list[str]:
    """Locations beside ``target`` named ``.<name><mark>*`` (staging or set-aside folders)."""
    loc = normalize(target)
    base = parent(loc)
    if base == loc:
        raise StorageError(f"{loc!r} has no parent folder to stage its output beside")
    prefix = f".{name(loc)}{mark}"
    return [join(base, n) for n in list_names(base) if n.startswith(prefix)]


#: A staging folder inside a target that is a mount point (see :func:`staging_location`).
INNER_STAGING = ".smpp-staging-"


def _is_mount_point(loc: str) -> bool:
    return not is_uri(loc) and os.path.isdir(loc) and os.path.ismount(loc)


def staging_location(target: str) -> str:
    """A fresh location to write ``target``'s next version into before :func:`swap_in`: beside it
    (``<parent>/.<name>.staging-<id>``), or inside it (``<target>/.smpp-staging-<id>``) when the
    target is a mount point, whose parent is another filesystem. Staging folders left by killed
    runs are removed first (one writer per target: :mod:`smpp_ray.locking`)."""
    loc = normalize(target)
    stale = _siblings(target, STAGING_MARK)
    if is_dir(loc):
        stale += [join(loc, n) for n in list_names(loc) if n.startswith(INNER_STAGING)]
    for folder in stale:
        logger.info("removing %s, left by an earlier run that did not finish", folder)
        remove(folder)
    if _is_mount_point(loc):
        return join(loc, f"{INNER_STAGING}{uuid.uuid4().hex[:8]}")
    return join(parent(loc), f".{name(loc)}{STAGING_MARK}{uuid.uuid4().hex[:8]}")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(first: str, second: str) -> bool:
    """Swap two local folders in one atomic step (``renameat2`` with ``RENAME_EXCHANGE``, Linux
    >= 3.15, glibc >= 2.28); False, with nothing changed, where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), first)


def _move(source: str, target: str) -> None:
    """Move a file or folder to a location that does not exist (same filesystem and scheme)."""
    fs, src = resolve(source)
    _, dst = resolve(target)
    if not is_uri(normalize(source)):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)   # one rename on the same filesystem (a sibling always is, but for mounts)
        return
    info = fs.get_file_info(src)
    if info.type == pafs.FileType.File:
        fs.copy_file(src, dst)   # a server-side copy (S3 CopyObject): no bytes through this process
    else:
        for found in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
            if found.type == pafs.FileType.File:
                fs.copy_file(found.path, dst + found.path[len(src):])
    remove(source)


def swap_in(staging: str, target: str, names: Sequence[str]) -> str:
    """Make ``staging``'s entries ``names`` the target's, then delete ``staging``; returns ``target``.

    ``names`` are every entry the output owns, marker first: each is removed from ``target``
    in that order (so an entry the new output lacks never survives from the old one), then the
    staged ones move in in reverse order (the marker last). Entries of ``target`` not named are
    left alone. Locally, when both folders hold owned entries only, they are exchanged in one
    atomic step (:func:`exchange`) and the old one deleted; otherwise the old entries are renamed
    into the staging folder and deleted with it (put back when a move in fails). On object
    storage they are deleted and the new ones copied (see the module docstring)."""
    staged, out = normalize(staging), make_dir(target)
    owned = set(names)
    if (not is_uri(out) and set(list_names(out)) <= owned and set(list_names(staged)) <= owned
            and exchange(staged, out)):
        remove(staged)   # now the previous output
        return out
    trash = join(staged, ".replaced")
    for entry in names:
        if exists(join(out, entry)):
            if is_uri(out):
                remove(join(out, entry))
            else:
                _move(join(out, entry), join(trash, entry))
    moved: list[str] = []
    try:
        for entry in reversed(names):
            if exists(join(staged, entry)):
                _move(join(staged, entry), join(out, entry))
                moved.append(entry)
    except BaseException:
        if not is_uri(out):   # put the previous output back as it was
            logger.warning("swapping %s into %s failed: putting the previous entries back", staged, out)
            for entry in moved:
                remove(join(out, entry))
            for entry in names:
                if exists(join(trash, entry)):
                    _move(join(trash, entry), join(out, entry))
        raise
    remove(staged)
    return out


def set_aside(target: str) -> str | None:
    """Move everything at ``target`` out of a rerun's way, to ``<parent>/.<name>.previous-<id>``.

    Returns that location, for :func:`put_back` when the rerun fails or :func:`remove` when it
    succeeds; None when ``target`` holds nothing."""
    loc = normalize(target)
    entries = list_names(loc)
    if not entries:
        return None
    aside = join(parent(loc), f".{name(loc)}{PREVIOUS_MARK}{uuid.uuid4().hex[:8]}")
    if is_uri(loc):
        swap_in(loc, aside, entries)   # copies every object across, then deletes the originals
    else:
        _move(loc, aside)
    return aside


def set_aside_folders(target: str) -> list[str]:
    """Folders set aside beside ``target`` (by :func:`set_aside`) and not yet put back or removed."""
    return _siblings(target, PREVIOUS_MARK)


def put_back(aside: str, target: str) -> str:
    """Replace whatever is at ``target`` with the folder :func:`set_aside` moved away."""
    remove(target)
    if is_uri(normalize(target)):
        return swap_in(aside, target, list_names(aside))
    _move(aside, target)
    return normalize(target)


#: Files whose bytes a fingerprint hashes (metadata, labels, text tables, summaries): there a size
#: and an mtime can lie (an edit that keeps the size within an object store's one-second mtimes, a
#: copy with ``cp -p`` or ``rsync -t`` of another version). Images, Parquet and other bulk files
#: are identified by size and mtime: a prepared SMPD is ~24 GB of Parquet that every downstream
#: stage would re-hash on each run (their pages carry CRCs, and every stage folder this tool writes
#: has a new ``summary.json``, which is hashed).
FINGERPRINT_CONTENT_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".tsv", ".yaml", ".yml")
#: A file above this size is identified by size and mtime whatever its suffix.
FINGERPRINT_CONTENT_MAX_BYTES = 512 << 20


def fingerprint(location: str) -> str:
    """What identifies the contents of a file or folder: the relative name and size of each file,
    with the SHA-256 of its bytes for metadata and table files (:data:`FINGERPRINT_CONTENT_SUFFIXES`)
    and the mtime for the rest.

    Not the path: a file edited in place changes it, a folder moved or copied does not. A missing
    location has the fingerprint of an empty folder.
    """
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        files = [info]
    elif info.type == pafs.FileType.Directory:
        files = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    else:
        files = []
    entries = sorted((i.path[len(path):].lstrip("/"), i.size, _content_or_mtime(fs, i)) for i in files)
    return hashlib.sha256(json.dumps(entries, default=str).encode()).hexdigest()[:20]


def _content_or_mtime(fs: pafs.FileSystem, info: pafs.FileInfo) -> str:
    if info.path.lower().endswith(FINGERPRINT_CONTENT_SUFFIXES) and (info.size or 0) <= FINGERPRINT_CONTENT_MAX_BYTES:
        with fs.open_input_stream(info.path) as stream:
            return "sha256:" + _stream_digest(stream)
    return f"mtime:{info.mtime_ns}"


def file_digest(location: str) -> str:
    """SHA-256 of a file at any location, streamed (what an artifact's recorded digest is checked
    against)."""
    with open_input(location) as stream:
        return _stream_digest(stream)


def _stream_digest(stream: Any) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


#: Parquet written with a CRC per data page (``write_page_checksum``) and read with the check on:
#: flipped bytes in a page fail the read instead of turning into values (e.g. ~4e22).
PARQUET_CHECKSUM_WRITE = {"write_page_checksum": True}


def parquet_scan_options() -> Any:
    """``pyarrow.dataset`` scan options that verify the pages' CRCs."""
    import pyarrow.dataset as pads

    return pads.ParquetFragmentScanOptions(page_checksum_verification=True)


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
