"""A prepared dataset folder (``smpp prepare``'s output): the one owner of its layout. Readers
and writers ask a :class:`Dataset` where a part is and never join a name themselves::

    DATA/manifest.json                  counts, taxonomy, split boundaries, schema version
                                        (:class:`~smpp_ray.data.manifest.DatasetManifest`)
    DATA/posts/split=<split>/*.parquet  POSTS_SCHEMA shards, one folder per split
    DATA/rejects/*.parquet              REJECTS_SCHEMA: rejected raw rows, file, row, field, reason
    DATA/imageless/*.parquet            (``keep_imageless`` only) posts rejected for their image
                                        alone, metadata intact: what a fallback regressor can score

The folder may be at any location :mod:`smpp_ray.storage` reads (a local path or an ``s3://`` /
``gs://`` prefix); a :class:`Dataset` keeps the location as it was given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from smpp_ray import storage
from smpp_ray.data.manifest import DatasetManifest
from smpp_ray.data.schema import SPLITS, Taxonomy

MANIFEST_FILE = "manifest.json"
POSTS_DIR = "posts"
REJECTS_DIR = "rejects"
IMAGELESS_DIR = "imageless"


@dataclass(frozen=True)
class Dataset:
    """Where each part of the prepared dataset at ``location`` is, and its manifest."""

    location: str

    def __init__(self, location: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "location", str(location))

    def posts(self, split: str) -> str:
        """The folder of one split's Parquet shards."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected train, val or test")
        return storage.join(self.location, POSTS_DIR, f"split={split}")

    @property
    def posts_root(self) -> str:
        """The folder holding every split's folder."""
        return storage.join(self.location, POSTS_DIR)

    @property
    def rejects(self) -> str:
        """The folder of the rejected rows' Parquet shards."""
        return storage.join(self.location, REJECTS_DIR)

    @property
    def imageless(self) -> str:
        """The folder of the posts rejected only for their image (POSTS_SCHEMA, ``image`` empty)."""
        return storage.join(self.location, IMAGELESS_DIR)

    @property
    def manifest_file(self) -> str:
        return storage.join(self.location, MANIFEST_FILE)

    def has_manifest(self) -> bool:
        return storage.is_file(self.manifest_file)

    def manifest(self) -> DatasetManifest:
        """The manifest, checked; ValueError naming the file when absent, unreadable or of
        another schema version."""
        location = self.manifest_file
        if not storage.is_file(location):
            raise ValueError(f"{location!r} does not exist: is {self.location!r} a dataset written by `smpp prepare`?")
        try:
            facts = json.loads(storage.read_text(location))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{location!r} is not valid JSON: {err}") from err
        return DatasetManifest.checked(facts, location)

    def taxonomy(self) -> Taxonomy:
        """The class taxonomy the manifest records."""
        return self.manifest().taxonomy

    def write_manifest(self, facts: dict) -> str:
        """Write ``manifest.json`` atomically (sorted keys: reruns of the same data give the same
        text); returns its location."""
        text = json.dumps(facts, indent=2, sort_keys=True, allow_nan=False) + "\n"
        return storage.write_text(self.manifest_file, text)
