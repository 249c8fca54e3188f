"""Plain training and evaluation loops: no Ray in here, so they run (and are tested) on any iterable.

``train_epoch`` and ``evaluate`` take an iterable of collated batches (dicts of tensors plus
``pid`` strings); :mod:`smpp_ray.train.trainer` feeds them Ray Data shards inside Ray Train
workers, the benchmark feeds them the same batches in a bare PyTorch loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from smpp_ray.model.precision import autocast
from smpp_ray.train.image_features import image_features_of

#: ``loss_fn(outputs, batch) -> (B,)`` per-sample total loss (``compute_losses(reduction="none")``).
LossFn = Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]


@dataclass
class StepSettings:
    """How ``train_epoch`` turns batches into optimizer steps."""

    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    sample_selection_keep: float = 1.0
    """Share of each batch (lowest per-sample loss) that contributes gradients, after warm-up
    (``train.sample_selection: batch``; the dataset mode selects posts before they are read)."""
    warmup_steps: int = 0
    """Optimizer steps before per-batch selection starts (early losses say little about noise)."""
    device: torch.device = torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensor columns of a collated batch to ``device`` (strings stay on the host)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def forward_batch(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One forward pass; a batch of stored image features (``train.cache_image_features``)
    skips the image tower, one of pixels runs it."""
    return model(batch.get("pixels"), batch["tokens"], image_features=image_features_of(batch))


def select_lowest_loss(per_sample: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices of the ``ceil(keep * B)`` smallest losses (at least one): loss-based sample selection.

    High-loss samples early in training are mostly noisy labels; dropping them (the paper keeps
    77%) trains on the clean majority. Selection uses detached values; gradients flow only
    through the kept samples.
    """
    batch = per_sample.shape[0]
    k = max(1, min(batch, math.ceil(keep * batch)))
    return torch.topk(per_sample.detach(), k, largest=False).indices


def train_epoch(model: torch.nn.Module, batches: Iterable[dict[str, Any]], loss_fn: LossFn,
                optimizer: torch.optim.Optimizer, scheduler: Any, settings: StepSettings, *,
                global_step: int = 0, on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns loss/sample/step counts, timing and the new ``global_step``.

    ``data_wait_seconds`` is the part of ``seconds`` spent waiting for the next batch: near 0
    when the input pipeline keeps up, most of the epoch when it does not.

    Gradients accumulate over ``grad_accum_steps`` micro-batches; DDP's all-reduce is skipped
    (``no_sync``) on all but the last of them. A trailing partial accumulation still steps (and
    its last micro-batch syncs), so every sample of the epoch counts; all ranks see the same
    number of batches (``streaming_split(equal=True)``), so their steps line up. ``on_step`` is
    called with the number of optimizer steps taken so far this epoch after each one.
    """
    model.train()
    device = settings.device
    loss_sum, samples, kept, micro, steps = 0.0, 0, 0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    no_sync = getattr(model, "no_sync", None)
    started = time.perf_counter()
    waited = [0.0]  # seconds spent waiting for input batches (Ray Data pipeline latency)
    for batch, last in _with_last(_timed(batches, waited)):
        batch = to_device(batch, device)
        micro += 1
        boundary = last or micro % settings.grad_accum_steps == 0
        sync = contextlib.nullcontext() if boundary or no_sync is None else no_sync()
        with sync:
            with autocast(device):
                per_sample = loss_fn(forward_batch(model, batch), batch).float()  # (B,)
            selecting = settings.sample_selection_keep < 1.0 and global_step >= settings.warmup_steps
            index = select_lowest_loss(per_sample, settings.sample_selection_keep) if selecting else None
            objective = per_sample[index].mean() if index is not None else per_sample.mean()
            (objective / settings.grad_accum_steps).backward()
        loss_sum += float(per_sample.detach().sum())
        samples += per_sample.shape[0]
        kept += per_sample.shape[0] if index is None else index.shape[0]
        if boundary:
            _step(optimizer, scheduler)
            global_step, steps = global_step + 1, steps + 1
            micro = 0
            if on_step is not None:
                on_step(steps)
    seconds = time.perf_counter() - started
    return {"loss_sum": loss_sum, "samples": float(samples), "kept": float(kept), "steps": float(steps),
            "seconds": seconds, "data_wait_seconds": waited[0], "global_step": float(global_step)}


def _timed(items: Iterable[Any], waited: list[float]):
    """Yield ``items``, adding the time spent inside ``next()`` to ``waited[0]``."""
    iterator = iter(items)
    while True:
        started = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            waited[0] += time.perf_counter() - started
            return
        waited[0] += time.perf_counter() - started
        yield item


def _with_last(items: Iterable[Any]):
    """Yield ``(item, is_last)``: the last micro-batch must all-reduce even mid-accumulation."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def _step(optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def score_classification_loss(model: torch.nn.Module, batches: Iterable[dict[str, Any]],
                              device: torch.device) -> tuple[list[str], np.ndarray]:
    """Every post's classification loss, ``CE(77) + CE(11)`` unweighted, in eval mode.

    What dataset-level sample selection ranks: the paper ranks by classification loss, so the
    contrastive and prototype terms (which depend on the rest of the batch or on the anchors)
    stay out, and eval mode (no dropout) makes a post's score independent of which rank or batch
    scored it. Returns ``(pids, losses)`` in the order seen. Runs the bare model, like
    :func:`evaluate`, since no gradient is all-reduced.
    """
    pids: list[str] = []
    losses: list[np.ndarray] = []
    for net, batch in _eval_batches(model, batches, device):
        with autocast(device):
            outputs = forward_batch(net, batch)
        parts = net.compute_losses({k: v.float() if v.is_floating_point() else v for k, v in outputs.items()},
                                   batch["subcategory_id"], batch["category_id"], reduction="none")
        losses.append((parts["ce_sub"] + parts["ce_cat"]).double().cpu().numpy())  # (B,)
        pids += [str(p) for p in batch["pid"]]
    return pids, np.concatenate(losses) if losses else np.zeros(0)


def _eval_batches(model: torch.nn.Module, batches: Iterable[dict[str, Any]],
                  device: torch.device) -> Iterator[tuple[torch.nn.Module, dict[str, Any]]]:
    """``(bare model, batch on device)`` for each batch, the model in eval mode meanwhile and
    back in its earlier mode afterwards: the loop :func:`evaluate` and the selection pass share."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        for batch in batches:
            yield net, to_device(batch, device)
    finally:
        net.train(was_training)


#: The sums :func:`evaluate` accumulates, in the order they are all-reduced.
EVAL_SUMS = ("loss_sum", "samples", "correct_sub", "correct_cat", "labelled_sub", "labelled_cat")


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Iterable[dict[str, Any]], loss_fn: LossFn,
             device: torch.device, *, probe_rows: int = 0, sharded: bool = False) -> dict[str, Any]:
    """Validation loss and top-1 (77-way ``logits_sub``, 11-way ``logits_cat``) over ``batches``.

    Runs the bare model (not its DDP wrapper): no gradient is all-reduced, and a rank's forward
    passes must not wait on the others' (shards differ in length). Posts without a label id (-1)
    are left out of the accuracies. With ``probe_rows`` the first rows' pids and ``logits_sub``
    are returned under ``probe`` (saved in checkpoints to check a reload).

    ``sharded``: ``batches`` is this rank's shard of the split; the sums are all-reduced over the
    process group, so every rank returns the metrics of the whole split (the probe stays this
    rank's). A rank whose shard is empty still joins the all-reduce.
    """
    sums, probe = _evaluation_sums(model, batches, loss_fn, device, probe_rows)
    if sharded:
        sums = all_reduce_sums(sums, device)
    if sums["samples"] == 0:
        raise ValueError("evaluate got no batches: the validation split is empty")
    result: dict[str, Any] = {
        "val_loss": sums["loss_sum"] / sums["samples"],
        "val_top1": sums["correct_sub"] / max(1, sums["labelled_sub"]),
        "val_top1_cat": sums["correct_cat"] / max(1, sums["labelled_cat"]),
        "val_samples": float(sums["samples"]),
    }
    if probe_rows:
        result["probe"] = probe
    return result


def _evaluation_sums(model: torch.nn.Module, batches: Iterable[dict[str, Any]], loss_fn: LossFn,
                     device: torch.device, probe_rows: int) -> tuple[dict[str, float], dict[str, Any]]:
    """:data:`EVAL_SUMS` over ``batches`` and the probe (first ``probe_rows`` pids and logits)."""
    sums = dict.fromkeys(EVAL_SUMS, 0.0)
    probe_pids: list[str] = []
    probe_logits: list[torch.Tensor] = []
    for net, batch in _eval_batches(model, batches, device):
        with autocast(device):
            outputs = forward_batch(net, batch)
            per_sample = loss_fn(outputs, batch).float()  # (B,)
        sub, cat = batch["subcategory_id"].long(), batch["category_id"].long()
        mask_sub, mask_cat = sub >= 0, cat >= 0
        sums["loss_sum"] += float(per_sample.double().sum())
        sums["samples"] += per_sample.shape[0]
        sums["correct_sub"] += int((outputs["logits_sub"].argmax(-1).eq(sub) & mask_sub).sum())
        sums["correct_cat"] += int((outputs["logits_cat"].argmax(-1).eq(cat) & mask_cat).sum())
        sums["labelled_sub"] += int(mask_sub.sum())
        sums["labelled_cat"] += int(mask_cat.sum())
        if len(probe_pids) < probe_rows:
            take = probe_rows - len(probe_pids)
            probe_pids += list(batch["pid"][:take])
            probe_logits.append(outputs["logits_sub"][:take].float().cpu())
    probe = {"pid": probe_pids, "logits_sub": torch.cat(probe_logits) if probe_logits else torch.empty(0)}
    return sums, probe


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """``sums`` added over the process group (as given without one, or alone in it).

    float64 on the wire: the counts stay exact well past 2**24 posts, and the loss sum differs
    from one process's only by the order of the additions.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(sums)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([sums[k] for k in sums], dtype=torch.float64, device=on)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(sums, values.cpu().tolist(), strict=True))
