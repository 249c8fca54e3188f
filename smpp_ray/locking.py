"""One writer per output folder: a second command writing the same ``--out`` exits 2 while the
first runs, instead of interleaving its staging, swaps and summary with the first's.

The lock is an advisory ``flock`` on ``<parent>/.smpp-lock-<name>`` (beside the folder, never in
it: a stage folder's files are the next stage's fingerprinted input). The kernel drops it when
the holder dies, ``kill -9`` included, so a killed run never leaves a folder locked. The file
itself stays (removing it would let a third writer lock a fresh file while a second still holds
the old one); it holds the holder's pid for the message.

Object stores have no locks. There the writer holds a *lease*: an object at the same place
holding a random token, its host and pid, renewed every :data:`LEASE_RENEW_SECONDS` by a thread
and deleted at the end. A second writer that finds a lease renewed within
:data:`LEASE_SECONDS` exits 2 naming the holder; an older one (its holder was killed) is taken
over. Two writers that start together both write their lease, wait :data:`LEASE_SETTLE_SECONDS`
and read it back: the one whose token is gone exits 2 (S3 reads are strongly consistent, so
both see the same last write). This is a live-writer check, not a kernel lock: a holder stalled
longer than :data:`LEASE_SECONDS` (a frozen VM) can lose its lease to a second writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from smpp_ray import storage

#: The lock file's name beside the folder ``name``: ``.smpp-lock-<name>`` (not ``.<name>.*``, the
#: staging and set-aside folders' pattern).
LOCK_PREFIX = ".smpp-lock-"

#: A lease renewed less recently than this is a dead writer's (taken over).
LEASE_SECONDS = 120.0
LEASE_RENEW_SECONDS = 30.0
#: Between writing a lease and reading it back (a writer that started at the same moment wins or loses here).
LEASE_SETTLE_SECONDS = 1.0

logger = logging.getLogger(__name__)


class OutputBusy(ValueError):
    """Another live command writes this output folder (a ValueError: the CLI's exit 2)."""


def lock_location(out: str) -> str:
    return storage.join(storage.parent(out), f"{LOCK_PREFIX}{storage.name(out)}")


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """Hold the write lock of the local folder ``out`` for the block; :class:`OutputBusy` when
    another process holds it. A no-op for object-store locations."""
    if storage.is_uri(storage.normalize(out)):
        with _object_store_lease(out):
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


@contextlib.contextmanager
def _object_store_lease(out: str) -> Iterator[None]:
    """Hold the lease object of ``out`` on object storage for the block (see the module docstring)."""
    where = lock_location(out)
    mine = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    held = _read_lease(where)
    if held is not None and time.time() - float(held.get("renewed", 0)) < LEASE_SECONDS:
        raise _busy(out, held, where)
    if held is not None:
        logger.warning("%s: taking over the lease of %s pid %s, not renewed for %.0f s (its writer died)",
                       storage.normalize(out), held.get("host"), held.get("pid"),
                       time.time() - float(held.get("renewed", 0)))
    _write_lease(where, mine)
    time.sleep(LEASE_SETTLE_SECONDS)
    held = _read_lease(where)
    if held is None or held.get("token") != mine["token"]:
        raise _busy(out, held or {}, where)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_RENEW_SECONDS):
            try:
                _write_lease(where, mine)
            except Exception:  # a failed renewal is retried; the lease only expires after LEASE_SECONDS
                logger.warning("could not renew the lease %s", where, exc_info=True)

    renewer = threading.Thread(target=renew, name="smpp-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        held = _read_lease(where)
        if held is not None and held.get("token") == mine["token"]:
            storage.remove(where)


def _read_lease(where: str) -> dict | None:
    try:
        if not storage.is_file(where):
            return None
        return json.loads(storage.read_text(where))
    except (ValueError, storage.StorageError):   # torn or vanished between the two calls
        return None


def _write_lease(where: str, mine: dict) -> None:
    storage.write_text(where, json.dumps({**mine, "renewed": time.time()}))


def _busy(out: str, held: dict, where: str) -> OutputBusy:
    return OutputBusy(f"{storage.normalize(out)} is being written by another smpp command (host "
                      f"{held.get('host', 'unknown')}, pid {held.get('pid', 'unknown')}, lease {where}); wait for it "
                      f"to finish or choose another --out (a lease not renewed for {LEASE_SECONDS:.0f} s is taken over)")
