"""The feature state: everything extraction fitted on train that featurising a new post needs.

``extract`` writes it beside the features (``<features>/feature_state/``); ``predict``, the
registered scorer and the Serve endpoint read it, so a new post is featurised from this state and
the checkpoint alone, never by re-reading the training posts. This module is the one owner of
the format::

    feature_state/
      state.json       format, version, corpus start, user-description PCA shape, class names
                       (taxonomy, concepts), image settings, backbone and checkpoint location
      arrays.npz       the PCA projections (embeddings and user description)
      tags.parquet     the training tag vocabulary with counts (tag, count)
      history.parquet  the training posts a user history is made of (uid, t, label)
      neighbours.npz   the retrieval bank: training posts' unit embeddings, times, users, labels
                       (:mod:`smpp_ray.features.neighbours`; only with neighbour features)
      smpp_digests.json the SHA-256 of each file above, checked on load (:mod:`smpp_ray.digests`)
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from smpp_ray import digests, storage
from smpp_ray.data.schema import Taxonomy
from smpp_ray.features.history import HistoryPool, history_columns
from smpp_ray.features.manifest import STATE_FOLDER, FeatureColumn, FeatureSet
from smpp_ray.features.neighbours import NeighbourBank, NeighbourSettings
from smpp_ray.features.pca import PCAProjection
from smpp_ray.features.tabular import TabularState, tabular_features

logger = logging.getLogger(__name__)

FORMAT = "smpp-feature-state"
VERSION = 1
_JSON, _ARRAYS, _TAGS, _HISTORY = "state.json", "arrays.npz", "tags.parquet", "history.parquet"
_NEIGHBOURS = "neighbours.npz"
_USER_PCA = "user_description"


def has_feature_state(features_dir: str) -> bool:
    """Whether ``features_dir`` holds a feature state (features written by another tool may not)."""
    return storage.is_file(storage.join(FeatureSet(features_dir).state, _JSON))


@dataclass
class FeatureState:
    """What was fitted on the training posts, plus the class names the ids refer to."""

    tabular: TabularState
    history: HistoryPool
    embedding_pcas: dict[str, PCAProjection] = field(default_factory=dict)
    """``image`` / ``text`` -> the train-only PCA (empty: embeddings kept whole)."""
    taxonomy: Taxonomy | None = None
    """The dataset's classes (None only for a state without any)."""
    concepts: list[str] = field(default_factory=list)
    backbone: str | None = None
    checkpoint: str | None = None
    image: dict[str, int] = field(default_factory=dict)
    """How prepare stored the training images (``max_side``, ``jpeg_quality``): new posts get the same."""
    dataset: str | None = None
    """The prepared dataset the state was fitted on (provenance; never read to score)."""
    neighbours: NeighbourBank | None = None
    """The retrieval bank (None: no neighbour features, e.g. metadata-only or turned off)."""

    # ------------------------------------------------------------------------------ features

    def with_class_ids(self, meta: pd.DataFrame) -> pd.DataFrame:
        """``meta`` with category/subcategory/concept ids derived from the names with *this*
        state's vocabularies (new posts were prepared on their own, and their ids index their own
        dataset). A name the training data never had gets -1."""
        taxonomy = self.taxonomy or Taxonomy((), (), ())
        vocabularies = {
            "category": taxonomy.category_ids,
            "subcategory": taxonomy.subcategory_ids,
            "concept": {name: i for i, name in enumerate(self.concepts)},
        }
        out = meta.copy()
        for name, ids in vocabularies.items():
            out[f"{name}_id"] = [ids.get(value, -1) for value in meta[name].tolist()]
        return out

    def new_post_features(self, meta: pd.DataFrame) -> tuple[pd.DataFrame, list[FeatureColumn]]:
        """Tabular + history features of posts that are not training posts (new posts, or the
        val/test posts of the pipeline: the same values evaluation computed for them)."""
        meta = self.with_class_ids(meta).reset_index(drop=True)
        frame, columns = tabular_features(meta, self.tabular, is_train=np.zeros(len(meta), dtype=bool))
        history = self.history.features(meta["uid"].to_numpy(), meta["postdate"].to_numpy())
        return pd.concat([frame, history], axis=1), columns + history_columns()

    def projections(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Embedding PCAs as plain (mean, components) arrays, as the network columns take them."""
        return {name: (p.mean, p.components) for name, p in self.embedding_pcas.items()}

    # ------------------------------------------------------------------------------ storage

    def save(self, features_dir: str) -> str:
        """Write the state under ``features_dir`` (any location); returns the state's location."""
        folder = FeatureSet(features_dir).state
        storage.reset_dir(folder)
        arrays: dict[str, np.ndarray] = {}
        for name, projection in self.embedding_pcas.items():
            arrays.update(projection.to_arrays(name))
        if self.tabular.user_description_pca is not None:
            arrays.update(self.tabular.user_description_pca.to_arrays(_USER_PCA))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        storage.write_bytes(storage.join(folder, _ARRAYS), buffer.getvalue())
        tags = sorted(self.tabular.tag_frequency.items())
        _write_parquet(pa.table({"tag": pa.array([t for t, _ in tags], pa.string()),
                                 "count": pa.array([c for _, c in tags], pa.int64())}), storage.join(folder, _TAGS))
        _write_parquet(self.history.to_table(), storage.join(folder, _HISTORY))
        if self.neighbours is not None:
            storage.write_bytes(storage.join(folder, _NEIGHBOURS), self.neighbours.to_bytes())
        storage.write_json(storage.join(folder, _JSON), {
            "format": FORMAT, "version": VERSION,
            "corpus_start": self.tabular.corpus_start,
            "user_description_components": self.tabular.user_description_components,
            "user_description_dim": self.tabular.user_description_dim,
            "user_description_pca": self.tabular.user_description_pca is not None,
            "extra_columns": list(self.tabular.extra_columns),
            "embedding_pcas": sorted(self.embedding_pcas),
            "taxonomy": self.taxonomy.to_dict() if self.taxonomy is not None else {}, "concepts": self.concepts,
            # The checkpoint and dataset of a pipeline are the features folder's siblings: recorded
            # relative to it, so a moved or copied pipeline registers its own checkpoint.
            "backbone": self.backbone, "checkpoint": _reference(features_dir, self.checkpoint),
            "image": self.image, "dataset": _reference(features_dir, self.dataset),
            "neighbours": self.neighbours.settings.to_dict() if self.neighbours is not None else None,
            "counts": {"tags": len(tags), "history_posts": len(self.history.t),
                       "neighbour_bank_posts": len(self.neighbours) if self.neighbours is not None else 0},
        })
        digests.write_manifest(folder)
        return folder

    @classmethod
    def load(cls, location: str) -> FeatureState:
        """The state at ``location`` (the state folder, or the features folder holding it)."""
        location = storage.normalize(location)
        if not storage.is_file(storage.join(location, _JSON)):
            if has_feature_state(location):
                location = FeatureSet(location).state
            else:
                raise ValueError(f"no feature state at {location!r}: expected {STATE_FOLDER}/{_JSON} written by "
                                 "`smpp extract` (rerun extract with this version to write it)")
        local = storage.local_copy(location)
        digests.verify_manifest(local, shown=location)
        facts = storage.read_json(f"{local}/{_JSON}")
        if facts.get("format") != FORMAT or facts.get("version") != VERSION:
            raise ValueError(f"feature state {location!r} has format {facts.get('format')!r} version "
                             f"{facts.get('version')!r}; this version reads {FORMAT!r} version {VERSION}")
        with np.load(f"{local}/{_ARRAYS}") as npz:
            arrays = {name: npz[name] for name in npz.files}
        tags = pq.read_table(f"{local}/{_TAGS}")
        user_pca = _projection(arrays, _USER_PCA) if facts["user_description_pca"] else None
        tabular = TabularState(int(facts["corpus_start"]),
                               dict(zip(tags.column("tag").to_pylist(), tags.column("count").to_pylist(), strict=True)),
                               int(facts["user_description_components"]), int(facts["user_description_dim"]),
                               user_pca, tuple(facts.get("extra_columns") or ()))
        features_dir = storage.parent(location)
        neighbours = (NeighbourBank.from_npz(NeighbourSettings.from_dict(facts["neighbours"]), f"{local}/{_NEIGHBOURS}")
                      if facts.get("neighbours") else None)
        return cls(tabular, HistoryPool.from_table(pq.read_table(f"{local}/{_HISTORY}")),
                   {name: _projection(arrays, name) for name in facts["embedding_pcas"]},
                   Taxonomy.from_dict(facts["taxonomy"]) if facts.get("taxonomy") else None, list(facts["concepts"]),
                   facts.get("backbone"),
                   _resolved(features_dir, facts.get("checkpoint")), dict(facts.get("image") or {}),
                   _resolved(features_dir, facts.get("dataset")), neighbours)


def _reference(features_dir: str, location: str | None) -> str | None:
    if not location:
        return location
    return storage.relative_within(storage.parent(features_dir), features_dir, location)


def _resolved(features_dir: str, value: str | None) -> str | None:
    return storage.resolve_reference(features_dir, value) if value else value


def _projection(arrays: dict[str, np.ndarray], prefix: str) -> PCAProjection:
    return PCAProjection(arrays[f"{prefix}_mean"], arrays[f"{prefix}_components"],
                         arrays[f"{prefix}_explained_variance"])


def _write_parquet(table: pa.Table, location: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(location, sink.getvalue().to_pybytes())
