"""The training loop, plain and typed: epochs of :func:`~smpp_ray.train.loop.train_epoch` and
:func:`~smpp_ray.train.loop.evaluate`, early stopping on val top-1 and the dataset-level
selection pass, with everything around them (where batches come from, checkpointing, reporting,
fault injection in tests) passed in as :class:`FitHooks`.

Two callers: the Ray Train worker (:func:`smpp_ray.train.trainer.train_loop_per_worker`: shards
in, ``ray.train.report`` out) and the Ray-free path (:func:`fit_in_memory`, which
``bench/ablation.py`` uses), so both run the same epochs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from smpp_ray.config import TrainConfig
from smpp_ray.data.selection import kept_count, select_easiest
from smpp_ray.train.loop import (
    LossFn,
    StepSettings,
    evaluate,
    score_classification_loss,
    train_epoch,
)
from smpp_ray.train.schedule import create_optimizer, create_scheduler

logger = logging.getLogger(__name__)

Batches = Iterable[dict[str, Any]]


@dataclass
class LoopState:
    """Where a run is: saved in every checkpoint (``meta.json``'s ``state``) and resumed from."""

    epoch: int = -1
    """The last finished epoch (0-based; -1 before the first)."""
    global_step: int = 0
    best_val_top1: float = -1.0
    best_epoch: int = -1
    epochs_since_best: int = 0
    stopped_early: bool = False
    attempt: int = 0
    """How many times the run has been resumed after a failure."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every finished epoch's metrics."""
    selection: dict[str, Any] | None = None
    """The dataset-level selection pass's facts once it has run (kept ids, counts)."""

    def advance(self, epoch: int, global_step: int, metrics: dict[str, Any], patience: int) -> None:
        """Record a finished epoch; early stopping after ``patience`` epochs without a better
        val top-1 (0: never)."""
        self.epoch, self.global_step = epoch, global_step
        self.history.append(dict(metrics))
        if metrics["val_top1"] > self.best_val_top1:
            self.best_val_top1, self.best_epoch, self.epochs_since_best = metrics["val_top1"], epoch, 0
        else:
            self.epochs_since_best += 1
        self.stopped_early = bool(patience and self.epochs_since_best >= patience)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _no_selection(epoch: int, state: LoopState) -> dict[str, Any] | None:
    return None


def _no_step_hook(epoch: int) -> Callable[[int], None] | None:
    return None


def local_train_metrics(stats: dict[str, float]) -> dict[str, float]:
    """An epoch's train metrics from this process's counts (one process; the Ray worker reduces
    them over its group instead)."""
    samples, seconds = max(1.0, stats["samples"]), max(1e-9, stats["seconds"])
    return {"train_loss": stats["loss_sum"] / samples, "train_samples": stats["samples"],
            "kept_fraction": stats["kept"] / samples, "train_seconds": stats["seconds"],
            "samples_per_s": stats["samples"] / seconds, "data_wait_fraction": stats["data_wait_seconds"] / seconds}


def _nothing(metrics: dict[str, Any], state: LoopState, probe: dict[str, Any] | None, seconds: float) -> None:
    return None


@dataclass(frozen=True)
class FitHooks:
    """What :func:`fit` asks of its caller."""

    train_batches: Callable[[int], Batches]
    """Epoch -> that epoch's training batches (shuffled as the caller sees fit)."""
    val_batches: Callable[[], Batches]
    select: Callable[[int, LoopState], dict[str, Any] | None] = _no_selection
    """At the start of an epoch: run the dataset-level selection pass and return its facts, or
    None (not due, or done already)."""
    on_step: Callable[[int], Callable[[int], None] | None] = _no_step_hook
    """Epoch -> a function called after each optimizer step (tests inject faults here)."""
    train_metrics: Callable[[dict[str, float]], dict[str, float]] = local_train_metrics
    end_epoch: Callable[[dict[str, Any], LoopState, dict[str, Any] | None, float], None] = _nothing
    """After an epoch is recorded: (metrics, state, the val probe, seconds): checkpoint, report, log."""


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr`` (the head group's current rate) and ``backbone_lr`` when backbone blocks train."""
    rates = {group.get("name", "head"): float(group["lr"]) for group in optimizer.param_groups}
    out = {"lr": rates.get("head", float(optimizer.param_groups[0]["lr"]))}
    if "backbone" in rates:
        out["backbone_lr"] = rates["backbone"]
    return out


def fit(model: torch.nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, scheduler: Any,
        settings: StepSettings, *, epochs: int, patience: int, state: LoopState, hooks: FitHooks,
        probe_rows: int = 0, sharded: bool = False) -> LoopState:
    """Run the epochs after ``state.epoch`` up to ``epochs`` (or early stopping); returns the state.

    ``sharded``: the val batches are this process's shard and the metrics are all-reduced over
    the process group (the Ray worker); ``probe_rows`` keeps the first val rows' logits.
    """
    for epoch in range(state.epoch + 1, epochs):
        started = time.perf_counter()
        selected = hooks.select(epoch, state)
        if selected is not None:
            state.selection = selected
        stats = train_epoch(model, hooks.train_batches(epoch), loss_fn, optimizer, scheduler, settings,
                            global_step=state.global_step, on_step=hooks.on_step(epoch))
        val = evaluate(model, hooks.val_batches(), loss_fn, settings.device, probe_rows=probe_rows, sharded=sharded)
        metrics = {"epoch": epoch, **hooks.train_metrics(stats), **{k: v for k, v in val.items() if k != "probe"},
                   **learning_rates(optimizer), "attempt": state.attempt}
        if selected is not None:
            metrics.update(selection_seconds=selected["seconds"], selection_kept=selected["kept"],
                           selection_total=selected["total"])
        state.advance(epoch, int(stats["global_step"]), metrics, patience)
        hooks.end_epoch(metrics, state, val.get("probe"), time.perf_counter() - started)
        if state.stopped_early:
            logger.info("early stopping after epoch %d: no better val_top1 for %d epochs", epoch, patience)
            break
    return state


# ---- the Ray-free path -------------------------------------------------------------------------

def memory_batches(split: Mapping[str, Any], index: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    """Collated batches of the rows at ``index`` (in that order) of an in-memory collated split
    (tensors and lists of pids, as :func:`smpp_ray.train.data.collate_batch` makes them)."""
    index = torch.as_tensor(index, dtype=torch.long)
    for start in range(0, len(index), batch_size):
        chunk = index[start:start + batch_size]
        yield {k: v[chunk] if isinstance(v, torch.Tensor) else [v[i] for i in chunk.tolist()]
               for k, v in split.items()}


def fit_in_memory(model: torch.nn.Module, loss_fn: LossFn, train_config: TrainConfig, train: Mapping[str, Any],
                  val: Mapping[str, Any], *, device: torch.device | None = None
                  ) -> tuple[LoopState, dict[str, torch.Tensor]]:
    """The train stage's epochs in this process, without Ray, on collated in-memory splits: the
    same :func:`fit`, optimizer, schedule and selection rules (one worker, no augmentation).
    Returns the final state and the best epoch's trainable weights (by val top-1)."""
    t = train_config
    device = device or torch.device("cpu")
    total = len(train["pid"])
    dataset_level = t.sample_selection == "dataset" and t.sample_selection_keep < 1.0
    epoch_rows = [kept_count(total, t.sample_selection_keep) if dataset_level and e >= t.selection_warmup_epochs
                  else total for e in range(t.epochs)]
    steps = [math.ceil(math.ceil(rows / t.batch_size) / t.grad_accum_steps) for rows in epoch_rows]
    optimizer = create_optimizer(model, t.optimizer, t.lr, t.weight_decay, backbone_lr=t.backbone_lr)
    scheduler = create_scheduler(optimizer, int(round(t.warmup_epochs * steps[0])), sum(steps))
    settings = StepSettings(grad_accum_steps=t.grad_accum_steps,
                            sample_selection_keep=1.0 if dataset_level else t.sample_selection_keep,
                            warmup_steps=t.selection_warmup_epochs * steps[0], device=device)
    rng = np.random.default_rng(t.seed)
    kept = {"index": np.arange(total)}
    best: dict[str, torch.Tensor] = {}

    def select(epoch: int, state: LoopState) -> dict[str, Any] | None:
        if not dataset_level or state.selection or epoch < t.selection_warmup_epochs:
            return None
        started = time.perf_counter()
        pids, losses = score_classification_loss(model, memory_batches(train, np.arange(total), t.batch_size), device)
        kept["index"] = select_easiest(pids, losses, t.sample_selection_keep)  # positions: scored in order
        return {"keep": t.sample_selection_keep, "kept": int(len(kept["index"])), "total": total, "epoch": epoch,
                "seconds": time.perf_counter() - started}

    def end_epoch(metrics: dict[str, Any], state: LoopState, probe: dict[str, Any] | None, seconds: float) -> None:
        logger.info("  epoch %d/%d: train loss %.3f, val top-1 %.3f (%.0f samples/s)", metrics["epoch"] + 1,
                    t.epochs, metrics["train_loss"], metrics["val_top1"], metrics["samples_per_s"])
        if state.best_epoch == metrics["epoch"]:
            best.clear()
            best.update({k: v.detach().clone() for k, v in model.trainable_state_dict().items()})

    hooks = FitHooks(
        train_batches=lambda epoch: memory_batches(train, rng.permutation(kept["index"]), t.batch_size),
        val_batches=lambda: memory_batches(val, np.arange(len(val["pid"])), t.batch_size),
        select=select, end_epoch=end_epoch)
    torch.manual_seed(t.seed)
    state = fit(model, loss_fn, optimizer, scheduler, settings, epochs=t.epochs,
                patience=t.early_stopping_patience, state=LoopState(), hooks=hooks)
    return state, best
