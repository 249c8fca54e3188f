"""The prepared dataset in words: dates per split, counts, rejected rows by reason."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.manifest import DatasetManifest
from smpp_ray.data.schema import SPLITS
from smpp_ray.redact import redact_uri
from smpp_ray.report.markup import esc, fmt, table


def day(seconds: Any) -> str:
    """Unix seconds -> ``2016-03-01`` (UTC, as the posts' dates are stored); ``-`` when unknown."""
    if not isinstance(seconds, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).date().isoformat()


def rejects_by_reason(data_dir: str) -> pd.DataFrame:
    """``field, reason, rows`` of the rejected raw rows, most frequent first (empty when none)."""
    location = Dataset(data_dir).rejects
    try:
        fs, path = storage.resolve(location)
        frame = pq.read_table(path, columns=["field", "reason"], filesystem=fs).to_pandas()
    except Exception:  # no rejects folder (nothing rejected) or no files in it
        return pd.DataFrame(columns=["field", "reason", "rows"])
    if frame.empty:
        return pd.DataFrame(columns=["field", "reason", "rows"])
    return (frame.groupby(["field", "reason"]).size().rename("rows").reset_index()
            .sort_values("rows", ascending=False))


def data_section(data_dir: str, manifest: DatasetManifest) -> str:
    counts = manifest.counts
    split = manifest.split
    bounds = split.get("boundaries", {})
    per_split = manifest.per_split
    # an empty split (data.test_fraction=0) has no time bounds: null in the manifest
    rows = [[name, fmt(per_split.get(name)), day((bounds.get(name) or {}).get("start")),
             day((bounds.get(name) or {}).get("end"))] for name in SPLITS]
    span = manifest.time_range
    rows.append(["all", fmt(counts.get("written")), day(span.get("start")), day(span.get("end"))])
    method = split.get("method", "?")
    intro = (f"<p>Prepared from <code>{esc(redact_uri(str(manifest.raw_dir or '?')))}</code>: "
             f"{fmt(counts.get('input_rows'))} raw rows, {fmt(counts.get('written'))} posts written, "
             f"{fmt(counts.get('rejected'))} rejected. Split by <b>{esc(method)}</b> "
             f"(val {fmt(split.get('val_fraction'))}, test {fmt(split.get('test_fraction'))} of the posts"
             + (", the latest posts go to val and test" if method == "time" else "") + "); "
             f"{fmt(split.get('unlabelled_test_rows', 0))} unlabelled test posts. Dates are UTC.</p>")
    parts = [intro, table(["split", "posts", "first post", "last post"], rows)]
    rejects = rejects_by_reason(data_dir)
    if rejects.empty:
        parts.append("<p>No raw rows were rejected.</p>")
    else:
        parts.append("<h3>Rejected rows by reason</h3>"
                     + table(["field", "reason", "rows"], rejects.itertuples(index=False)))
    return "\n".join(parts)
