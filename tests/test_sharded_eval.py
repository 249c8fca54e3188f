"""Sharded validation: two gloo processes, each evaluating its shard and all-reducing the sums,
give exactly the metrics one process gets over all the posts (no Ray: torch.distributed only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from smpp_ray.config import ModelConfig
from smpp_ray.data.taxonomy_names import default_taxonomy
from smpp_ray.train.loop import evaluate
from smpp_ray.train.trainer import create_loss_fn

WORLD = 2
PROBE = 5


def _batch(model, size: int, seed: int) -> dict:
    """Random images, real tokens, labels (a third of them unknown: -1, left out of the top-1)."""
    g = torch.Generator().manual_seed(seed)
    side = model.backbone.image_size
    taxonomy = default_taxonomy()
    sub = torch.randint(0, taxonomy.num_subcategories, (size,), generator=g)
    cat = torch.tensor([taxonomy.parents[int(s)] for s in sub])
    sub_unknown = torch.arange(size) % 3 == 0
    cat_unknown = torch.arange(size) % 5 == 1  # some posts know only their category, some neither
    return {
        "pixels": torch.randn(size, 3, side, side, generator=g),
        "tokens": model.backbone.tokenize([f"post {seed}-{i} about {taxonomy.subcategories[int(s)]}"
                                           for i, s in enumerate(sub)]),
        "subcategory_id": torch.where(sub_unknown, -1, sub),
        "category_id": torch.where(cat_unknown, -1, cat),
        "label": torch.randn(size, generator=g, dtype=torch.float64),
        "pid": [f"p{seed}-{i}" for i in range(size)],
    }


def _hits(model, batch: dict) -> dict:
    """Every other labelled post relabelled as the model predicts it, so both top-1s are neither 0 nor 1."""
    with torch.no_grad():
        outputs = model(batch["pixels"], batch["tokens"])
    for key, logits in (("subcategory_id", "logits_sub"), ("category_id", "logits_cat")):
        hit = (batch[key] >= 0) & (torch.arange(len(batch["pid"])) % 2 == 0)
        batch[key] = torch.where(hit, outputs[logits].argmax(-1), batch[key])
    return batch


def _worker(rank: int, model, shards: dict[str, list[list[dict]]], store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {name: evaluate(model, per_rank[rank], create_loss_fn(model), torch.device("cpu"),
                                  probe_rows=PROBE if rank == 0 else 0, sharded=True)
                   for name, per_rank in shards.items()}
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def model():
    from smpp_ray.model.model import create_model

    torch.manual_seed(0)
    # Contrastive term on: a post's loss depends on its batch, which sharding by batch keeps.
    return create_model(ModelConfig(use_prototypes=False), default_taxonomy(), None).eval()


def test_sharded_evaluation_equals_one_process_over_all_posts(model, tmp_path):
    batches = [_hits(model, _batch(model, size, seed)) for seed, size in enumerate((6, 5, 6, 3, 4))]  # 24, ragged
    shards = {
        "round_robin": [batches[0::2], batches[1::2]],  # 3 batches (16 posts) vs 2 (8 posts)
        "one_rank_empty": [batches, []],  # val shorter than the worker group: a rank gets no rows
    }
    mp.spawn(_worker, args=(model, shards, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    single = evaluate(model, batches, create_loss_fn(model), torch.device("cpu"), probe_rows=PROBE)
    assert single["val_samples"] == 24
    assert 0 < single["val_top1"] < 1 and 0 < single["val_top1_cat"] < 1  # hits and misses on both heads

    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name, result in results.items():
            where = f"{name}, rank {rank}"
            assert set(result) == set(single) - ({"probe"} if rank else set()), where
            assert result["val_samples"] == single["val_samples"], where
            # Counts all-reduce exactly; the loss sum differs only in the order of its additions.
            assert result["val_top1"] == single["val_top1"], where
            assert result["val_top1_cat"] == single["val_top1_cat"], where
            assert result["val_loss"] == pytest.approx(single["val_loss"], rel=1e-9, abs=1e-12), where
    # The probe is rank 0's first rows: here the first batch in both cases, as in one process.
    probe = torch.load(tmp_path / "rank0.pt", weights_only=False)["round_robin"]["probe"]
    assert probe["pid"] == single["probe"]["pid"] == batches[0]["pid"][:PROBE]
    torch.testing.assert_close(probe["logits_sub"], single["probe"]["logits_sub"])


def test_unsharded_evaluation_without_a_process_group_is_the_plain_one(model):
    batches = [_batch(model, 4, seed) for seed in range(2)]
    plain = evaluate(model, batches, create_loss_fn(model), torch.device("cpu"))
    assert evaluate(model, batches, create_loss_fn(model), torch.device("cpu"), sharded=True) == plain
    with pytest.raises(ValueError, match="validation split is empty"):
        evaluate(model, [], create_loss_fn(model), torch.device("cpu"), sharded=True)
