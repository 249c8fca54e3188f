"""The CLIP backbone: the one module that touches open_clip internals.

Everything else in :mod:`smpp_ray.model` talks to a :class:`Backbone`, never to open_clip
directly, so an open_clip upgrade that moves an attribute breaks one file and its parity test
(``tests/test_backbone.py``), not the whole model.

The text path :meth:`Backbone.encode_text_embeddings` re-implements open_clip 3.x
``CLIP.encode_text`` from token *embeddings* so prompts (learnable vectors spliced between
frozen token embeddings) can be encoded: batch-first transformer, the tower's causal attention
mask (plus its padding mask in bidirectional mode), ``ln_final`` before pooling, the tower's
``pool_type`` (``argmax`` = the end-of-text token, ``eos``, ``first``, ``last``) and
``text_projection`` as a Parameter or an ``nn.Linear``.

Importing this module registers the packaged architectures in ``model_configs/`` (the tiny
``smpp-tiny-clip`` used by tests and the demo) with ``open_clip.add_model_config``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from smpp_ray import console, storage

logger = logging.getLogger(__name__)
#: Backbones whose random initialisation this process has already warned about.
_RANDOM_INIT_WARNED: set[str] = set()

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_MODEL = "smpp-tiny-clip"
#: Architectures shipped with the package; only these may be randomly initialised.
PACKAGED_MODELS = (TINY_MODEL,)
#: Seed of the random initialisation of packaged models: the prototypes stage, training and
#: extraction each build the backbone in their own process and must get the same weights.
RANDOM_INIT_SEED = 0

open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the system needs to know about a backbone without loading its weights:
    what the preprocessor must produce (image side, text length, normalisation) and the width of
    the joint embedding."""

    backbone: str
    image_size: int
    context_length: int
    embed_dim: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def backbone_spec(name: str, context_length: int = 0) -> BackboneSpec:
    """Read a backbone's :class:`BackboneSpec` from its open_clip config (no weights are loaded).

    ``context_length`` 0 keeps the backbone's own text length (``model.context_length``).
    """
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown backbone {name!r}; expected an open_clip model name")
    size = cfg["vision_cfg"]["image_size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    native = int(cfg.get("text_cfg", {}).get("context_length", 77))
    preprocess = cfg.get("preprocess_cfg", {}) or {}
    mean, std = preprocess.get("mean"), preprocess.get("std")
    return BackboneSpec(name, size, context_length or native, int(cfg["embed_dim"]),
                        tuple(mean) if mean else None, tuple(std) if std else None)


def _looks_like_path(value: str) -> bool:
    return storage.is_uri(value) or os.sep in value or value.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _weights_file(name: str, pretrained: str, tags: list[str]) -> str:
    """The local file holding the checkpoint at location ``pretrained``: itself when local, else
    this node's cached copy (fetched once per node and version); a clear error when missing."""
    try:
        found = storage.is_file(pretrained)
    except (storage.StorageError, OSError) as err:  # unknown scheme, unreachable bucket, ...
        raise ValueError(f"checkpoint file {pretrained!r} for backbone {name!r} cannot be read: {err}") from err
    if not found:
        what = "checkpoint file" if _looks_like_path(pretrained) else "pretrained tag or checkpoint file"
        raise ValueError(f"{what} {pretrained!r} for backbone {name!r} not found; provide an existing "
                         f"checkpoint file (local path or URI) or one of the tags {tags}")
    local = storage.local_copy(pretrained)
    logger.info("loading backbone %s weights from %s (weights only)", name, pretrained)
    return local


def _load_open_clip(name: str, pretrained: str) -> tuple[nn.Module, bool]:
    """Build the open_clip model; returns it and whether it is randomly initialised."""
    if name not in open_clip.list_models():
        raise ValueError(f"unknown backbone {name!r}; expected an open_clip model name "
                         f"(e.g. ViT-B-16) or one of the packaged {list(PACKAGED_MODELS)}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not pretrained:
        if name not in PACKAGED_MODELS:
            raise ValueError(
                f"backbone {name!r} needs pretrained weights: set model.pretrained to an open_clip "
                f"tag ({', '.join(tags) or 'none known'}) or a checkpoint file (local path or URI); "
                f"random initialisation is only allowed for {list(PACKAGED_MODELS)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(name, pretrained=None)
        # Once per process on the console: every model load in a stage would repeat it.
        log = logger.warning if name not in _RANDOM_INIT_WARNED else console.details(__name__).info
        _RANDOM_INIT_WARNED.add(name)
        log("backbone %s randomly initialised (seed %d): no pretrained weights; set model.pretrained "
            "to an open_clip tag or checkpoint file for a pretrained CLIP", name, RANDOM_INIT_SEED)
        return model, True
    weights = pretrained if pretrained in tags else _weights_file(name, pretrained, tags)
    try:
        model = open_clip.create_model(name, pretrained=weights, weights_only=True)
    except RuntimeError as err:  # open_clip raises RuntimeError when a tag cannot be fetched
        raise ValueError(f"could not load weights {pretrained!r} for backbone {name!r} ({err}); "
                         f"download the checkpoint and set model.pretrained to its location") from err
    return model, False


class Backbone(nn.Module):
    """A frozen open_clip model with the image and text paths the prompt model needs.

    Attributes: ``embed_dim`` (joint space D), ``text_width`` (W, token embedding width),
    ``image_size``, ``num_patches`` (P), ``context_length`` (L), ``eot_token_id``, ``pad_token_id``,
    ``image_mean`` / ``image_std``, ``randomly_initialised``, ``logit_scale``.
    """

    def __init__(self, clip: nn.Module, name: str, pretrained: str, randomly_initialised: bool,
                 context_length: int = 0) -> None:
        super().__init__()
        self.clip = clip
        self.name = name
        self.pretrained = pretrained
        self.randomly_initialised = randomly_initialised
        if not isinstance(clip.visual, VisionTransformer):
            raise ValueError(f"backbone {name!r} has a {type(clip.visual).__name__} image tower; "
                             "patch tokens need an open_clip VisionTransformer")
        text = getattr(clip, "text", clip)  # CustomTextCLIP keeps a TextTransformer in .text
        if text is not clip and not isinstance(text, TextTransformer):
            raise ValueError(f"backbone {name!r} has a {type(text).__name__} text tower; "
                             "prompt tuning needs an open_clip TextTransformer")
        if getattr(text, "cls_emb", None) is not None:
            raise ValueError(f"backbone {name!r} appends a CLS token to text (CoCa); not supported")
        self._custom_text = text is not clip
        native = int(self._positional_embedding.shape[0])
        self.context_length = context_length or native
        if not 1 <= self.context_length <= native:
            raise ValueError(f"context_length {context_length} for backbone {name!r} must be in [1, {native}]")
        self.embed_dim = int(clip.visual.output_dim)
        self.text_width = int(self.token_embedding.weight.shape[1])
        size = clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        grid = clip.visual.grid_size
        self.num_patches = int(grid[0] * grid[1])
        preprocess = getattr(clip.visual, "preprocess_cfg", {}) or {}
        self.image_mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.image_std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
        self._tokenizer = open_clip.get_tokenizer(name, context_length=self.context_length)
        self.eot_token_id = int(getattr(self._tokenizer, "eot_token_id", getattr(text, "eos_id", 0)))
        self.pad_token_id = int(getattr(text, "pad_id", 0))

    # -- text tower pieces (CLIP keeps them on the model, CustomTextCLIP on .text) -------------
    @property
    def _tower(self) -> nn.Module:
        return self.clip.text if self._custom_text else self.clip

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._tower.token_embedding

    @property
    def _positional_embedding(self) -> torch.Tensor:
        return self._tower.positional_embedding

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``(B, L)`` int64 with this backbone's tokenizer and context length."""
        return self._tokenizer(list(texts)).long()

    def text_attention_mask(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive mask open_clip uses for a token batch of length ``tokens.shape[1]``."""
        tower = self._tower
        length = tokens.shape[1]
        mask = tower.attn_mask
        if mask is not None:
            mask = mask[:length, :length].to(dtype)
        if self._custom_text and tower.use_pad_mask:  # bidirectional towers mask pads
            pad = tower._build_additive_mask(tokens, length, dtype)  # (B*heads, L, L)
            mask = pad if mask is None else mask.unsqueeze(0) + pad
        return mask

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor,
                               return_tokens: bool = False
                               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode token embeddings ``(B, L, W)`` (before positional embedding) to ``(B, D)``.

        ``tokens`` ``(B, L)`` are the ids the pooling and padding mask read (for prompts: any id
        at learnable positions that is neither the end-of-text id nor padding). With
        ``return_tokens`` also returns every position projected to the joint space ``(B, L, D)``.
        Not normalised.
        """
        tower = self._tower
        transformer = tower.transformer
        cast_dtype = transformer.get_cast_dtype()
        length = embeddings.shape[1]
        x = embeddings.to(cast_dtype) + self._positional_embedding[:length].to(cast_dtype)
        x = transformer(x, attn_mask=self.text_attention_mask(tokens, x.dtype))  # (B, L, W), batch-first
        x = tower.ln_final(x)
        pool_type = tower.pool_type if self._custom_text else tower.text_pool_type
        eos_id = getattr(tower, "eos_id" if self._custom_text else "text_eos_id", None)
        pooled = text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)  # (B, W)
        pooled = self._project_text(pooled)
        if return_tokens:
            return pooled, self._project_text(x)  # (B, D), (B, L, D)
        return pooled

    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        projection = self._tower.text_projection
        if projection is None:
            return x
        if isinstance(projection, nn.Linear):
            return projection(x)
        return x @ projection

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embedding ``(B, D)`` of token ids ``(B, L)``; equals open_clip's ``encode_text``."""
        pooled = self.encode_text_embeddings(self.token_embedding(tokens), tokens)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    @property
    def logit_scale(self) -> float:
        """CLIP's own learned temperature ``exp(logit_scale)``: zero-shot logits are this times the
        cosine of image and class text embeddings (1/0.07 in a randomly initialised model)."""
        return float(self.clip.logit_scale.detach().exp())

    # -- image tower ----------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled image embedding ``(B, D)`` and patch tokens ``(B, P, D)``, both unnormalised.

        The pooled vector equals open_clip's ``encode_image``. Patch tokens take the same final
        LayerNorm and projection as the pooled token, so they live in the joint space and can be
        compared with projected text tokens.
        """
        visual = self.clip.visual
        x = visual._embeds(pixels)
        x = visual.transformer(x)  # (B, 1 + P, width)
        pooled, patches = visual._pool(x)
        if visual.final_ln_after_pool and visual.attn_pool is None:
            patches = visual.ln_post(patches)  # _pool normalises only the pooled token then
        if visual.proj is not None:
            pooled = pooled @ visual.proj
            patches = patches @ visual.proj  # (B, P, D)
        return pooled, patches

    # -- freezing -------------------------------------------------------------------------------
    def set_trainable(self, unfreeze_image_blocks: int = 0, unfreeze_text_blocks: int = 0) -> None:
        """Freeze every weight, then unfreeze the last N blocks (+ final norm, projection) per tower."""
        self.requires_grad_(False)
        visual = self.clip.visual
        image_blocks = visual.transformer.resblocks
        text_blocks = self._tower.transformer.resblocks
        for what, n, blocks in (("image", unfreeze_image_blocks, image_blocks),
                                ("text", unfreeze_text_blocks, text_blocks)):
            if not 0 <= n <= len(blocks):
                raise ValueError(f"unfreeze_{what}_blocks={n} but backbone {self.name!r} has "
                                 f"{len(blocks)} {what} blocks")
        if unfreeze_image_blocks:
            for block in image_blocks[-unfreeze_image_blocks:]:
                block.requires_grad_(True)
            visual.ln_post.requires_grad_(True)
            if visual.proj is not None:
                visual.proj.requires_grad_(True)
        if unfreeze_text_blocks:
            for block in text_blocks[-unfreeze_text_blocks:]:
                block.requires_grad_(True)
            self._tower.ln_final.requires_grad_(True)
            projection = self._tower.text_projection
            if projection is not None:
                projection.requires_grad_(True)

    @property
    def image_tower_frozen(self) -> bool:
        """True when no image-tower weight trains (cached image features are then valid)."""
        return not any(p.requires_grad for p in self.clip.visual.parameters())


def create_backbone(name: str, pretrained: str = "", unfreeze_image_blocks: int = 0,
                    unfreeze_text_blocks: int = 0, context_length: int = 0) -> Backbone:
    """Create a :class:`Backbone` from an open_clip model name and weights.

    ``pretrained`` is an open_clip tag or a checkpoint file (loaded weights-only) at any location
    :mod:`smpp_ray.storage` reads: a local path, or a URI (``s3://...``) that each node fetches
    once into its cache, so workers on other nodes need no copy of the driver's files. Empty
    means random initialisation, allowed only for the packaged tiny architecture (and logged);
    any other model without weights, or a checkpoint that does not exist, is a ``ValueError``
    naming what to provide. Towers are frozen except the last ``unfreeze_*_blocks`` blocks.
    ``context_length`` 0 keeps the model's own; a shorter one truncates the text.
    """
    clip, random_init = _load_open_clip(name, pretrained)
    clip.eval()
    backbone = Backbone(clip, name, pretrained, random_init, context_length=context_length)
    backbone.set_trainable(unfreeze_image_blocks, unfreeze_text_blocks)
    return backbone
