"""Cache of frozen image-tower outputs by post id.

With the image tower frozen, its outputs for a given (un-augmented) image never change, and on
CPU the tower is most of a step's cost; computing them once and serving them from memory in
later epochs saves most of that. The cache is per worker and lives on the host: with
``streaming_split`` a worker meets different posts each epoch, so after a few epochs every
worker holds most posts (memory ~ posts x (1 + patches) x D floats per worker).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class ImageFeatureCache:
    """``pid -> (pooled (D,), patches (P, D))`` computed by ``backbone.encode_image``.

    Only valid while no image-tower weight trains; :meth:`check_frozen` enforces it, because a
    cache over a training tower would silently serve stale features.
    """

    def __init__(self) -> None:
        self._pooled: dict[str, torch.Tensor] = {}
        self._patches: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._pooled)

    @staticmethod
    def check_frozen(backbone: torch.nn.Module) -> None:
        """Raise unless every image-tower parameter is frozen."""
        if not getattr(backbone, "image_tower_frozen", False):
            raise ValueError("train.cache_image_features needs a frozen image tower, but the backbone "
                             "trains image-tower weights (model.unfreeze_image_blocks > 0); turn one off")

    @torch.no_grad()
    def features(self, backbone: torch.nn.Module, pixels: torch.Tensor,
                 pids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``(B, D)`` and patch ``(B, P, D)`` features on ``pixels.device``.

        Misses are encoded in one batch and stored on the host in float32; hits skip the tower.
        """
        if len(pids) != pixels.shape[0]:
            raise ValueError(f"{len(pids)} pids for a batch of {pixels.shape[0]} images")
        missing = [i for i, pid in enumerate(pids) if pid not in self._pooled]
        if missing:
            index = torch.as_tensor(missing, device=pixels.device)
            pooled, patches = backbone.encode_image(pixels.index_select(0, index))  # (M, D), (M, P, D)
            pooled, patches = pooled.float().cpu(), patches.float().cpu()
            for row, i in enumerate(missing):
                self._pooled[pids[i]] = pooled[row]
                self._patches[pids[i]] = patches[row]
        self.misses += len(missing)
        self.hits += len(pids) - len(missing)
        pooled = torch.stack([self._pooled[pid] for pid in pids]).to(pixels.device)  # (B, D)
        patches = torch.stack([self._patches[pid] for pid in pids]).to(pixels.device)  # (B, P, D)
        return pooled, patches
