"""Hierarchical visual and textual prototypes: diversity sampling, the bank and its files.

For each of the 77 subcategories the stage selects up to ``shots`` training posts that spread
over time (equal-width time buckets of the class's span get equal quotas), over users (a post
of the least-used user is always preferred) and over CLIP space (farthest-point / k-center
selection on the joint image+text embedding), then averages their normalised image embeddings
(visual prototype) and text embeddings (textual prototype). Each of the 11 categories selects
the same way from the union of its subcategories' members, so a category's members are that
union whenever it fits in ``shots``.

Bank layout: rows ``0..S-1`` are the subcategories (taxonomy ids), rows ``S..S+C-1`` the
categories, ``S + C = 88`` on SMPD. A class without training posts has a zero row and count 0.

This module owns ``prototypes.safetensors``: the bank is read and written by location (a local
path or a URI, through :mod:`smpp_ray.storage`), so Train workers and inference actors on any
node load it from the run's storage, never from the driver's disk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from smpp_ray import storage
from smpp_ray.data.schema import Taxonomy

logger = logging.getLogger(__name__)

PROTOTYPES_FILE = "prototypes.safetensors"
MEMBERS_FILE = "members.json"
EMBEDDING_COLUMNS = ("pid", "uid", "postdate", "subcategory_id", "category_id", "image_emb", "text_emb")
EMBED_INPUT_COLUMNS = ["pid", "uid", "postdate", "subcategory_id", "category_id", "image", "title", "tags"]


# ---------------------------------------------------------------------------------------------
# The bank


class PrototypeBank(nn.Module):
    """Visual and textual prototypes ``(S + C, D)`` held as buffers (never trained).

    ``visual`` / ``textual`` are the mean normalised embeddings of each class's members;
    ``counts`` ``(S + C,)`` the number of members (0: an empty class with a zero row).
    """

    def __init__(self, visual: torch.Tensor, textual: torch.Tensor, counts: torch.Tensor,
                 num_subcategories: int, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if visual.shape != textual.shape or visual.ndim != 2:
            raise ValueError(f"visual {tuple(visual.shape)} and textual {tuple(textual.shape)} prototypes "
                             "must both be (classes, dim)")
        if counts.shape != (visual.shape[0],):
            raise ValueError(f"counts shape {tuple(counts.shape)} does not match {visual.shape[0]} classes")
        if not 0 < num_subcategories < visual.shape[0]:
            raise ValueError(f"num_subcategories {num_subcategories} out of range for {visual.shape[0]} rows")
        self.register_buffer("visual", visual.float())
        self.register_buffer("textual", textual.float())
        self.register_buffer("counts", counts.long())
        self.num_subcategories = int(num_subcategories)
        self.num_categories = int(visual.shape[0] - num_subcategories)
        self.metadata = dict(metadata or {})

    @property
    def num_classes(self) -> int:
        return self.visual.shape[0]

    @property
    def dim(self) -> int:
        return self.visual.shape[1]

    def normalized(self, kind: str = "visual") -> torch.Tensor:
        """Unit-norm prototypes ``(S + C, D)`` (zero rows stay zero)."""
        return F.normalize(self._table(kind), dim=-1)

    def _table(self, kind: str) -> torch.Tensor:
        if kind == "visual":
            return self.visual
        if kind in ("textual", "text"):
            return self.textual
        raise ValueError(f"unknown prototype kind {kind!r}; expected 'visual' or 'textual'")

    def row(self, class_id: int, level: str = "subcategory") -> int:
        """Bank row of a subcategory or category id."""
        if level == "subcategory":
            limit, offset = self.num_subcategories, 0
        elif level == "category":
            limit, offset = self.num_categories, self.num_subcategories
        else:
            raise ValueError(f"unknown level {level!r}; expected 'subcategory' or 'category'")
        if not 0 <= class_id < limit:
            raise ValueError(f"{level} id {class_id} out of range [0, {limit})")
        return offset + class_id

    def prototypes(self, class_id: int, level: str = "subcategory") -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(visual, textual)`` prototypes ``(D,)`` of one class."""
        index = self.row(class_id, level)
        return self.visual[index], self.textual[index]

    def similarities(self, embeddings: torch.Tensor, kind: str = "visual") -> torch.Tensor:
        """Cosine similarity ``(B, S + C)`` of embeddings ``(B, D)`` to every prototype of ``kind``."""
        return F.normalize(embeddings, dim=-1) @ self.normalized(kind).t()

    def to_bytes(self) -> bytes:
        """The bank as a ``.safetensors`` file's bytes (tensors + string metadata)."""
        meta = {k: str(v) for k, v in self.metadata.items()}
        meta["num_subcategories"] = str(self.num_subcategories)
        return save_safetensors({"visual": self.visual.contiguous(), "textual": self.textual.contiguous(),
                                 "counts": self.counts.contiguous()}, metadata=meta)

    def save(self, location: str) -> str:
        """Write the bank to ``location`` (local path or URI) atomically; returns the location."""
        return storage.write_bytes(location, self.to_bytes())

    @classmethod
    def load(cls, location: str) -> PrototypeBank:
        """Read a bank written by :meth:`save` from any location."""
        data = _read_bank_file(location)
        meta = safetensors_metadata(data, location)
        tensors = load_safetensors(data)
        missing = {"visual", "textual", "counts"} - set(tensors)
        if missing or "num_subcategories" not in meta:
            raise ValueError(f"prototype file {location!r} lacks "
                             f"{sorted(missing) or ['num_subcategories metadata']}")
        return cls(tensors["visual"], tensors["textual"], tensors["counts"],
                   int(meta.pop("num_subcategories")), meta)


def _read_bank_file(location: str) -> bytes:
    try:
        return storage.read_bytes(location)
    except storage.StorageError as err:
        raise ValueError(f"prototype file {location!r} not found; run `smpp prototypes` first") from err


def safetensors_metadata(data: bytes, location: str = "<bytes>") -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file's bytes (the format: an 8-byte little-endian
    header length, then a JSON header), without deserialising any tensor."""
    try:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"prototype file {location!r} is not a safetensors file: {err}") from err
    return dict(header.get("__metadata__") or {})


def read_prototype_metadata(location: str) -> dict[str, str]:
    """The metadata of the bank at ``location`` (``backbone``, ``pretrained``, ``shots``, ...)."""
    return safetensors_metadata(_read_bank_file(location), location)


# ---------------------------------------------------------------------------------------------
# Diversity sampling


def time_buckets_of(postdates: np.ndarray, buckets: int) -> np.ndarray:
    """Equal-width bucket index in ``[0, buckets)`` over the span of ``postdates``."""
    postdates = np.asarray(postdates, dtype=np.float64)
    if len(postdates) == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = postdates.min(), postdates.max()
    if high <= low:
        return np.zeros(len(postdates), dtype=np.int64)
    index = np.floor((postdates - low) / (high - low) * buckets).astype(np.int64)
    return np.clip(index, 0, buckets - 1)


def _quotas(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` picks over strata as evenly as their sizes allow (round-robin fill)."""
    quota = np.zeros_like(sizes)
    while quota.sum() < total:
        open_strata = np.flatnonzero(quota < sizes)
        for s in open_strata[: total - quota.sum()]:
            quota[s] += 1
    return quota


def select_diverse(features: np.ndarray, uids: Sequence[Any], postdates: np.ndarray, *, shots: int,
                   time_buckets: int, seed: int) -> np.ndarray:
    """Indices of at most ``shots`` rows spread over time buckets, users and feature space.

    Each time bucket gets an even quota; inside the quotas a greedy k-center pass picks, among
    posts of the users picked least so far, the one farthest (cosine) from everything already
    picked. The first pick is drawn with ``seed``. Given the same row order the result is
    deterministic. All rows are returned when there are at most ``shots``.
    """
    n = len(features)
    if n <= shots:
        return np.arange(n)
    feats = np.asarray(features, dtype=np.float64)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    bucket = time_buckets_of(postdates, time_buckets)
    remaining = _quotas(np.bincount(bucket, minlength=time_buckets), shots)
    _, user = np.unique(np.asarray([str(u) for u in uids]), return_inverse=True)
    user_picks = np.zeros(user.max() + 1, dtype=np.int64)
    selected = np.zeros(n, dtype=bool)
    min_dist = np.full(n, np.inf)
    order: list[int] = []
    rng = np.random.default_rng(seed)
    for step in range(shots):
        open_rows = ~selected & (remaining[bucket] > 0)
        least = user_picks[user[open_rows]].min()
        eligible = open_rows & (user_picks[user] == least)
        if step == 0:
            pick = int(rng.choice(np.flatnonzero(eligible)))
        else:
            pick = int(np.argmax(np.where(eligible, min_dist, -np.inf)))
        order.append(pick)
        selected[pick] = True
        remaining[bucket[pick]] -= 1
        user_picks[user[pick]] += 1
        min_dist = np.minimum(min_dist, 1.0 - feats @ feats[pick])
    return np.asarray(order)


def _joint_features(rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """Image and text embeddings side by side: distances see both modalities."""
    return np.concatenate([np.asarray(rows["image_emb"]), np.asarray(rows["text_emb"])], axis=1)


def _take(rows: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[index] for k, v in rows.items()}


def select_class_members(rows: Mapping[str, np.ndarray], *, shots: int, time_buckets: int,
                         seed: int) -> dict[str, np.ndarray]:
    """Diverse members of one class (all rows share a class); adds ``available`` (class size).

    Rows are first sorted by Pid so the choice does not depend on the order the rows arrived
    in (Ray Data groups arrive in any order).
    """
    rows = _take(rows, np.argsort(np.asarray(rows["pid"]).astype(str), kind="stable"))
    n = len(rows["pid"])
    if n == 0:
        return dict(rows, available=np.zeros(0, dtype=np.int64))
    index = select_diverse(_joint_features(rows), rows["uid"], rows["postdate"], shots=shots,
                           time_buckets=time_buckets, seed=seed)
    chosen = _take(rows, np.sort(index))
    chosen["available"] = np.full(len(index), n, dtype=np.int64)
    return chosen


def select_group_members(rows: dict[str, np.ndarray], shots: int, time_buckets: int, seed: int) -> dict[str, np.ndarray]:
    """``map_groups`` UDF: one subcategory's rows in, its selected members out."""
    class_id = int(np.asarray(rows["subcategory_id"])[0])
    return select_class_members(rows, shots=shots, time_buckets=time_buckets, seed=seed + class_id)


def assemble_prototypes(selected: Mapping[str, np.ndarray], taxonomy: Taxonomy, *, shots: int,
                        time_buckets: int, seed: int, embed_dim: int,
                        metadata: Mapping[str, str] | None = None) -> tuple[PrototypeBank, dict]:
    """Build the bank and the members record from the selected subcategory members.

    ``selected`` holds the rows chosen per subcategory (with ``available``); categories select
    from the union of their subcategories' members.
    """
    num_sub, num_cat = taxonomy.num_subcategories, taxonomy.num_categories
    visual = torch.zeros(num_sub + num_cat, embed_dim)
    textual = torch.zeros(num_sub + num_cat, embed_dim)
    counts = torch.zeros(num_sub + num_cat, dtype=torch.long)
    classes: list[dict] = []
    sub_ids = np.asarray(selected["subcategory_id"]) if len(selected["pid"]) else np.zeros(0, dtype=np.int64)
    parents = np.asarray(taxonomy.parents)

    def record(row: int, level: str, class_id: int, name: str, members: dict[str, np.ndarray], available: int) -> None:
        if len(members["pid"]):
            visual[row] = torch.from_numpy(np.asarray(members["image_emb"], dtype=np.float32).mean(0))
            textual[row] = torch.from_numpy(np.asarray(members["text_emb"], dtype=np.float32).mean(0))
        counts[row] = len(members["pid"])
        classes.append({"level": level, "id": class_id, "name": name, "row": row, "available": int(available),
                        "count": int(len(members["pid"])), "pids": [str(p) for p in members["pid"]]})

    for s in range(num_sub):
        members = _take(selected, np.flatnonzero(sub_ids == s))
        available = int(members["available"][0]) if len(members["pid"]) else 0
        record(s, "subcategory", s, taxonomy.subcategories[s], members, available)
    for c in range(num_cat):
        pool = _take(selected, np.flatnonzero(np.isin(sub_ids, np.flatnonzero(parents == c))))
        chosen = select_class_members(pool, shots=shots, time_buckets=time_buckets, seed=seed + num_sub + c)
        record(num_sub + c, "category", c, taxonomy.categories[c], chosen, len(pool["pid"]))
    meta = dict(metadata or {}, shots=str(shots), time_buckets=str(time_buckets), seed=str(seed))
    bank = PrototypeBank(visual, textual, counts, num_sub, meta)
    return bank, {**meta, "classes": classes}


def compute_prototypes(embedded: Mapping[str, np.ndarray], taxonomy: Taxonomy, *, shots: int,
                       time_buckets: int, seed: int, embed_dim: int,
                       metadata: Mapping[str, str] | None = None) -> tuple[PrototypeBank, dict]:
    """In-process equivalent of the Ray stage on already embedded rows (``EMBEDDING_COLUMNS``)."""
    sub_ids = np.asarray(embedded["subcategory_id"])
    parts = [select_class_members(_take(embedded, np.flatnonzero(sub_ids == s)), shots=shots,
                                  time_buckets=time_buckets, seed=seed + int(s))
             for s in np.unique(sub_ids[sub_ids >= 0])]
    selected = concat_members(parts, embed_dim)
    return assemble_prototypes(selected, taxonomy, shots=shots, time_buckets=time_buckets, seed=seed,
                               embed_dim=embed_dim, metadata=metadata)


def concat_members(parts: list[Mapping[str, np.ndarray]], embed_dim: int) -> dict[str, np.ndarray]:
    parts = [p for p in parts if len(p["pid"])]
    if not parts:
        empty = {k: np.zeros(0, dtype=object if k in ("pid", "uid") else np.int64) for k in EMBEDDING_COLUMNS}
        empty["image_emb"] = empty["text_emb"] = np.zeros((0, embed_dim), dtype=np.float32)
        return dict(empty, available=np.zeros(0, dtype=np.int64))
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# Embedding (the callable class the prototypes job runs on a Ray Data actor pool)


class EmbedPosts:
    """Ray Data callable class: prepared posts in, normalised image and text embeddings out.

    Loads the frozen backbone once per actor; rows without a subcategory are dropped (they
    belong to no class). Output columns: ``EMBEDDING_COLUMNS``.
    """

    def __init__(self, backbone: str, pretrained: str = "", device: str = "cpu", context_length: int = 0) -> None:
        from smpp_ray.model.backbone import create_backbone
        from smpp_ray.model.preprocess import BatchPreprocessor

        if device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device %s requested but CUDA is unavailable; embedding on CPU", device)
            device = "cpu"
        self.device = torch.device(device)
        self.backbone = create_backbone(backbone, pretrained, context_length=context_length).to(self.device).eval()
        self.preprocess = BatchPreprocessor(backbone, self.backbone.image_size, self.backbone.context_length,
                                            train=False, mean=self.backbone.image_mean, std=self.backbone.image_std)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from smpp_ray.model.preprocess import _ids

        keep = np.flatnonzero(_ids(np.asarray(batch["subcategory_id"])) >= 0)
        batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
        dim = self.backbone.embed_dim
        if len(keep) == 0:
            out = {k: np.zeros(0, dtype=np.int64) for k in ("postdate", "subcategory_id", "category_id")}
            return dict(out, pid=np.zeros(0, dtype=object), uid=np.zeros(0, dtype=object),
                        image_emb=np.zeros((0, dim), np.float32), text_emb=np.zeros((0, dim), np.float32))
        pre = self.preprocess(batch)
        with torch.inference_mode():
            pooled, _ = self.backbone.encode_image(torch.from_numpy(pre["pixels"]).to(self.device))
            text = self.backbone.encode_text(torch.from_numpy(pre["tokens"]).to(self.device))
        return {"pid": pre["pid"], "uid": pre["uid"], "postdate": pre["postdate"],
                "subcategory_id": pre["subcategory_id"], "category_id": pre["category_id"],
                "image_emb": F.normalize(pooled, dim=-1).float().cpu().numpy(),
                "text_emb": F.normalize(text, dim=-1).float().cpu().numpy()}


def write_prototypes(bank: PrototypeBank, members: dict, out_dir: str, *, randomly_initialised: bool) -> dict:
    """Write the bank and ``members.json`` into ``out_dir``, each whole (an object PUT, or a local
    write-then-rename); returns the stage's summary of them."""
    proto_path = bank.save(storage.join(out_dir, PROTOTYPES_FILE))
    members = dict(members, randomly_initialised=randomly_initialised)
    members_path = storage.write_json(storage.join(out_dir, MEMBERS_FILE), members, indent=1)
    sub = [c for c in members["classes"] if c["level"] == "subcategory"]
    cat = [c for c in members["classes"] if c["level"] == "category"]
    counts = [c["count"] for c in members["classes"]]
    summary = {
        "posts": int(sum(c["available"] for c in sub)),
        "empty_classes": int(sum(1 for c in counts if c == 0)),
        "min_count": int(min(counts)), "max_count": int(max(counts)),
        "counts": {"subcategory": {c["name"]: c["count"] for c in sub},
                   "category": {c["name"]: c["count"] for c in cat}},
        "prototypes_path": proto_path, "members_path": members_path,
        "backbone_randomly_initialised": randomly_initialised,
    }
    logger.info("prototypes: %d posts, %d classes, %d empty, members per class %d..%d -> %s",
                summary["posts"], len(counts), summary["empty_classes"], summary["min_count"],
                summary["max_count"], proto_path)
    return summary
