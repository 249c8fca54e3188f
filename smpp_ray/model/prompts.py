"""Dual-grained prompts: global (class-level, CoOp) and local (post-level, token-to-patch).

Frozen is structural here as in CoOp: the token embeddings of the fixed prompt pieces are
buffers built once from the frozen backbone; only the context vectors (and the small
aggregation weights of the local prompt) are Parameters. Neither module keeps a reference to
the backbone (that would register its weights twice); the backbone is passed to ``forward``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smpp_ray.model.backbone import Backbone

logger = logging.getLogger(__name__)


def _content_length(backbone: Backbone, tokens: torch.Tensor) -> int:
    """Tokens between start and end of text in one tokenised row ``(L,)``."""
    ends = (tokens == backbone.eot_token_id).nonzero()
    return int(ends[0]) - 1 if len(ends) else int((tokens != backbone.pad_token_id).sum()) - 1


class GlobalPromptLearner(nn.Module):
    """CoOp prompts ``[SOT] ctx_1 .. ctx_n <class name> . [EOT]`` -> one text feature per class.

    ``ctx`` is ``(n_ctx, W)`` shared by all classes, or ``(n_classes, n_ctx, W)`` when
    ``class_specific``; it is initialised from the token embeddings of ``ctx_init`` (which must
    tokenise to exactly ``n_ctx`` tokens) or randomly (std 0.02) when ``ctx_init`` is empty.
    """

    def __init__(self, backbone: Backbone, class_names: Sequence[str], n_ctx: int, ctx_init: str = "",
                 class_specific: bool = False) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if not class_names:
            raise ValueError("global prompts need at least one class name")
        width = backbone.text_width
        n_classes = len(class_names)
        if ctx_init:
            init_tokens = backbone.tokenize([ctx_init])[0]
            found = _content_length(backbone, init_tokens)
            if found != n_ctx:
                raise ValueError(f"ctx_init {ctx_init!r} tokenises to {found} tokens but n_ctx is {n_ctx}")
            with torch.no_grad():
                ctx = backbone.token_embedding(init_tokens[None])[0, 1:1 + n_ctx].clone()  # (n_ctx, W)
            prefix_text = ctx_init
        else:
            ctx = torch.randn(n_ctx, width) * 0.02
            prefix_text = " ".join(["X"] * n_ctx)  # placeholders, replaced by ctx
        if class_specific:
            ctx = ctx[None].repeat(n_classes, 1, 1)  # (n_classes, n_ctx, W)
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = n_ctx
        self.class_names = [name.replace("_", " ") for name in class_names]
        tokens = backbone.tokenize([f"{prefix_text} {name}." for name in self.class_names])  # (n_classes, L)
        with torch.no_grad():
            embedded = backbone.token_embedding(tokens)  # (n_classes, L, W)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:].clone(), persistent=False)  # name . EOT pad

    def forward(self, backbone: Backbone) -> torch.Tensor:
        """Normalised class text features ``(n_classes, D)``."""
        n_classes = self.tokens.shape[0]
        ctx = self.ctx if self.ctx.ndim == 3 else self.ctx[None].expand(n_classes, -1, -1)
        prompts = torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)  # (n_classes, L, W)
        return F.normalize(backbone.encode_text_embeddings(prompts, self.tokens), dim=-1)


class LocalPrompt(nn.Module):
    """Learnable tokens on the post's own text and token-to-patch alignment.

    ``encode`` splices ``n_tokens`` learnable vectors after the start token (the text is cut by
    ``n_tokens`` positions, keeping its end token) and returns the pooled text embedding and
    every token projected to the joint space. ``align`` computes cosine similarities
    ``(B, T, P)`` between text tokens and image patches, attends from each token over patches
    (similarity plus learned spatial weights), and pools tokens with learned token weights into
    a local feature ``(B, D)`` and an alignment score ``(B,)``.
    """

    def __init__(self, backbone: Backbone, n_tokens: int) -> None:
        super().__init__()
        if n_tokens < 0 or n_tokens >= backbone.context_length - 2:
            raise ValueError(f"n_local_tokens must be in [0, {backbone.context_length - 3}], got {n_tokens}")
        dim = backbone.embed_dim
        self.n_tokens = n_tokens
        self.ctx = nn.Parameter(torch.randn(n_tokens, backbone.text_width) * 0.02) if n_tokens else None
        self.patch_logits = nn.Parameter(torch.zeros(backbone.num_patches))  # learned spatial weights
        # Learned token weights; no bias: a softmax over tokens cancels it (it would never learn).
        self.token_scorer = nn.Linear(dim, 1, bias=False)
        self.log_sim_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.eot_token_id = backbone.eot_token_id
        self.pad_token_id = backbone.pad_token_id
        # An id for the learnable positions that pooling and padding masks treat as plain text.
        self.placeholder_id = next(i for i in (1, 2, 3) if i not in (self.eot_token_id, self.pad_token_id))

    def splice_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` with the learnable positions inserted after the start token."""
        if not self.n_tokens:
            return tokens
        keep = tokens.shape[1] - self.n_tokens
        cut = tokens[:, :keep].clone()
        overflow = (tokens[:, keep:] != self.pad_token_id).any(dim=1)
        cut[overflow, keep - 1] = self.eot_token_id  # the tokenizer's own truncation rule
        fill = torch.full((tokens.shape[0], self.n_tokens), self.placeholder_id, dtype=tokens.dtype, device=tokens.device)
        return torch.cat([cut[:, :1], fill, cut[:, 1:]], dim=1)

    def encode(self, backbone: Backbone, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled text ``(B, D)``, token features ``(B, L, D)`` and the valid-token mask ``(B, L)``."""
        ids = self.splice_ids(tokens)
        embedded = backbone.token_embedding(ids)  # (B, L, W)
        if self.n_tokens:
            ctx = self.ctx.to(embedded.dtype)[None].expand(ids.shape[0], -1, -1)
            start, end = 1, 1 + self.n_tokens
            embedded = torch.cat([embedded[:, :start], ctx, embedded[:, end:]], dim=1)
        pooled, token_features = backbone.encode_text_embeddings(embedded, ids, return_tokens=True)
        valid = ids != self.pad_token_id
        valid[:, 0] = False  # the start token's output is the same for every post
        return pooled, token_features, valid

    def align(self, token_features: torch.Tensor, valid: torch.Tensor, patches: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local feature ``(B, D)``, token-to-patch similarities ``(B, T, P)``, score ``(B,)``."""
        text = F.normalize(token_features, dim=-1)  # (B, T, D)
        image = F.normalize(patches, dim=-1)  # (B, P, D)
        sim = text @ image.transpose(1, 2)  # (B, T, P)
        attention = torch.softmax(sim * self.log_sim_scale.exp() + self.patch_logits, dim=-1)  # over patches
        attended = attention @ image  # (B, T, D) the image as each token sees it
        token_logits = self.token_scorer(text).squeeze(-1).masked_fill(~valid, float("-inf"))  # (B, T)
        token_weights = torch.softmax(token_logits, dim=-1)
        local = (token_weights.unsqueeze(-1) * attended).sum(dim=1)  # (B, D)
        score = (token_weights * (attention * sim).sum(dim=-1)).sum(dim=-1)  # (B,)
        return local, sim, score
