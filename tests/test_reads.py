"""Parquet reads are planned with Ray Data's v1 datasource (smpp_ray/data/reads.py).

v2 (Ray 2.60's default) put a per-execution start-up of 15-22 s in front of every training epoch
and a read task whose memory grew with the corpus (bench/results.md); these tests pin the plan.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from smpp_ray.data.reads import read_parquet


def _plan(dataset) -> str:
    return dataset._logical_plan.dag.dag_str


def test_reads_are_planned_with_v1_and_the_default_is_left_alone(ray_session, tmp_path):
    import ray.data

    for part in range(3):
        pq.write_table(pa.table({"pid": [f"p{part}-{i}" for i in range(5)], "x": list(range(5))}),
                       tmp_path / f"part-{part}.parquet")
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    dataset = read_parquet(str(tmp_path), columns=["pid"])
    assert _plan(dataset) == "Read[ReadParquet]"
    assert "ListFiles" in _plan(ray.data.read_parquet(str(tmp_path)))  # Ray's default is untouched
    assert context.use_datasource_v2 == before
    assert sorted(row["pid"] for row in dataset.take_all()) == sorted(f"p{p}-{i}" for p in range(3) for i in range(5))
    assert dataset.columns() == ["pid"]


def test_a_failed_read_still_restores_the_default(ray_session, tmp_path):
    import pytest
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises for a missing folder
        read_parquet(str(tmp_path / "missing"))
    assert context.use_datasource_v2 == before
