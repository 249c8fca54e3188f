"""Content digests of the artifacts a later stage or a scorer consumes: the one owner of the
manifest format.

A manifest (``smpp_digests.json`` in the folder it describes) maps each covered file, by its
path relative to the folder, to the SHA-256 of its bytes. The writer of an artifact writes it
last (after every file it names); the reader checks it before using a byte. A mismatch or a
missing file is a ``ValueError`` naming the file (exit 2 on the command line): a flipped bit in a
model or a projection matrix must stop the run, not move a score. Folders written before
manifests existed have none and are read as they are.

Checkpoints carry their digest in their own ``meta.json`` (:mod:`smpp_ray.model.checkpoint`);
feature Parquet pages carry CRCs (:data:`smpp_ray.storage.PARQUET_CHECKSUM_WRITE`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from smpp_ray import storage

MANIFEST_FILE = "smpp_digests.json"
FORMAT = "smpp-digests"


def write_manifest(folder: str, names: Iterable[str] | None = None) -> dict[str, str]:
    """Record the digests of ``names`` (paths relative to ``folder``; default: every file under
    it) in ``folder``'s manifest, replacing an earlier one; returns the recorded digests."""
    folder = storage.normalize(folder)
    if names is None:
        names = [_relative(folder, f) for f in storage.list_files(folder, recursive=True)]
    digests = {name: storage.file_digest(storage.join(folder, name))
               for name in sorted(set(names)) if name != MANIFEST_FILE}
    storage.write_text(storage.join(folder, MANIFEST_FILE),
                       json.dumps({"format": FORMAT, "sha256": digests}, indent=1, sort_keys=True))
    return digests


def verify_manifest(folder: str, shown: str | None = None) -> int:
    """Check every file ``folder``'s manifest names; returns how many (0: no manifest).

    ``shown`` is the folder's location as the user knows it, named in the error (``folder`` may
    be this node's cached copy of it)."""
    folder = storage.normalize(folder)
    location = storage.join(folder, MANIFEST_FILE)
    if not storage.is_file(location):
        return 0
    where = storage.normalize(shown) if shown else folder
    try:
        recorded = json.loads(storage.read_text(location))["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{storage.join(where, MANIFEST_FILE)} is damaged ({err}); rerun the stage that "
                         "wrote this folder") from err
    for name, expected in recorded.items():
        path = storage.join(folder, name)
        if not storage.is_file(path):
            raise ValueError(f"{storage.join(where, name)} is missing: {MANIFEST_FILE} records it; restore it "
                             "or rerun the stage that wrote this folder")
        if storage.file_digest(path) != expected:
            raise ValueError(f"{storage.join(where, name)} does not match the digest {MANIFEST_FILE} records "
                             "for it: the file is damaged or was replaced; restore it or rerun the stage that "
                             "wrote it")
    return len(recorded)


def _relative(folder: str, location: str) -> str:
    return location[len(folder):].lstrip("/")
