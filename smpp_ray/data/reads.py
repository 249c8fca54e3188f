"""How the library plans a Ray Data Parquet read (the one owner of the datasource choice), and
row counts from Parquet footers.

Ray 2.60 plans ``ray.data.read_parquet`` with its datasource v2 by default: a ``ListFiles`` and a
footer-reading operator ahead of the read tasks. Measured here (bench/results.md):

- training re-executes its datasets every epoch, and v2 took 15-22 s to hand out the first batch
  of every execution, against 0.2-3 s with v1 on the same files;
- in extraction, a v2 read task's private memory grew with the corpus (672 MiB at 3,000 posts,
  1,173 MiB at 30,000), where v1 hands each task its own files.

The choice is fixed when the read is planned, not when it runs (setting the flag on the dataset's
context afterwards does not change the plan), so it is set only around the call.
"""

from __future__ import annotations

from typing import Any

from smpp_ray import storage


def read_parquet(paths: str | list[str], **options: Any):
    """``ray.data.read_parquet(paths, **options)`` planned with Ray Data's v1 file datasource."""
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, **options)
    finally:
        context.use_datasource_v2 = previous


def parquet_rows(location: str) -> int:
    """Rows of the Parquet files under ``location`` (any location), from their footers: no data
    pages are read."""
    import pyarrow.dataset as pads

    filesystem, path = storage.resolve(location)
    dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
    return sum(fragment.count_rows() for fragment in dataset.get_fragments())
