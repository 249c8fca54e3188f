"""Mixed precision, one owner: bf16 autocast on CUDA, float32 elsewhere (training and extraction)."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; on CPU plain float32 (CPU bf16 is slower and less exact here)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
