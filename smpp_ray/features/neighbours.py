"""Leak-free retrieval features: how popular the training posts (and users) most like a post were.

For each embedding of :data:`EMBEDDING_OUTPUTS` named in ``extract.neighbour_embeddings`` and each
k of ``extract.neighbour_ks``, a post gets, from its k most similar *eligible* bank posts (group
``neighbours``, columns ``nb_<embedding>_k<k>_<stat>``):

- ``mean`` / ``median`` / ``std``: the neighbours' labels;
- ``wmean``: their labels weighted by cosine similarity (clipped at a small positive floor);
- ``sim``: their mean cosine similarity to the post;
- ``same_user``: the share of them posted by the post's own user;
- ``residual``: their mean label minus the mean label of the earlier training posts of the post's
  *predicted* subcategory (is this neighbourhood more popular than the class it looks like?).

A k's features are defined (else NaN) only for a post with at least ``extract.neighbour_min_pool``
x k eligible earlier posts: with fewer, its "k nearest" would be most of the past, a running
mean of everything before it, which means something else for early training posts than for test
posts (measured: with k = 100 on a 1,200-post bank that shift cost 0.024 test SRC).

And, for the first listed embedding, the k most similar *users* (group ``user_neighbours``,
``unb_<embedding>_k<k>_<stat>``): each user is the normalised mean of their eligible posts'
embeddings; ``mean`` / ``wmean`` of those users' mean labels, ``sim`` their mean similarity.

The leak rule, by construction rather than by care:

- the bank is the labelled *training* split only (val, test and new posts are queries, never bank
  rows), saved with the feature state so predict and serve retrieve from the same bank;
- a post retrieves only bank posts posted *strictly earlier* than itself, so it never retrieves
  itself, a later post, or a post at the same second, and changing any of their labels leaves its
  features bit-identical;
- a bank post by the same user whose *image* embedding is a near-copy (cosine >=
  ``extract.neighbour_duplicate_similarity``) is skipped for every embedding: the same photo
  re-uploaded under another id would otherwise hand over its own label (a same-user post with the
  same caption but another photo is a different post, and stays);
- user profiles are snapshots at ``extract.user_neighbour_snapshots`` cut-offs (quantiles of the
  bank's times); a post uses the latest cut-off at or before its own time, and a snapshot holds only
  bank posts strictly earlier than its cut-off; the post's own user is skipped.

The search is exact and blocked (:func:`earlier_neighbours`): queries in time order, blocks of
``extract.neighbour_block_rows``, matrix products of normalised embeddings against only the bank
rows earlier than the block's latest post, a running top-k. float32 on CPU, bf16 products on CUDA.

Past ``extract.neighbour_exact_rows`` bank posts (default 2,000,000: an exact pass over SMPD's
305k is minutes on one GPU, but grows with bank x queries) the part of the bank that is earlier
than *every* post of a block is searched with an HNSW index instead (:class:`ApproximateIndex`,
FAISS, inner product, restricted to that id range; its recall is measured against the exact
search in ``bench/bench_neighbours.py``); the remaining rows up to each post's own time are still
searched exactly, so the leak rule holds exactly on either path.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray.features.manifest import FeatureColumn

logger = logging.getLogger(__name__)

#: Embedding key -> the extractor output it comes from (:data:`smpp_ray.features.network.TENSOR_OUTPUTS`).
EMBEDDING_OUTPUTS = {"image": "image_embedding", "text": "text_embedding", "fused": "fused"}
POST_STATS = ("mean", "median", "std", "wmean", "sim", "same_user", "residual")
USER_STATS = ("mean", "wmean", "sim")
POST_GROUP, USER_GROUP = "neighbours", "user_neighbours"
#: What a re-upload is recognised by: the same user posting a near-identical photo.
DUPLICATE_EMBEDDING = "image"
#: Every neighbour feature column starts with one of these.
NEIGHBOUR_PREFIXES = ("nb_", "unb_")
#: Bank rows per matrix product: with 1024 queries a (1024, 16384) float32 block is 64 MiB.
BANK_CHUNK_ROWS = 16384
_WEIGHT_FLOOR = 1e-6


@dataclass(frozen=True)
class NeighbourSettings:
    """What the features are made of (``extract.neighbour_*``); saved with the bank."""

    embeddings: tuple[str, ...] = ("image", "text", "fused")
    ks: tuple[int, ...] = (5, 20, 100)
    user_snapshots: int = 8
    duplicate_similarity: float = 0.999
    block_rows: int = 1024
    exact_rows: int = 2_000_000
    """Bank prefixes up to this many rows are searched exactly; longer ones through the HNSW index."""
    min_pool: int = 10
    """A k's features are defined only for a post with at least ``min_pool * k`` candidates."""

    def __post_init__(self) -> None:
        unknown = [e for e in self.embeddings if e not in EMBEDDING_OUTPUTS]
        if unknown:
            raise ValueError(f"extract.neighbour_embeddings: unknown embedding {unknown[0]!r}; "
                             f"expected some of {list(EMBEDDING_OUTPUTS)}")
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise ValueError(f"extract.neighbour_ks must be a non-empty list of k >= 1, got {list(self.ks)!r}")
        if self.user_snapshots < 0 or self.block_rows < 1:
            raise ValueError("extract.user_neighbour_snapshots must be >= 0 and extract.neighbour_block_rows >= 1")

    @classmethod
    def from_config(cls, cfg: Any) -> NeighbourSettings:
        """The settings of an :class:`~smpp_ray.config.ExtractConfig` (``extract.neighbour_*``)."""
        return cls(tuple(cfg.neighbour_embeddings), tuple(int(k) for k in cfg.neighbour_ks),
                   cfg.user_neighbour_snapshots, cfg.neighbour_duplicate_similarity, cfg.neighbour_block_rows,
                   cfg.neighbour_exact_rows, cfg.neighbour_min_pool)

    @property
    def enabled(self) -> bool:
        return bool(self.embeddings)

    @property
    def vector_keys(self) -> tuple[str, ...]:
        """The embeddings a bank keeps: the searched ones, and the image for the re-upload check."""
        return tuple(dict.fromkeys((*self.embeddings, DUPLICATE_EMBEDDING)))

    @property
    def max_k(self) -> int:
        return max(self.ks)

    def columns(self) -> list[FeatureColumn]:
        """Every feature column, in the order :meth:`NeighbourBank.features` returns them."""
        out = [FeatureColumn(f"nb_{e}_k{k}_{s}", POST_GROUP) for e in self.embeddings for k in self.ks
               for s in POST_STATS]
        if self.embeddings and self.user_snapshots > 0:
            out += [FeatureColumn(f"unb_{self.embeddings[0]}_k{k}_{s}", USER_GROUP) for k in self.ks for s in USER_STATS]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"embeddings": list(self.embeddings), "ks": [int(k) for k in self.ks],
                "user_snapshots": self.user_snapshots, "duplicate_similarity": self.duplicate_similarity,
                "block_rows": self.block_rows, "exact_rows": self.exact_rows, "min_pool": self.min_pool}

    @classmethod
    def from_dict(cls, facts: dict[str, Any]) -> NeighbourSettings:
        return cls(tuple(facts["embeddings"]), tuple(int(k) for k in facts["ks"]), int(facts["user_snapshots"]),
                   float(facts["duplicate_similarity"]), int(facts["block_rows"]), int(facts["exact_rows"]),
                   int(facts["min_pool"]))


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    values = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values / np.maximum(norms, 1e-12)


def earlier_neighbours(bank: np.ndarray, bank_t: np.ndarray, queries: np.ndarray, query_t: np.ndarray, k: int, *,
                       excluded: tuple[np.ndarray, np.ndarray] | None = None, block_rows: int = 1024,
                       device: str = "cpu", approximate: ApproximateIndex | None = None,
                       exact_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` cosine neighbours of each query among the bank rows posted strictly earlier.

    ``bank`` (B, d) and ``queries`` (Q, d) are unit rows; ``bank_t`` is sorted ascending.
    ``excluded`` lists (query row, bank row) pairs that may never be neighbours (re-uploads).
    Exact, unless ``approximate`` is given: then a block whose common earlier prefix exceeds
    ``exact_rows`` rows takes that prefix's candidates from the index and searches the rest exactly.
    Returns ``(index, similarity)``, both (Q, k), best first; -1 / NaN where fewer than k rows qualify.
    """
    import torch

    n_queries = len(queries)
    index = np.full((n_queries, k), -1, dtype=np.int64)
    similarity = np.full((n_queries, k), np.nan, dtype=np.float32)
    if n_queries == 0 or len(bank) == 0:
        return index, similarity
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    bank_t = np.asarray(bank_t, dtype=np.int64)
    query_t = np.asarray(query_t, dtype=np.int64)
    skip_query, skip_bank = excluded if excluded is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    bank_tensor = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)).to(device, dtype)
    bank_times = torch.from_numpy(bank_t).to(device)
    # Time order: a block needs only the bank rows before its latest post.
    order = np.argsort(query_t, kind="stable")
    block_position = np.full(n_queries, -1, dtype=np.int64)
    for start in range(0, n_queries, block_rows):
        rows = order[start:start + block_rows]
        limit = int(np.searchsorted(bank_t, query_t[rows].max(), side="left"))
        if limit == 0:
            continue
        block_position[rows] = np.arange(len(rows))
        in_block = block_position[skip_query] >= 0
        block_skips = (block_position[skip_query[in_block]], skip_bank[in_block])
        block_position[rows] = -1
        q = torch.from_numpy(np.ascontiguousarray(queries[rows], dtype=np.float32)).to(device, dtype)
        q_times = torch.from_numpy(query_t[rows]).to(device)[:, None]
        best_sim = torch.full((len(rows), 0), float("-inf"), device=device)
        best_idx = torch.zeros((len(rows), 0), dtype=torch.int64, device=device)
        exact_from = 0
        prefix = int(np.searchsorted(bank_t, query_t[rows].min(), side="left"))   # earlier than every post here
        if approximate is not None and prefix > exact_rows:
            # Excluded pairs may come back from the index: fetch enough to drop them and keep k.
            extra = int(np.bincount(block_skips[0], minlength=len(rows)).max()) if len(block_skips[0]) else 0
            found_idx, found_sim = approximate.search(queries[rows], prefix, k + extra)
            skip_keys = block_skips[0] * len(bank) + block_skips[1]
            found_keys = np.arange(len(rows))[:, None] * len(bank) + found_idx
            found_sim[(found_idx < 0) | np.isin(found_keys, skip_keys)] = -np.inf
            best_sim = torch.from_numpy(found_sim).to(device)
            best_idx = torch.from_numpy(np.maximum(found_idx, 0)).to(device)
            exact_from = prefix
        for b0 in range(exact_from, limit, BANK_CHUNK_ROWS):
            b1 = min(limit, b0 + BANK_CHUNK_ROWS)
            sims = (q @ bank_tensor[b0:b1].T).float()
            sims.masked_fill_(bank_times[None, b0:b1] >= q_times, float("-inf"))
            here = (block_skips[1] >= b0) & (block_skips[1] < b1)
            if here.any():
                sims[torch.from_numpy(block_skips[0][here]).to(device),
                     torch.from_numpy(block_skips[1][here] - b0).to(device)] = float("-inf")
            # The chunk's own top-k first: the merge then moves (rows, 2k), not (rows, chunk) indices.
            chunk_sim, chunk_top = torch.topk(sims, min(k, b1 - b0), dim=1)
            pooled_sim = torch.cat([best_sim, chunk_sim], dim=1)
            pooled_idx = torch.cat([best_idx, chunk_top + b0], dim=1)
            best_sim, top = torch.topk(pooled_sim, min(k, pooled_sim.shape[1]), dim=1)
            best_idx = torch.gather(pooled_idx, 1, top)
        if best_sim.shape[1] > k:   # the index's candidates alone (no exact rows after them)
            best_sim, top = torch.topk(best_sim, k, dim=1)
            best_idx = torch.gather(best_idx, 1, top)
        found_sim = best_sim.cpu().numpy()
        found_idx = best_idx.cpu().numpy()
        valid = np.isfinite(found_sim)
        width = found_sim.shape[1]
        index[rows, :width] = np.where(valid, found_idx, -1)
        similarity[rows, :width] = np.where(valid, found_sim, np.nan)
    return index, similarity


class ApproximateIndex:
    """An HNSW graph (FAISS, inner product) over a bank's unit vectors, searched within an id
    prefix (the bank is in time order, so "ids below n" is "posted before the n-th bank post")."""

    #: Graph degree and build/search breadth: recall@100 >= 0.95 on the benchmark's corpora.
    M, EF_CONSTRUCTION, EF_SEARCH = 32, 100, 256

    def __init__(self, index: Any) -> None:
        self.index = index

    @classmethod
    def build(cls, vectors: np.ndarray) -> ApproximateIndex:
        import faiss

        index = faiss.IndexHNSWFlat(vectors.shape[1], cls.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cls.EF_CONSTRUCTION
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index)

    def to_array(self) -> np.ndarray:
        import faiss

        return faiss.serialize_index(self.index)

    @classmethod
    def from_array(cls, array: np.ndarray) -> ApproximateIndex:
        import faiss

        return cls(faiss.deserialize_index(np.asarray(array, dtype=np.uint8)))

    def search(self, queries: np.ndarray, below: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, similarities) of the ``k`` best rows with id < ``below``; -1 / -inf where none."""
        import faiss

        params = faiss.SearchParametersHNSW()
        params.sel = faiss.IDSelectorRange(0, int(below))
        params.efSearch = max(self.EF_SEARCH, 2 * k)
        sims, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return ids.astype(np.int64), np.where(ids >= 0, sims, -np.inf).astype(np.float32)


def same_user_copies(query_image: np.ndarray, query_t: np.ndarray, query_codes: np.ndarray, bank_image: np.ndarray,
                     bank_t: np.ndarray, bank_codes: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(query row, bank row) pairs where the bank row is an earlier post of the query's own user
    with a near-identical image (unit image embeddings, cosine >= ``threshold``): re-uploads."""
    pairs_q: list[np.ndarray] = []
    pairs_b: list[np.ndarray] = []
    if threshold > 1.0 or not len(bank_codes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bank_order = np.argsort(bank_codes, kind="stable")
    bank_sorted = bank_codes[bank_order]
    query_order = np.argsort(query_codes, kind="stable")
    query_sorted = query_codes[query_order]
    for code in np.unique(query_codes):
        lo, hi = np.searchsorted(bank_sorted, code, side="left"), np.searchsorted(bank_sorted, code, side="right")
        if lo == hi:
            continue
        bank_rows = bank_order[lo:hi]
        user_rows = query_order[np.searchsorted(query_sorted, code, side="left"):
                                np.searchsorted(query_sorted, code, side="right")]
        # In tiles: a prolific account (tens of thousands of posts) must not make one huge matrix.
        for q0 in range(0, len(user_rows), 1024):
            rows = user_rows[q0:q0 + 1024]
            for b0 in range(0, len(bank_rows), BANK_CHUNK_ROWS):
                tile = bank_rows[b0:b0 + BANK_CHUNK_ROWS]
                copies = (query_image[rows] @ bank_image[tile].T >= threshold) & (bank_t[None, tile] < query_t[rows, None])
                q, b = np.nonzero(copies)
                pairs_q.append(rows[q])
                pairs_b.append(tile[b])
    if not pairs_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pairs_q).astype(np.int64), np.concatenate(pairs_b).astype(np.int64)


@dataclass
class NeighbourBank:
    """The labelled training posts a post's neighbours are drawn from, sorted by postdate.

    Saved with the feature state (:mod:`smpp_ray.features.state`): predict and serve retrieve a new
    post's neighbours from this bank, exactly as extraction did for val and test posts.
    """

    settings: NeighbourSettings
    pid: np.ndarray
    """(B,) str, the bank's posts (training split only; a test asserts it)."""
    t: np.ndarray
    """(B,) int64 postdates, ascending."""
    uid: np.ndarray
    """(B,) str users."""
    label: np.ndarray
    """(B,) float64 labels."""
    subcategory: np.ndarray
    """(B,) int64 subcategory ids (the dataset's taxonomy)."""
    vectors: dict[str, np.ndarray]
    """Embedding key -> (B, d) float32 unit rows: the searched embeddings, and ``image`` always
    (the re-upload check compares images)."""
    indexes: dict[str, ApproximateIndex] = field(default_factory=dict)
    """Embedding key -> HNSW index, only for a bank longer than ``settings.exact_rows``."""
    _snapshots: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict,
                                                                                         repr=False)

    @classmethod
    def from_training_posts(cls, settings: NeighbourSettings, pid: np.ndarray, t: np.ndarray, uid: np.ndarray,
                            label: np.ndarray, subcategory: np.ndarray,
                            outputs: dict[str, np.ndarray]) -> NeighbourBank:
        """The bank of training posts (rows in any order; unlabelled rows are dropped);
        ``outputs`` maps extractor output names (:data:`EMBEDDING_OUTPUTS` values) to (N, d)."""
        label = np.asarray(label, dtype=np.float64)
        keep = np.flatnonzero(~np.isnan(label))
        order = keep[np.argsort(np.asarray(t, dtype=np.int64)[keep], kind="stable")]
        vectors = {e: normalised(np.asarray(outputs[EMBEDDING_OUTPUTS[e]])[order])
                   for e in settings.vector_keys}
        indexes = ({e: ApproximateIndex.build(vectors[e]) for e in settings.embeddings}
                   if len(order) > settings.exact_rows else {})
        if indexes:
            logger.info("neighbour bank of %d posts > extract.neighbour_exact_rows=%d: built HNSW indexes for %s",
                        len(order), settings.exact_rows, list(indexes))
        return cls(settings, np.asarray(pid).astype(str)[order], np.asarray(t, dtype=np.int64)[order],
                   np.asarray(uid).astype(str)[order], label[order],
                   np.asarray(subcategory, dtype=np.int64)[order], vectors, indexes)

    def __len__(self) -> int:
        return len(self.t)

    # ------------------------------------------------------------------------------ features

    def features(self, outputs: dict[str, np.ndarray], t: np.ndarray, uid: np.ndarray,
                 predicted_subcategory: np.ndarray, *, device: str = "cpu") -> pd.DataFrame:
        """Neighbour features of posts (any split, or new posts) from their extractor outputs,
        postdates, users and predicted subcategories, in row order (:meth:`NeighbourSettings.columns`)."""
        settings = self.settings
        t = np.asarray(t, dtype=np.int64)
        users = np.asarray(uid).astype(str)
        codes, bank_codes = _user_codes(users, self.uid)
        prior = self._subcategory_prior(np.asarray(predicted_subcategory, dtype=np.int64), t)
        copies = same_user_copies(normalised(np.asarray(outputs[EMBEDDING_OUTPUTS[DUPLICATE_EMBEDDING]])), t, codes,
                                  self.vectors[DUPLICATE_EMBEDDING], self.t, bank_codes, settings.duplicate_similarity)
        pool = np.searchsorted(self.t, t, side="left")   # earlier bank posts each post chooses from
        out: dict[str, np.ndarray] = {}
        for embedding in settings.embeddings:
            queries = normalised(np.asarray(outputs[EMBEDDING_OUTPUTS[embedding]]))
            index, sims = earlier_neighbours(self.vectors[embedding], self.t, queries, t, settings.max_k,
                                             excluded=copies, block_rows=settings.block_rows, device=device,
                                             approximate=self.indexes.get(embedding), exact_rows=settings.exact_rows)
            same_user = np.where(index >= 0, bank_codes[np.maximum(index, 0)] == codes[:, None], False)
            labels = np.where(index >= 0, self.label[np.maximum(index, 0)], np.nan)
            for k in settings.ks:
                stats = _label_stats(labels[:, :k], sims[:, :k], pool >= settings.min_pool * k)
                present = (index[:, :k] >= 0).sum(axis=1)
                stats["same_user"] = np.where((present > 0) & (pool >= settings.min_pool * k),
                                              same_user[:, :k].sum(axis=1) / np.maximum(present, 1), np.nan)
                stats["residual"] = stats["mean"] - prior
                for stat in POST_STATS:
                    out[f"nb_{embedding}_k{k}_{stat}"] = stats[stat]
        if settings.embeddings and settings.user_snapshots > 0:
            out.update(self._user_features(normalised(np.asarray(outputs[EMBEDDING_OUTPUTS[settings.embeddings[0]]])),
                                           t, users, device))
        return pd.DataFrame(out, index=range(len(t)))

    def _subcategory_prior(self, subcategory: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Mean label of the bank posts of each query's subcategory posted strictly before it."""
        prior = np.full(len(t), np.nan)
        for sub in np.unique(subcategory):
            rows = np.flatnonzero(subcategory == sub)
            members = np.flatnonzero(self.subcategory == sub)   # already in time order
            if not len(members):
                continue
            count = np.searchsorted(self.t[members], t[rows], side="left")
            sums = np.concatenate([[0.0], np.cumsum(self.label[members])])
            has = count > 0
            prior[rows[has]] = sums[count[has]] / count[has]
        return prior

    def snapshot_cutoffs(self) -> np.ndarray:
        """The user snapshots' cut-offs: quantiles of the bank's times, then one past its last post."""
        snapshots = self.settings.user_snapshots
        if not len(self.t) or snapshots == 0:
            return np.zeros(0, dtype=np.int64)
        inner = np.quantile(self.t, np.arange(1, snapshots) / snapshots, method="lower").astype(np.int64)
        return np.unique(np.concatenate([inner, [int(self.t[-1]) + 1]]))

    def user_snapshot(self, embedding: str, cutoff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, unit mean vectors, mean labels) over the bank posts strictly before ``cutoff``."""
        key = (embedding, int(cutoff))
        if key not in self._snapshots:
            upto = int(np.searchsorted(self.t, cutoff, side="left"))
            users, inverse = np.unique(self.uid[:upto], return_inverse=True)
            sums = np.zeros((len(users), self.vectors[embedding].shape[1]), dtype=np.float64)
            np.add.at(sums, inverse, self.vectors[embedding][:upto])
            label_sum = np.bincount(inverse, weights=self.label[:upto], minlength=len(users))
            count = np.bincount(inverse, minlength=len(users))
            self._snapshots[key] = (users, normalised(sums), label_sum / np.maximum(count, 1))
        return self._snapshots[key]

    def _user_features(self, queries: np.ndarray, t: np.ndarray, users: np.ndarray, device: str
                       ) -> dict[str, np.ndarray]:
        settings = self.settings
        embedding = settings.embeddings[0]
        out = {f"unb_{embedding}_k{k}_{s}": np.full(len(t), np.nan) for k in settings.ks for s in USER_STATS}
        cutoffs = self.snapshot_cutoffs()
        snapshot = np.searchsorted(cutoffs, t, side="right") - 1   # latest cut-off at or before the post
        for s in np.unique(snapshot[snapshot >= 0]):
            rows = np.flatnonzero(snapshot == s)
            names, vectors, means = self.user_snapshot(embedding, cutoffs[s])
            own = pd.Index(names).get_indexer(users[rows])   # -1: the user has no profile yet
            has_profile = own >= 0
            # Every profile of the snapshot is "earlier" (time 0 < 1); the own user's is excluded.
            index, sims = earlier_neighbours(vectors, np.zeros(len(names), np.int64), queries[rows],
                                             np.ones(len(rows), np.int64), settings.max_k,
                                             excluded=(np.flatnonzero(has_profile), own[has_profile]),
                                             block_rows=settings.block_rows, device=device)
            labels = np.where(index >= 0, means[np.maximum(index, 0)], np.nan)
            others = len(names) - has_profile.astype(int)
            for k in settings.ks:
                stats = _label_stats(labels[:, :k], sims[:, :k], others >= settings.min_pool * k)
                for stat in USER_STATS:
                    out[f"unb_{embedding}_k{k}_{stat}"][rows] = stats[stat]
        return out

    # ------------------------------------------------------------------------------ storage

    def to_bytes(self) -> bytes:
        """The bank as one ``.npz`` (what the feature state writes)."""
        buffer = io.BytesIO()
        np.savez(buffer, pid=self.pid.astype(str), t=self.t, uid=self.uid.astype(str), label=self.label,
                 subcategory=self.subcategory, **{f"vectors_{e}": v for e, v in self.vectors.items()},
                 **{f"hnsw_{e}": index.to_array() for e, index in self.indexes.items()})
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, settings: NeighbourSettings, path: str) -> NeighbourBank:
        with np.load(path) as npz:
            return cls(settings, npz["pid"], npz["t"], npz["uid"], npz["label"], npz["subcategory"],
                       {name.removeprefix("vectors_"): npz[name] for name in npz.files if name.startswith("vectors_")},
                       {name.removeprefix("hnsw_"): ApproximateIndex.from_array(npz[name])
                        for name in npz.files if name.startswith("hnsw_")})

    def arrays(self) -> dict[str, Any]:
        """Plain arrays (for ``ray.put``: one read-only copy per node, shared by every actor there)."""
        return {"settings": self.settings.to_dict(), "pid": self.pid, "t": self.t, "uid": self.uid,
                "label": self.label, "subcategory": self.subcategory, "vectors": self.vectors,
                "indexes": {e: index.to_array() for e, index in self.indexes.items()}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> NeighbourBank:
        # The vectors stay zero-copy views of the object store; an HNSW index is rebuilt from its
        # bytes, one copy per actor (FAISS owns its memory).
        return cls(NeighbourSettings.from_dict(arrays["settings"]), arrays["pid"], arrays["t"], arrays["uid"],
                   arrays["label"], arrays["subcategory"], dict(arrays["vectors"]),
                   {e: ApproximateIndex.from_array(a) for e, a in arrays.get("indexes", {}).items()})


def _user_codes(query_users: np.ndarray, bank_users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of query and bank users in one vocabulary (equal codes = same user)."""
    vocabulary = pd.Index(pd.unique(np.concatenate([np.asarray(bank_users).astype(str),
                                                    np.asarray(query_users).astype(str)])))
    return (vocabulary.get_indexer(np.asarray(query_users).astype(str)).astype(np.int64),
            vocabulary.get_indexer(np.asarray(bank_users).astype(str)).astype(np.int64))


def _label_stats(labels: np.ndarray, sims: np.ndarray, defined: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, median, spread and similarity-weighted mean of the labels, and the mean similarity
    (NaN for a row with no neighbour, or not ``defined``: too few candidates to choose from)."""
    labels = np.where(defined[:, None], labels, np.nan)
    sims = np.where(defined[:, None], sims, np.nan)
    weights = np.where(np.isnan(labels), 0.0, np.clip(np.nan_to_num(sims, nan=0.0), _WEIGHT_FLOOR, None))
    weight_sum = weights.sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)   # all-NaN rows: no neighbour
        return {"mean": np.nanmean(labels, axis=1), "median": np.nanmedian(labels, axis=1),
                "std": np.nanstd(labels, axis=1),
                "wmean": np.where(weight_sum > 0, (weights * np.nan_to_num(labels)).sum(axis=1)
                                  / np.maximum(weight_sum, 1e-300), np.nan),
                "sim": np.nanmean(sims.astype(np.float64), axis=1)}
