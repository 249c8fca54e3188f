"""Distributed prompt tuning on Ray Train over streamed Parquet shards.

``train_model`` runs a ``TorchTrainer`` (DDP on gloo or NCCL) fed by Ray Data. What the trained
model is read back with lives below this package, for extraction and scoring to use without it:
the checkpoint format in :mod:`smpp_ray.model.checkpoint`, the kept ids of sample selection in
:mod:`smpp_ray.data.selection`.

Names are imported on first use, so importing the package costs no Ray Train import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train_loop_per_worker": "smpp_ray.train.trainer",
    "train_model": "smpp_ray.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
