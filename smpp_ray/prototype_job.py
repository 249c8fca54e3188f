"""The prototypes stage's Ray job: embed the train split on a Ray Data actor pool, select each
class's members in a group-by, and write the bank (:mod:`smpp_ray.model.prototypes` owns the
selection rules and the files; this module only distributes them)."""

from __future__ import annotations

import ray
import ray.data

from smpp_ray import storage
from smpp_ray.data.dataset import Dataset
from smpp_ray.model.backbone import PACKAGED_MODELS, backbone_spec
from smpp_ray.model.prototypes import (
    EMBED_INPUT_COLUMNS,
    EmbedPosts,
    assemble_prototypes,
    concat_members,
    select_group_members,
    write_prototypes,
)


def build_prototypes(data_dir: str, out_dir: str, *, backbone: str, pretrained: str = "", shots: int = 256,
                     time_buckets: int = 8, batch_size: int = 64, num_actors: int = 1,
                     num_gpus_per_actor: float = 0.0, seed: int = 0) -> dict:
    """Embed the train split with a Ray Data actor pool, select members, write the bank.

    ``data_dir`` and ``out_dir`` are locations (local paths or URIs); ``pretrained`` is a tag or
    a checkpoint location the actors fetch themselves. Writes ``out_dir/prototypes.safetensors``
    and ``out_dir/members.json`` (selected Pids and counts per class) and returns a summary:
    ``posts`` (labelled train posts embedded), ``empty_classes``, ``min_count`` / ``max_count``
    over the 88 classes, ``counts`` per level and class name, ``prototypes_path`` /
    ``members_path`` (full locations) and ``backbone_randomly_initialised``.
    """
    if shots < 1 or time_buckets < 1 or batch_size < 1 or num_actors < 1:
        raise ValueError(f"shots={shots}, time_buckets={time_buckets}, batch_size={batch_size} and "
                         f"num_actors={num_actors} must all be >= 1")
    data_dir, out_dir = storage.normalize(data_dir), storage.normalize(out_dir)
    taxonomy = Dataset(data_dir).taxonomy()
    train_dir = Dataset(data_dir).posts("train")
    if not storage.list_parquet_files(train_dir):
        raise ValueError(f"train split {train_dir!r} not found (no Parquet shards) in prepared dataset {data_dir!r}")
    device = "cuda" if num_gpus_per_actor > 0 else "cpu"
    embedded = ray.data.read_parquet(train_dir).select_columns(EMBED_INPUT_COLUMNS).map_batches(
        EmbedPosts,
        fn_constructor_kwargs={"backbone": backbone, "pretrained": pretrained, "device": device},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=num_gpus_per_actor or None,
    )
    # One partition per cluster CPU (at most one per class): Ray's default of 200 hash
    # partitions only adds scheduling overhead for at most 77 groups.
    partitions = max(1, min(taxonomy.num_subcategories, int(ray.cluster_resources().get("CPU", 1))))
    selected_ds = embedded.groupby("subcategory_id", num_partitions=partitions).map_groups(
        select_group_members, fn_kwargs={"shots": shots, "time_buckets": time_buckets, "seed": seed},
        batch_format="numpy")
    embed_dim = backbone_spec(backbone).embed_dim
    parts = list(selected_ds.iter_batches(batch_format="numpy", batch_size=None))
    selected = concat_members(parts, embed_dim)
    meta = {"backbone": backbone, "pretrained": pretrained}
    bank, members = assemble_prototypes(selected, taxonomy, shots=shots, time_buckets=time_buckets, seed=seed,
                                        embed_dim=embed_dim, metadata=meta)
    return write_prototypes(bank, members, out_dir, randomly_initialised=not pretrained and backbone in PACKAGED_MODELS)
