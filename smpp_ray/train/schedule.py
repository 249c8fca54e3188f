"""Learning-rate schedule: linear warm-up, then cosine decay to zero, stepped per optimizer step."""

from __future__ import annotations

import math
from typing import Any

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warm-up rises linearly from ``1/(warmup_steps+1)`` to 1 so the first step already moves
    (a zero learning rate would waste a step); after warm-up it follows half a cosine down to 0
    at ``total_steps``. Steps past the end stay at 0 rather than climbing back up the cosine,
    which matters when a resumed run is given more epochs than the schedule was built for.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                     total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`warmup_cosine_factor`; its ``state_dict`` goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps))


#: Prefix of the backbone's parameter names in :class:`smpp_ray.model.model.SMPPModel`.
BACKBONE_PREFIX = "backbone."


def parameter_groups(model: torch.nn.Module, lr: float, backbone_lr: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters: ``head`` (prompts, fusion, heads,
    temperatures) at ``lr`` and ``backbone`` (unfrozen CLIP blocks) at ``backbone_lr``.

    CLIP's pretrained blocks take a lower rate than the freshly initialised parts so fine-tuning
    adapts them without washing out the image-text alignment the prompts rely on. ``backbone_lr``
    0 means ``lr``. Groups without parameters are left out; ``head`` comes first, so
    ``scheduler.get_last_lr()[0]`` stays the main learning rate.
    """
    head, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith(BACKBONE_PREFIX) else head).append(param)
    groups = [{"name": "head", "params": head, "lr": lr},
              {"name": "backbone", "params": backbone, "lr": backbone_lr or lr}]
    return [g for g in groups if g["params"]]


def create_optimizer(params: list[torch.nn.Parameter] | torch.nn.Module, name: str, lr: float,
                     weight_decay: float, *, backbone_lr: float = 0.0) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9) over the trainable parameters only.

    Given a model, its trainable parameters are split into :func:`parameter_groups` (the
    backbone's unfrozen blocks at ``backbone_lr``); given a list of parameters, they form one
    group at ``lr``. A :func:`create_scheduler` schedule multiplies every group's rate by the
    same factor, so the backbone keeps its ratio to ``lr`` through warm-up and decay.
    """
    if isinstance(params, torch.nn.Module):
        groups: list[dict[str, Any]] = parameter_groups(params, lr, backbone_lr)
    else:
        if backbone_lr:
            raise ValueError("backbone_lr needs the model (to find its backbone parameters), not a parameter list")
        groups = [{"name": "head", "params": list(params), "lr": lr}] if params else []
    if not groups:
        raise ValueError("the model has no trainable parameters; nothing to optimise")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected adamw or sgd")
