"""Reading a prepared dataset's ``manifest.json`` (written by :mod:`smpp_ray.data.prepare`).

Keys: ``schema_version``, ``raw_dir``, ``files``, ``counts`` {``input_rows``, ``written``,
``rejected``, ``per_split`` {train, val, test}, ``rejected_by_field``}, ``taxonomy``
(:meth:`Taxonomy.to_dict`), ``concepts`` (names; ``concept_id`` indexes this list), ``split``
{``method``, fractions, ``boundaries``}, ``time_range`` {``start``, ``end``} (unix seconds),
``image`` {``max_side``, ``jpeg_quality``} and ``run`` {``seconds``, ``posts_per_s``}.
"""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs

from smpp_ray.data.schema import SCHEMA_VERSION, Taxonomy

MANIFEST_NAME = "manifest.json"


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or a ``s3://`` / ``gs://`` URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def write_manifest(data_dir: str, manifest: dict) -> None:
    """Write ``manifest.json`` (sorted keys, so reruns of the same data give the same text)."""
    fs, root = resolve_filesystem(data_dir)
    with fs.open_output_stream(f"{root}/{MANIFEST_NAME}") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))


def load_manifest(data_dir: str) -> dict:
    """The manifest of a prepared dataset; ValueError naming the file when absent or unreadable."""
    fs, root = resolve_filesystem(data_dir)
    path = f"{root}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ValueError(f"{path!r} does not exist: is {data_dir!r} a dataset written by `smpp prepare`?")
    with fs.open_input_stream(path) as handle:
        try:
            manifest = json.loads(handle.read().decode("utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON: {err}") from err
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path!r} has schema_version {version!r}; this code reads version {SCHEMA_VERSION}. "
                         "Rerun `smpp prepare`.")
    return manifest


def load_taxonomy(data_dir: str) -> Taxonomy:
    """The class taxonomy recorded in a prepared dataset's manifest."""
    return Taxonomy.from_dict(load_manifest(data_dir)["taxonomy"])
