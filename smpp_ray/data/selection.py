"""Dataset-level sample selection: which train posts the later epochs read, and its one file.

After ``train.selection_warmup_epochs`` epochs a pass scores every train post by classification
loss (:func:`smpp_ray.train.loop.score_classification_loss`), the ranks gather ``(pid, loss)``
and rank 0 writes the lowest ``train.sample_selection_keep`` share to
``<run_path>/selection/kept_ids.parquet`` (:func:`write_kept_ids`; this module is the file's one
owner). The train dataset's pipeline carries a :class:`KeptPostsFilter` ahead of JPEG decoding:
while the file is absent it passes every row, once it exists it drops the posts it does not
list, so dropped posts are never decoded, tokenised or forwarded.

Why a file the pipeline reads rather than a dataset rebuilt with the ids: Ray Train builds the
datasets once on the driver, before any loss exists, and Ray Data re-executes the whole
pipeline each epoch, so a filter that looks at the run's storage when it runs sees the
selection from the first epoch after it was written, on any node, without restarting the
trainer. A resumed run (a relaunch or a worker-group restart) finds the same file in the same
run path; the file's metadata says which epoch's weights scored it, so a resumed run reuses it
exactly when it resumes from those weights and discards it otherwise.

No torch here: the tune stage reads the kept ids (``tune.fit_on_selected``) without it.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from smpp_ray import storage

logger = logging.getLogger(__name__)

#: The kept ids, relative to the run's location.
KEPT_IDS_FILE = "selection/kept_ids.parquet"
#: Parquet schema-metadata key holding the selection's facts as JSON.
_META_KEY = b"smpp.selection"


def kept_ids_location(run_path: str) -> str:
    """``<run_path>/selection/kept_ids.parquet``."""
    return storage.join(run_path, KEPT_IDS_FILE)


def kept_count(total: int, keep: float) -> int:
    """Posts kept out of ``total``: ``keep * total`` rounded half up, at least one (when any)."""
    if total <= 0:
        return 0
    return min(total, max(1, math.floor(keep * total + 0.5)))


def select_easiest(pids: Sequence[str], losses: np.ndarray, keep: float) -> np.ndarray:
    """Indices of the :func:`kept_count` lowest losses, easiest first.

    Ties break by pid so the selection does not depend on the order the ranks' scores arrive
    in (bf16 losses tie often); a NaN loss ranks last (it is dropped before any finite one).
    """
    losses = np.asarray(losses, dtype=np.float64)
    if len(pids) != len(losses):
        raise ValueError(f"{len(pids)} pids but {len(losses)} losses")
    order = np.lexsort((np.asarray(pids, dtype=str), np.where(np.isnan(losses), np.inf, losses)))
    return order[:kept_count(len(losses), keep)]


def write_kept_ids(location: str, pids: Sequence[str], losses: np.ndarray, facts: dict[str, Any]) -> str:
    """Write the kept posts (``pid``, ``loss``, ``rank`` easiest first) with ``facts`` (keep share,
    total scored, the epoch whose weights scored them, pass seconds) in the file's metadata."""
    table = pa.table({"pid": pa.array([str(p) for p in pids], pa.string()),
                      "loss": pa.array(np.asarray(losses, dtype=np.float64)),
                      "rank": pa.array(np.arange(len(pids), dtype=np.int64))})
    table = table.replace_schema_metadata({_META_KEY: json.dumps(facts).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return storage.write_bytes(location, buffer.getvalue())  # atomic: a reader sees all or nothing


def read_kept_ids(location: str) -> tuple[pa.Table, dict[str, Any]]:
    """The table and facts written by :func:`write_kept_ids`."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(location)))
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{location!r} is not a kept-ids file written by the train stage (no selection metadata)")
    return table, json.loads(raw)


def read_kept_facts(location: str) -> dict[str, Any] | None:
    """The facts of the kept-ids file at ``location``, or None when there is none."""
    if not storage.is_file(location):
        return None
    return read_kept_ids(location)[1]


#: Per-process cache of the kept pid set: location -> (file fingerprint, pids).
_KEPT: dict[str, tuple[str, pa.Array]] = {}


def _kept_pids(location: str) -> pa.Array | None:
    """The kept pids while a file is there (None before the selection pass), re-read when the file
    changes: Ray Data reuses worker processes across epochs and across a resumed run's launches."""
    if not storage.is_file(location):
        return None
    key = storage.fingerprint(location)
    cached = _KEPT.get(location)
    if cached is None or cached[0] != key:
        table, _ = read_kept_ids(location)
        cached = (key, table.column("pid").combine_chunks())
        _KEPT[location] = cached
    return cached[1]


class KeptPostsFilter:
    """``map_batches`` stage (``batch_format="pyarrow"``) that keeps only selected posts.

    Runs before the preprocessor, in the same fused task, so a dropped post's JPEG is never
    decoded. Its bytes still come off the Parquet page with the rest of the row group: the
    filter is decided at run time, after the dataset was planned, so it cannot be pushed down
    into the read.
    """

    def __init__(self, location: str) -> None:
        self.location = storage.normalize(location)

    def __call__(self, batch: pa.Table) -> pa.Table:
        kept = _kept_pids(self.location)
        if kept is None:
            return batch
        return batch.filter(pc.is_in(batch.column("pid").cast(pa.string()), value_set=kept))
