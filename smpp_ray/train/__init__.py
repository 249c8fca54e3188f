"""Distributed prompt tuning on Ray Train over streamed Parquet shards.

``train_model`` runs a ``TorchTrainer`` (DDP on gloo or NCCL) fed by Ray Data; checkpoints hold
only the trainable state plus what rebuilds the model, ``resolve_checkpoint`` turns a train
stage or checkpoint location into the checkpoint's, and ``load_model_from_checkpoint`` gives the
trained model back outside Ray.

Names are imported on first use, so ``smpp_ray.train.checkpoint`` (the resolver) loads without
Ray Train, Ray Data or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "best_checkpoint": "smpp_ray.train.checkpoint",
    "load_model_from_checkpoint": "smpp_ray.train.checkpoint",
    "resolve_checkpoint": "smpp_ray.train.checkpoint",
    "train_loop_per_worker": "smpp_ray.train.trainer",
    "train_model": "smpp_ray.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
