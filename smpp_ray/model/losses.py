"""Training losses: CE(77) + CE(11) + image-text InfoNCE + prototype alignment (+ regression).

``reduction="none"`` gives the weighted total per sample, which loss-based sample selection
ranks (keep the easiest share of a batch). Unknown class ids (-1) and NaN labels contribute 0
to their component; with ``reduction="mean"`` each component averages over the samples it
applies to.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

COMPONENTS = ("ce_sub", "ce_cat", "contrastive", "prototype", "regression")


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP InfoNCE per sample ``(B,)`` for normalised ``image``/``text`` ``(B, D)``."""
    logits = logit_scale * image @ text.t()  # (B, B)
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target, reduction="none")
                  + F.cross_entropy(logits.t(), target, reduction="none"))


def _ce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    target = target.long()
    valid = target >= 0
    # ignore_index, not a product with the mask: a childless category's logit is -inf, and
    # inf * 0 would be NaN for an unlabelled row.
    per_sample = F.cross_entropy(logits, target.masked_fill(~valid, -100), ignore_index=-100, reduction="none")
    return per_sample, valid


def _reduce(per_sample: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return per_sample.sum() / valid.sum().clamp_min(1)


def compute_losses(outputs: Mapping[str, torch.Tensor], subcategory_id: torch.Tensor, category_id: torch.Tensor,
                   label: torch.Tensor | None = None, *, weight_ce_sub: float = 1.0, weight_ce_cat: float = 0.5,
                   weight_contrastive: float = 0.2, weight_prototype: float = 0.1, weight_regression: float = 0.0,
                   reduction: str = "mean") -> dict[str, torch.Tensor]:
    """Weighted losses from :meth:`SMPPModel.forward` outputs.

    Returns ``loss`` and each of ``ce_sub``, ``ce_cat``, ``contrastive``, ``prototype``,
    ``regression`` (unweighted), scalars for ``"mean"`` and ``(B,)`` for ``"none"``. The
    prototype term needs the model's ``proto_align_*`` outputs (absent with prototypes off: 0);
    the regression term needs ``regression`` and finite ``label`` values.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'none'")
    logits_sub = outputs["logits_sub"]
    batch = logits_sub.shape[0]
    zeros = logits_sub.new_zeros(batch)
    everyone = torch.ones(batch, dtype=torch.bool, device=logits_sub.device)
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "ce_sub": _ce(logits_sub, subcategory_id),
        "ce_cat": _ce(outputs["logits_cat"], category_id),
        "contrastive": (info_nce(outputs["image_embedding"], outputs["text_embedding"], outputs["logit_scale"]), everyone),
    }
    if "proto_align_sub" in outputs:
        sub, sub_valid = _ce(outputs["proto_align_sub"], subcategory_id)
        cat, cat_valid = _ce(outputs["proto_align_cat"], category_id)
        parts["prototype"] = (sub + cat, sub_valid | cat_valid)
    else:
        parts["prototype"] = (zeros, ~everyone)
    if "regression" in outputs and label is not None:
        label = label.to(logits_sub.dtype)
        finite = torch.isfinite(label)
        error = (outputs["regression"] - torch.where(finite, label, torch.zeros_like(label))) ** 2
        parts["regression"] = (error * finite, finite)
    else:
        parts["regression"] = (zeros, ~everyone)
    weights = {"ce_sub": weight_ce_sub, "ce_cat": weight_ce_cat, "contrastive": weight_contrastive,
               "prototype": weight_prototype, "regression": weight_regression}
    if reduction == "none":
        result = {name: value for name, (value, _) in parts.items()}
    else:
        result = {name: _reduce(value, valid) for name, (value, valid) in parts.items()}
    result["loss"] = sum(weights[name] * result[name] for name in COMPONENTS)
    return result
