"""Cross-modal attention fusion over [image, post text, local feature, prototypes of both levels]."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

#: Token order of the fusion; a model uses the subset its ablation switches leave on.
MODALITIES = ("image", "text", "local", "visual_prototype_sub", "textual_prototype_sub",
              "visual_prototype_cat", "textual_prototype_cat")


class CrossModalFusion(nn.Module):
    """Self-attention with modality embeddings over a small token set, read out by a [CLS] token.

    Every input token is a ``(B, D)`` vector; each gets its modality's learned embedding, a
    learned [CLS] token is prepended, ``layers`` pre-norm Transformer encoder layers mix them and
    the normalised [CLS] output is the fused vector ``(B, D)``. No dropout: train and eval
    outputs agree, which makes checkpoints reproducible bit for bit.
    """

    def __init__(self, dim: int, modalities: tuple[str, ...], layers: int = 1, heads: int = 4) -> None:
        super().__init__()
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown fusion modality {unknown[0]!r}; expected one of {MODALITIES}")
        if dim % heads:
            raise ValueError(f"fusion_heads={heads} must divide the embedding width {dim}")
        self.modalities = tuple(modalities)
        self.modality_embedding = nn.Parameter(torch.randn(len(modalities), dim) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [m for m in self.modalities if m not in tokens]
        if missing:
            raise ValueError(f"fusion input lacks {missing}; got {sorted(tokens)}")
        x = torch.stack([tokens[m] for m in self.modalities], dim=1) + self.modality_embedding  # (B, M, D)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        x = self.encoder(torch.cat([cls, x], dim=1))  # (B, 1 + M, D)
        return self.norm(x[:, 0])


def mean_fusion(tokens: Mapping[str, torch.Tensor], modalities: tuple[str, ...]) -> torch.Tensor:
    """The fusion-off ablation: the plain average of the token set ``(B, D)``."""
    return torch.stack([tokens[m] for m in modalities], dim=1).mean(dim=1)
