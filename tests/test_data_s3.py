"""synth and prepare on a real S3 server (moto on 127.0.0.1): raw posts in, shards out, all in a bucket.

Ray workers see the S3 endpoint and credentials only through the ``AWS_*`` variables as they
were when Ray started, so the session's ``ray_session`` starts after the ``s3_endpoint`` server
(tests/conftest.py) and ``ray_with_s3`` checks from a worker that they arrived.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from smpp_ray import storage
from smpp_ray.data import smpd
from smpp_ray.data.dataset import MANIFEST_FILE, Dataset
from smpp_ray.data.prepare import prepare_dataset
from smpp_ray.data.schema import POSTS_SCHEMA, REJECTS_SCHEMA, SPLITS
from smpp_ray.data.synth import synthesize_corpus

CORPUS = {"posts": 96, "seed": 7, "image_size": 32, "test_posts": 8}


def _tree(root: str) -> dict[str, bytes]:
    return {f[len(root) + 1:]: storage.read_bytes(f) for f in storage.list_files(root)}


def _read_table(location: str):
    fs, path = storage.resolve(location)
    return pq.read_table(path, filesystem=fs)


def _pids(data: str) -> dict[str, list[str]]:
    return {s: _read_table(Dataset(data).posts(s)).column("pid").to_pylist() for s in SPLITS}


def _damage(raw: str) -> None:
    """The same two bad images in either corpus: one deleted, one truncated."""
    paths = storage.read_text(storage.join(raw, "train_img_filepath.txt")).splitlines()
    storage.remove(storage.join(raw, paths[4]))
    truncated = storage.join(raw, paths[7])
    storage.write_bytes(truncated, storage.read_bytes(truncated)[:150])


# ----------------------------------------------------------------------------- no Ray needed

def test_synth_writes_the_same_bytes_to_s3_as_to_a_local_folder(s3_bucket, tmp_path):
    local, remote = str(tmp_path / "raw"), f"{s3_bucket}/raw"
    summary = synthesize_corpus(remote, posts=40, seed=3, image_size=24, test_posts=4)
    synthesize_corpus(local, posts=40, seed=3, image_size=24, test_posts=4)
    assert summary["out_dir"] == remote and summary["images"] == 44
    remote_tree = _tree(remote)
    assert remote_tree == _tree(local)
    assert "oracle.parquet" in remote_tree and "train_label.txt" in remote_tree
    assert sum(name.endswith(".jpg") for name in remote_tree) == 44
    synthesize_corpus(remote, posts=20, seed=4, image_size=24)   # a rerun leaves no stale files
    assert not any(name.startswith("test") for name in _tree(remote))


def test_raw_file_set_errors_name_the_s3_file(s3_bucket):
    raw = f"{s3_bucket}/raw"
    synthesize_corpus(raw, posts=20, seed=1, image_size=16)
    file_set = smpd.load_file_set(smpd.find_file_set(raw, "train_"))
    assert file_set.num_rows == 20 and file_set.files["text"] == f"{raw}/train_text.json"
    assert smpd.find_file_set(raw, "test_") is None
    storage.write_text(storage.join(raw, "train_label.txt"), "1.0\n2.0\n")
    with pytest.raises(ValueError, match=r"same number of rows.*train_label.txt: 2 rows"):
        smpd.load_file_set(smpd.find_file_set(raw, "train_"))
    storage.write_text(storage.join(raw, "train_category.json"), '{"Uid": "1"}')
    with pytest.raises(ValueError, match=r"s3://.*train_category.json.*JSON array"):
        smpd.load_file_set(smpd.find_file_set(raw, "train_"))
    storage.remove(storage.join(raw, "train_user_data.json"))
    with pytest.raises(ValueError, match="train_user_data.json"):
        smpd.find_file_set(raw, "train_")
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        prepare_dataset(f"{s3_bucket}/nowhere", f"{s3_bucket}/data")
    assert not storage.exists(f"{s3_bucket}/data")   # stopped before any work


# ----------------------------------------------------------------------------- with Ray

def test_prepare_from_s3_to_s3_matches_a_local_prepare(ray_with_s3, s3_bucket, tmp_path):
    raw, data = f"{s3_bucket}/raw", f"{s3_bucket}/data"
    local_raw, local_data = str(tmp_path / "raw"), str(tmp_path / "data")
    synthesize_corpus(raw, **CORPUS)
    synthesize_corpus(local_raw, **CORPUS)
    _damage(raw)
    _damage(local_raw)

    manifest = prepare_dataset(raw, data, rows_per_shard=40)
    reference = prepare_dataset(local_raw, local_data, rows_per_shard=40)

    # Everything prepare writes is in the bucket.
    assert storage.is_file(storage.join(data, MANIFEST_FILE)) and Dataset(data).manifest().facts == manifest
    assert manifest["raw_dir"] == raw
    for split in SPLITS:
        shards = storage.list_parquet_files(Dataset(data).posts(split))
        assert shards and all(s.startswith(f"{data}/posts/split={split}/part-") for s in shards)
        assert _read_table(Dataset(data).posts(split)).schema.remove_metadata().equals(POSTS_SCHEMA)
    assert len(storage.list_parquet_files(Dataset(data).posts("train"))) >= 2   # sharded
    rejects = _read_table(Dataset(data).rejects)
    assert rejects.schema.remove_metadata().equals(REJECTS_SCHEMA)

    # Nothing lost, and exactly the rows (and rejects) of the local run.
    counts = manifest["counts"]
    assert counts["input_rows"] == CORPUS["posts"] + CORPUS["test_posts"] == counts["written"] + counts["rejected"]
    assert counts["rejected"] == rejects.num_rows == 2 and counts["rejected_by_field"] == {"image": 2}
    reasons = sorted(r["reason"] for r in rejects.to_pylist())
    assert "cannot be decoded" in reasons[0] and "does not exist" in reasons[1]
    assert counts == reference["counts"]
    assert _pids(data) == _pids(local_data)
    assert rejects.to_pylist() == _read_table(Dataset(local_data).rejects).to_pylist()
    assert Dataset(data).taxonomy() == Dataset(local_data).taxonomy()
    remote_val, local_val = _read_table(Dataset(data).posts("val")), _read_table(Dataset(local_data).posts("val"))
    assert remote_val.equals(local_val)   # same bytes per image, not only the same pids


def test_a_second_writer_of_the_same_bucket_output_exits_2_while_the_first_runs(s3_bucket, monkeypatch, capsys):
    """Object stores have no lock: the writer holds a lease object beside the folder. A live
    holder's lease refuses a second writer (exit 2 naming host and pid, nothing written); a killed
    holder's lease, no longer renewed, is taken over once it expires; a finished writer removes its own."""
    import subprocess
    import sys

    from smpp_ray import locking, storage
    from smpp_ray.cli import main

    out = f"{s3_bucket}/raw"
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom smpp_ray.locking import output_lock\n"
                               f"with output_lock({out!r}):\n    print('held', flush=True)\n    time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["synth", "--out", out, "--posts", "20", "--set", "tracking.enabled=false"]) == 2
        assert f"is being written by another smpp command (host {os.uname().nodename}, pid {holder.pid}" \
            in capsys.readouterr().err
        assert not storage.list_files(out)   # nothing written by the refused command
    finally:
        holder.kill()
        holder.wait(30)
    lease = locking.lock_location(out)
    assert storage.is_file(lease)   # killed: nothing removed it
    monkeypatch.setattr(locking, "LEASE_SECONDS", 0.0)   # expired now, instead of in two minutes
    assert main(["synth", "--out", out, "--posts", "20", "--test-posts", "4", "--set", "tracking.enabled=false"]) == 0
    assert "taking over the lease" in capsys.readouterr().err
    assert storage.list_files(out) and not storage.is_file(lease)
