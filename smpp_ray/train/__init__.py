"""Distributed prompt tuning on Ray Train over streamed Parquet shards.

``train_model`` runs a ``TorchTrainer`` (DDP on gloo or NCCL) fed by Ray Data; checkpoints hold
only the trainable state plus what rebuilds the model, and ``load_model_from_checkpoint``
gives the trained model back outside Ray.
"""

from smpp_ray.train.checkpoint import load_model_from_checkpoint
from smpp_ray.train.trainer import train_loop_per_worker, train_model

__all__ = ["load_model_from_checkpoint", "train_loop_per_worker", "train_model"]
