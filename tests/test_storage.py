"""The storage layer on a local folder and on a real S3 server (same test bodies)."""

from __future__ import annotations

import os

import pytest

from smpp_ray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def test_write_read_list_remove(root: str):
    storage.write_json(storage.join(root, "a", "summary.json"), {"x": 1})
    storage.write_text(storage.join(root, "a", "b", "notes.txt"), "hé")
    storage.write_bytes(storage.join(root, "c.bin"), b"\x00\x01")
    assert storage.read_json(storage.join(root, "a/summary.json")) == {"x": 1}
    assert storage.read_text(storage.join(root, "a", "b", "notes.txt")) == "hé"
    assert storage.is_file(storage.join(root, "c.bin")) and storage.size(storage.join(root, "c.bin")) == 2
    assert storage.is_dir(storage.join(root, "a")) and not storage.is_file(storage.join(root, "a"))
    assert storage.list_files(root) == [storage.join(root, p) for p in ("a/b/notes.txt", "a/summary.json", "c.bin")]
    assert storage.list_files(root, suffix=".json") == [storage.join(root, "a/summary.json")]
    assert storage.list_names(root) == ["a", "c.bin"]
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "summary.json"))
    assert storage.list_files(root) == [storage.join(root, "c.bin")]
    assert storage.list_files(storage.join(root, "missing")) == []
    with pytest.raises(storage.StorageError, match="no such file.*missing.json"):
        storage.read_json(storage.join(root, "missing.json"))


def test_nan_is_refused_rather_than_written_as_invalid_json(root: str):
    with pytest.raises(ValueError):
        storage.write_json(storage.join(root, "bad.json"), {"x": float("nan")})
    assert not storage.exists(storage.join(root, "bad.json"))


def test_folders_go_up_and_down_and_reset(root: str, tmp_path):
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "w.pt").write_bytes(b"weights")
    (local / "config.json").write_text("{}")
    target = storage.join(root, "ckpt")
    storage.upload_dir(str(local), target)
    assert storage.list_files(target) == [storage.join(target, "config.json"), storage.join(target, "sub/w.pt")]
    back = storage.download_dir(target, str(tmp_path / "back"))
    assert (tmp_path / "back" / "sub" / "w.pt").read_bytes() == b"weights" and back == str(tmp_path / "back")
    storage.reset_dir(target)
    assert storage.list_files(target) == []


def test_local_copy_is_fetched_once_per_version(root: str, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    weights = storage.join(root, "weights.bin")
    storage.write_bytes(weights, b"v1")
    first = storage.local_copy(weights)
    assert open(first, "rb").read() == b"v1"
    assert storage.local_copy(weights) == first
    if storage.is_uri(root):
        assert first.startswith(str(tmp_path / "cache"))
        storage.write_bytes(weights, b"version 2")  # a new version (size changed) is fetched anew
        second = storage.local_copy(weights)
        assert second != first and open(second, "rb").read() == b"version 2"
        folder = storage.join(root, "ckpt")
        storage.write_text(storage.join(folder, "a.txt"), "a")
        local_folder = storage.local_copy(folder)
        assert os.listdir(local_folder) == ["a.txt"]
    else:
        assert first == weights  # a local file is used where it is


def test_uri_joins_keep_the_scheme():
    assert storage.join("s3://b/r", "data") == "s3://b/r/data"
    assert storage.join("s3://b/r/", "/data/", "posts") == "s3://b/r/data/posts"
    assert storage.parent("s3://b/r/data") == "s3://b/r"
    assert storage.name("s3://b/r/data") == "data"
    assert storage.normalize("file:///tmp/x/") == "/tmp/x"
    assert storage.normalize("gs://bucket/run/") == "gs://bucket/run"
    assert storage.is_uri("s3://b") and not storage.is_uri("/tmp/x") and not storage.is_uri("file:///x")
    assert storage.join("relative", "x") == os.path.abspath("relative/x")


@pytest.mark.parametrize(("root", "base", "location", "recorded", "resolved"), [
    ("/p", "/p/features", "/p/train/ray_results/c1", "../train/ray_results/c1", "/p/train/ray_results/c1"),
    ("/p/tune", "/p/tune", "/p/tune/models/fallback/f.json", "models/fallback/f.json", "/p/tune/models/fallback/f.json"),
    ("/p", "/p/features", "/elsewhere/ckpt", "/elsewhere/ckpt", "/elsewhere/ckpt"),
    ("/p", "/p/features", "/pp/train", "/pp/train", "/pp/train"),   # a name that only starts like the root
    ("s3://b/p", "s3://b/p/features", "s3://b/p/train/c", "../train/c", "s3://b/p/train/c"),
    ("s3://b/p", "s3://b/p/features", "s3://other/p/train", "s3://other/p/train", "s3://other/p/train"),
])
def test_references_inside_a_tree_are_relative_and_resolve_back(root, base, location, recorded, resolved):
    assert storage.relative_within(root, base, location) == recorded
    assert storage.resolve_reference(base, recorded) == resolved
