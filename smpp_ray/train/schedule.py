"""Learning-rate schedule: linear warm-up, then cosine decay to zero, stepped per optimizer step."""

from __future__ import annotations

import math

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


def create_optimizer(params: list[torch.nn.Parameter], name: str, lr: float,
                     weight_decay: float) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9) over the given (trainable) parameters only."""
    if not params:
        raise ValueError("the model has no trainable parameters; nothing to optimise")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected adamw or sgd")
