"""One writer per output folder: a second command writing the same ``--out`` exits 2 while the
first runs, instead of interleaving its staging, swaps and summary with the first's.

The lock is an advisory ``flock`` on ``<parent>/.smpp-lock-<name>`` (beside the folder, never in
it: a stage folder's files are the next stage's fingerprinted input). The kernel drops it when
the holder dies, ``kill -9`` included, so a killed run never leaves a folder locked. The file
itself stays (removing it would let a third writer lock a fresh file while a second still holds
the old one); it holds the holder's pid for the message.

Object stores have no locks: on ``s3://`` the promise is the cluster's (one job per output).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from smpp_ray import storage

#: The lock file's name beside the folder ``name``: ``.smpp-lock-<name>`` (not ``.<name>.*``, the
#: staging and set-aside folders' pattern).
LOCK_PREFIX = ".smpp-lock-"


class OutputBusy(ValueError):
    """Another live command writes this output folder (a ValueError: the CLI's exit 2)."""


def lock_location(out: str) -> str:
    return storage.join(storage.parent(out), f"{LOCK_PREFIX}{storage.name(out)}")


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """Hold the write lock of the local folder ``out`` for the block; :class:`OutputBusy` when
    another process holds it. A no-op for object-store locations."""
    if storage.is_uri(storage.normalize(out)):
        yield
        return
    path = lock_location(out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputBusy(f"{storage.normalize(out)} is being written by another smpp command (pid {holder}, "
                             f"lock {path}); wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
