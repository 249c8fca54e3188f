"""The SMPP network: frozen CLIP + dual-grained prompts + prototypes + cross-modal fusion.

``forward(pixels, tokens)`` returns a dict (all ``B`` rows, ``S`` = 77 subcategories,
``C`` = 11 categories, ``D`` = the backbone's joint width):

==================== ========== ==========================================================
key                  shape      meaning
==================== ========== ==========================================================
logits_sub           (B, S)     linear head on the fused vector + ``logits_global`` (when on)
logits_global        (B, S)     the global-prompt head alone (global prompts on only): with
                                ``global_head`` ``coop``, CoOp's ``scale * cos(CLIP image
                                embedding, class text feature)``, which with CLIP's own
                                temperature and untrained context equals CLIP's zero-shot logits
logits_cat           (B, C)     logsumexp of each category's children in ``logits_sub``, no
                                head of its own: softmax(logits_cat) is the sum of the
                                children's softmax(logits_sub) (-inf for a childless category)
pred_subcategory     (B,)       argmax of ``logits_sub`` (int64)
pred_category        (B,)       the parent of ``pred_subcategory`` (int64; see below)
fused                (B, D)     the cross-modal fusion output (feature for the regressor)
image_embedding      (B, D)     normalised pooled image embedding (frozen tower)
text_embedding       (B, D)     normalised post-text embedding (with local prompt tokens)
proto_sim_visual     (B, S+C)   cosine of the image embedding to the visual prototypes
proto_sim_text       (B, S+C)   cosine of the text embedding to the textual prototypes
local_feature        (B, D)     token-to-patch alignment feature (zeros with local off)
local_score          (B,)       token-to-patch alignment score (zeros with local off)
logit_scale          ()         the InfoNCE temperature (exp of a learned log-scale)
proto_align_sub      (B, S)     fused-vs-prototype logits (prototypes on only; for the loss)
proto_align_cat      (B, C)     same for categories (prototypes on only)
regression           (B,)       direct popularity regression (direct_regression only)
==================== ========== ==========================================================

Without a prototype bank the two ``proto_sim_*`` outputs are zeros.

The fusion's prototype tokens are soft at both levels: the subcategory (category) visual and
textual prototypes weighted by a softmax over the post's own similarities to that level's
prototypes, so no label enters the forward pass.

Summing children's probabilities makes the category distribution consistent with the
subcategory one, but not the argmaxes: one category's several middling children can outweigh
another's single best subcategory. ``pred_category`` is therefore the parent of the predicted
subcategory (the 77-way prediction decides), so the two predictions always agree.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from smpp_ray import console, storage
from smpp_ray.config import ModelConfig
from smpp_ray.data.schema import Taxonomy
from smpp_ray.model.backbone import Backbone, create_backbone
from smpp_ray.model.fusion import CrossModalFusion, mean_fusion
from smpp_ray.model.losses import compute_losses
from smpp_ray.model.prompts import GlobalPromptLearner, LocalPrompt
from smpp_ray.model.prototypes import PROTOTYPES_FILE, PrototypeBank

logger = logging.getLogger(__name__)

_MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale)


class SMPPModel(nn.Module):
    """Prompt-tuned CLIP classifier of posts into subcategories and categories.

    Only prompts, fusion, heads and temperatures train (plus any unfrozen backbone blocks);
    :meth:`trainable_state_dict` is exactly those parameters.
    """

    def __init__(self, config: ModelConfig, taxonomy: Taxonomy, backbone: Backbone,
                 bank: PrototypeBank | None = None) -> None:
        super().__init__()
        if config.use_prototypes and bank is None:
            raise ValueError("model.use_prototypes is on but no prototypes were given; run `smpp prototypes` "
                             "and pass its prototypes.safetensors, or set model.use_prototypes=false")
        dim = backbone.embed_dim
        num_sub, num_cat = taxonomy.num_subcategories, taxonomy.num_categories
        if bank is not None:
            expected = (num_sub + num_cat, dim)
            if (bank.num_subcategories, tuple(bank.visual.shape)) != (num_sub, expected):
                raise ValueError(f"prototype bank has {bank.num_subcategories} subcategories and shape "
                                 f"{tuple(bank.visual.shape)}; the model needs {num_sub} and {expected}")
            built_with = bank.metadata.get("backbone")
            if built_with and built_with != backbone.name:
                raise ValueError(f"prototypes were built with backbone {built_with!r}, the model uses "
                                 f"{backbone.name!r}; rebuild them with the model's backbone")
        self.config = config
        self.taxonomy = taxonomy
        self.backbone = backbone
        self.bank = bank
        self.global_prompts = (GlobalPromptLearner(backbone, taxonomy.subcategories, config.n_ctx, config.ctx_init,
                                                   config.class_specific_ctx)
                               if config.use_global_prompts else None)
        self.local_prompts = LocalPrompt(backbone, config.n_local_tokens) if config.use_local_prompts else None
        modalities = ["image", "text"]
        if config.use_local_prompts:
            modalities.append("local")
        if config.use_prototypes:
            modalities += ["visual_prototype_sub", "textual_prototype_sub", "visual_prototype_cat",
                           "textual_prototype_cat"]
        self.modalities = tuple(modalities)
        self.fusion = (CrossModalFusion(dim, self.modalities, config.fusion_layers, config.fusion_heads)
                       if config.use_fusion else None)
        self.head_sub = nn.Linear(dim, num_sub)
        init_scale = math.log(1 / 0.07)
        global_on = config.use_global_prompts
        # CoOp scores with CLIP's own temperature, so the untrained head gives CLIP's zero-shot logits.
        self.log_scale_global = (nn.Parameter(torch.tensor(math.log(backbone.logit_scale)))
                                 if global_on and config.global_head in ("coop", "both") else None)
        self.log_scale_global_fused = (nn.Parameter(torch.tensor(init_scale))
                                       if global_on and config.global_head in ("fused", "both") else None)
        self.log_scale_contrastive = nn.Parameter(torch.tensor(init_scale))
        self.log_scale_prototype = nn.Parameter(torch.tensor(math.log(10.0))) if config.use_prototypes else None
        self.head_regression = nn.Linear(dim, 1) if config.direct_regression else None
        children = torch.zeros(num_cat, num_sub, dtype=torch.bool)
        children[torch.tensor(taxonomy.parents), torch.arange(num_sub)] = True
        self.register_buffer("children_mask", children, persistent=False)  # (C, S)
        self.register_buffer("parents", torch.tensor(taxonomy.parents, dtype=torch.long), persistent=False)  # (S,)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor | None, tokens: torch.Tensor, *,
                image_features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of a batch; ``image_features=(pooled, patches)`` skips the image tower."""
        if image_features is None:
            if pixels is None:
                raise ValueError("forward needs pixels or image_features=(pooled, patches)")
            image_features = self.backbone.encode_image(pixels)
        pooled, patches = image_features  # (B, D), (B, P, D)
        image = F.normalize(pooled, dim=-1)
        batch = image.shape[0]
        out: dict[str, torch.Tensor] = {"image_embedding": image}

        if self.local_prompts is not None:
            text_pooled, token_features, valid = self.local_prompts.encode(self.backbone, tokens)
            local, _, local_score = self.local_prompts.align(token_features, valid, patches)
        else:
            text_pooled = self.backbone.encode_text(tokens)
            local, local_score = image.new_zeros(batch, image.shape[1]), image.new_zeros(batch)
        text = F.normalize(text_pooled, dim=-1)
        out.update(text_embedding=text, local_feature=local, local_score=local_score)

        fusion_tokens = {"image": image, "text": text, "local": local}
        if self.bank is not None:
            sim_visual = self.bank.similarities(image, "visual")  # (B, S + C)
            sim_text = self.bank.similarities(text, "textual")
        else:
            sim_visual = sim_text = image.new_zeros(batch, self.taxonomy.num_subcategories + self.taxonomy.num_categories)
        out.update(proto_sim_visual=sim_visual, proto_sim_text=sim_text)
        if self.config.use_prototypes:
            fusion_tokens.update(self._soft_prototypes(sim_visual, sim_text))

        fused = (self.fusion(fusion_tokens) if self.fusion is not None
                 else mean_fusion(fusion_tokens, self.modalities))  # (B, D)
        out["fused"] = fused
        out.update(self._heads(fused, image))
        out["logit_scale"] = self._scale(self.log_scale_contrastive)
        return out

    def _soft_prototypes(self, sim_visual: torch.Tensor, sim_text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each level's prototypes, softly: a softmax over the post's similarity to that level's
        prototypes (mean of visual and textual) weights its visual and textual rows."""
        num_sub = self.taxonomy.num_subcategories
        scale = self._scale(self.log_scale_prototype)
        visual, textual = self.bank.normalized("visual"), self.bank.normalized("textual")  # (S + C, D)
        tokens: dict[str, torch.Tensor] = {}
        for level, rows in (("sub", slice(0, num_sub)), ("cat", slice(num_sub, None))):
            weights = torch.softmax(scale * 0.5 * (sim_visual[:, rows] + sim_text[:, rows]), dim=-1)  # (B, S) or (B, C)
            tokens[f"visual_prototype_{level}"] = weights @ visual[rows]  # (B, D)
            tokens[f"textual_prototype_{level}"] = weights @ textual[rows]
        return tokens

    def _heads(self, fused: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        logits_sub = self.head_sub(fused)  # (B, S)
        unit = F.normalize(fused, dim=-1)
        if self.global_prompts is not None:
            class_text = self.global_prompts(self.backbone)  # (S, D), normalised
            logits_global = torch.zeros_like(logits_sub)
            if self.log_scale_global is not None:  # CoOp: CLIP's image embedding vs class text
                logits_global = logits_global + self._scale(self.log_scale_global) * image @ class_text.t()
            if self.log_scale_global_fused is not None:
                logits_global = logits_global + self._scale(self.log_scale_global_fused) * unit @ class_text.t()
            out["logits_global"] = logits_global
            logits_sub = logits_sub + logits_global
        children = logits_sub.unsqueeze(1).masked_fill(~self.children_mask, float("-inf"))  # (B, C, S)
        out["logits_sub"] = logits_sub
        out["logits_cat"] = torch.logsumexp(children, dim=-1)  # (B, C); a childless category: -inf
        out["pred_subcategory"] = logits_sub.argmax(dim=-1)
        out["pred_category"] = self.parents[out["pred_subcategory"]]
        if self.config.use_prototypes:
            anchors = F.normalize(self.bank.normalized("visual") + self.bank.normalized("textual"), dim=-1)  # (S + C, D)
            align = self._scale(self.log_scale_prototype) * unit @ anchors.t()
            num_sub = self.taxonomy.num_subcategories
            out["proto_align_sub"], out["proto_align_cat"] = align[:, :num_sub], align[:, num_sub:]
        if self.head_regression is not None:
            out["regression"] = self.head_regression(fused).squeeze(-1)
        return out

    @staticmethod
    def _scale(log_scale: torch.Tensor) -> torch.Tensor:
        return log_scale.exp().clamp(max=_MAX_LOGIT_SCALE)

    # -- losses and trainable state ---------------------------------------------------------------
    def compute_losses(self, outputs: dict[str, torch.Tensor], subcategory_id: torch.Tensor,
                       category_id: torch.Tensor, label: torch.Tensor | None = None,
                       reduction: str = "mean") -> dict[str, torch.Tensor]:
        """:func:`smpp_ray.model.losses.compute_losses` with this model's configured weights."""
        c = self.config
        return compute_losses(outputs, subcategory_id, category_id, label, weight_ce_sub=c.weight_ce_sub,
                              weight_ce_cat=c.weight_ce_cat, weight_contrastive=c.weight_contrastive,
                              weight_prototype=c.weight_prototype,
                              weight_regression=c.weight_regression if c.direct_regression else 0.0,
                              reduction=reduction)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the trainable parameters (detached), by name: what a checkpoint holds."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`trainable_state_dict`; its keys must be exactly this model's trainable ones."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"trainable state does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} (was it saved with another model config?)")
        with torch.no_grad():
            for name, p in params.items():
                if state[name].shape != p.shape:
                    raise ValueError(f"trainable state {name!r} has shape {tuple(state[name].shape)}, "
                                     f"the model expects {tuple(p.shape)}")
                p.copy_(state[name])

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts (for logs and the model card)."""
        return {"trainable": sum(p.numel() for p in self.trainable_parameters()),
                "total": sum(p.numel() for p in self.parameters())}


def create_model(config: ModelConfig, taxonomy: Taxonomy, prototypes_path: str | None) -> SMPPModel:
    """Build the model from its config, the dataset taxonomy and the prototypes file.

    ``prototypes_path`` is a location (local path or URI) of the ``.safetensors`` file or of the
    folder holding it; it may be None only with ``config.use_prototypes`` off. When given, the
    bank is loaded even with prototypes off (its similarities are still features).
    """
    backbone = create_backbone(config.backbone, config.pretrained, config.unfreeze_image_blocks,
                               config.unfreeze_text_blocks, context_length=config.context_length)
    if prototypes_path and storage.is_dir(prototypes_path):  # a `smpp prototypes` output folder
        prototypes_path = storage.join(prototypes_path, PROTOTYPES_FILE)
    bank = PrototypeBank.load(prototypes_path) if prototypes_path else None
    model = SMPPModel(config, taxonomy, backbone, bank)
    counts = model.parameter_counts()
    console.details(__name__).info("SMPP model on %s%s: %d trainable of %d parameters", config.backbone,
                " (randomly initialised)" if backbone.randomly_initialised else "", counts["trainable"], counts["total"])
    return model


def seeded_model(config: ModelConfig, taxonomy: Taxonomy, prototypes_path: str | None, seed: int) -> SMPPModel:
    """:func:`create_model` after seeding torch: the same ``seed`` gives the same weights in every
    process (training ranks, the image-feature encoders), randomly initialised towers included."""
    torch.manual_seed(seed)
    return create_model(config, taxonomy, prototypes_path)
