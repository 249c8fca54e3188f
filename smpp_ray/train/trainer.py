"""Distributed prompt tuning on Ray Train (V2): ``train_model`` on the driver, ``train_loop_per_worker``.

The driver builds two lazy Ray Datasets (train, val), a ``TorchTrainer`` with DDP workers and
the run's storage, then collects the best checkpoint. Each worker streams its shard of the
train split through :func:`smpp_ray.train.loop.train_epoch` and evaluates its shard of the val
split; the evaluation sums are all-reduced, so every rank holds the metrics of the whole split
(and early stopping agrees everywhere). Rank 0 writes the checkpoint and logs the epoch to MLflow. Relaunching with the same ``storage_path``/``name``
resumes from the latest checkpoint, and a worker failure restarts the group from it.

With ``train.sample_selection: dataset`` (and a keep share below 1) the workers score every
train post after the warm-up epochs and later epochs read only the kept ones; see
:mod:`smpp_ray.data.selection` for why the train pipeline reads the kept ids from the run's
storage.

Every input and output is a location (:mod:`smpp_ray.storage`): with ``out`` on ``s3://`` the run's
storage defaults to ``<out>/ray_results`` there too, Ray Train persists each checkpoint to it,
workers read the dataset and the prototype bank from their locations, and the best checkpoint
is reported as a full URI. Nothing a worker reads lives only on the driver's disk.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from typing import Any

import torch

from smpp_ray import console, storage
from smpp_ray.config import ModelConfig, TrainConfig, parse_resources
from smpp_ray.data.schema import Taxonomy
from smpp_ray.data.selection import (
    kept_count,
    kept_ids_location,
    read_kept_facts,
    select_easiest,
    write_kept_ids,
)
from smpp_ray.model import checkpoint as ckpt
from smpp_ray.model.backbone import backbone_spec
from smpp_ray.model.prototypes import PROTOTYPES_FILE
from smpp_ray.tracking import TrackingContext, log_artifact, log_metrics, set_tags
from smpp_ray.train.data import count_rows, create_split_dataset, iterate_torch
from smpp_ray.train.fit import FitHooks, LoopState, fit
from smpp_ray.train.loop import StepSettings, score_classification_loss
from smpp_ray.train.schedule import create_optimizer, create_scheduler

logger = logging.getLogger(__name__)

#: Ray Train's runs under ``out`` when ``train.storage_path`` is empty.
RAY_RESULTS_DIR = "ray_results"
#: MLflow artifact path of the best checkpoint.
BEST_CHECKPOINT_DIR = "best_checkpoint"
#: Validation rows whose logits are stored in each checkpoint (probe.pt) to verify reloads: the
#: first rows of rank 0's val shard.
PROBE_ROWS = 16
#: MLflow artifact path of the kept ids of dataset-level sample selection.
SELECTION_DIR = "selection"
#: The train split, unaugmented and unfiltered, that the selection pass scores.
SELECT_DATASET = "select"


# ---------------------------------------------------------------------------------------------
# Driver


def train_model(data_dir: str, prototypes_dir: str | None, out_dir: str, *, model_config: ModelConfig,
                train_config: TrainConfig, tracking: TrackingContext | None = None) -> dict[str, Any]:
    """Prompt-tune the model with Ray Train and return the best epoch's metrics.

    ``data_dir``, ``prototypes_dir`` (the prototypes stage folder or its ``.safetensors`` file)
    and ``out_dir`` are locations; the run's storage is ``train.storage_path``, or
    ``<out_dir>/ray_results`` when that is empty. Returns ``val_top1``, ``val_top1_cat``,
    ``val_loss``, ``train_loss`` and ``samples_per_s`` of the best epoch (by val top-1),
    ``best_epoch``, ``epochs_run`` (epochs completed, across relaunches), ``resumes``
    (worker-group starts from a checkpoint: failures recovered plus relaunches),
    ``stopped_early``, ``best_checkpoint`` (the full location of Ray Train's best checkpoint
    folder, e.g. ``s3://bucket/run/train/ray_results/smpp-train/checkpoint_...``; retention
    ranks by val top-1, so the best one is never deleted), ``run_path`` (the run's location),
    ``history`` (every epoch's metrics) and, once dataset-level sample selection ran,
    ``selection`` (``kept``, ``total``, ``keep``, ``epoch`` (the first epoch on the kept posts),
    ``seconds`` (the pass), ``reused``, ``kept_ids`` (the location of the kept pids)).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train import DataConfig as RayDataConfig
    from ray.train.torch import TorchTrainer

    from smpp_ray.data.dataset import Dataset

    _validate(model_config, train_config)
    _check_cpu_budget(train_config)
    data_dir = storage.normalize(data_dir)
    taxonomy = Dataset(data_dir).taxonomy()
    prototypes_path = _prototypes_file(prototypes_dir, model_config)
    storage_path = _storage_path(out_dir, train_config)
    run_path = run_location(out_dir, train_config)

    previous = _previous_run(run_path, model_config)
    if previous is not None and _finished(previous, train_config):
        logger.info("train run %s already finished (epoch %d); nothing to do", run_path,
                    previous["meta"]["epoch"])
        return _finish(previous["result"], run_path, tracking)

    train_rows = count_rows(data_dir, "train")
    selection = _selection_plan(train_config, run_path, train_rows)
    steps_per_epoch = _steps_per_epoch(train_rows, train_config)
    total_steps = sum(_steps_per_epoch(_epoch_rows(epoch, train_rows, selection), train_config)
                      for epoch in range(train_config.epochs))
    warmup_steps = int(round(train_config.warmup_epochs * steps_per_epoch))
    spec = backbone_spec(model_config.backbone, model_config.context_length)
    image_features = None
    if train_config.cache_image_features:
        image_features = _encode_images_once(data_dir, run_path, spec, model_config, taxonomy, prototypes_path,
                                             train_config)
    datasets = _split_datasets(data_dir, spec, train_config, selection, image_features)
    loop_config = {
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(train_config),
        "taxonomy": taxonomy.to_dict(),
        "prototypes_path": prototypes_path,
        "tracking": dataclasses.asdict(tracking) if tracking else None,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": warmup_steps,
        "selection": selection,
        "total_steps": total_steps,
        "run_path": run_path,
    }
    resources = {"CPU": train_config.cpus_per_worker,
                 **parse_resources(train_config.worker_resources, "train.worker_resources")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train_config.num_workers, use_gpu=train_config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=train_config.name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=train_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train_config.checkpoints_to_keep,
                                               checkpoint_score_attribute="val_top1",
                                               checkpoint_score_order="max")),
        datasets=datasets,
        dataset_config=_ingest_config(RayDataConfig,
                                      split_unequal=("val", SELECT_DATASET) if selection else ("val",)),
    )
    logger.info("training %d workers x batch %d, %d train posts, %d optimizer steps/epoch, storage %s",
                train_config.num_workers, train_config.batch_size, train_rows, steps_per_epoch, run_path)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {run_path} failed: {result.error}") from result.error
    finished = _finish(result, run_path, tracking)
    if image_features is not None:
        finished["image_features"] = image_features
    return finished


def run_location(out_dir: str, train_config: TrainConfig) -> str:
    """Where the run's Ray Train state lives: ``<train.storage_path or out_dir/ray_results>/<train.name>``."""
    return storage.join(_storage_path(out_dir, train_config), train_config.name)


def _storage_path(out_dir: str, train_config: TrainConfig) -> str:
    return storage.normalize(train_config.storage_path or storage.join(out_dir, RAY_RESULTS_DIR))


def _encode_images_once(data_dir: str, run_path: str, spec: Any, model_config: ModelConfig, taxonomy: Taxonomy,
                        prototypes_path: str | None, train_config: TrainConfig) -> dict[str, Any]:
    """Frozen image-tower outputs of train and val, computed before the workers start.

    The encoder pool gets the resources the worker group will use (one actor per worker, same
    CPUs and GPU): they are free until ``fit`` starts, and a pool that fits the workers fits
    the cluster.
    """
    from smpp_ray.console import line
    from smpp_ray.train.image_features import build_image_features, image_features_location

    facts = build_image_features(
        data_dir, image_features_location(run_path), splits=("train", "val"), spec=spec,
        model_config=model_config, taxonomy=taxonomy, prototypes_path=prototypes_path, seed=train_config.seed,
        dtype=train_config.image_features_dtype, actors=train_config.num_workers,
        cpus_per_actor=train_config.cpus_per_worker, gpus_per_actor=1.0 if train_config.use_gpu else 0.0,
        batch_size=train_config.batch_size)
    posts = sum(facts["rows"].values())
    if facts["reused"]:
        line(f"image features: {posts} posts, reused from {facts['location']}")
    else:
        # One console line: the demo's whole console fits a screen (tests/test_readme.py).
        line(f"image features: {posts} posts encoded once in {facts['seconds']:.0f} s "
             f"({facts['posts_per_s']:.0f} posts/s{'; augmentation off' if train_config.augment else ''})"
             f" -> {facts['location']}")
    return facts


def _split_datasets(data_dir: str, spec: Any, train_config: TrainConfig, selection: dict[str, Any] | None,
                    image_features: dict[str, Any] | None) -> dict[str, Any]:
    """The Ray Datasets the workers read: decoded posts, or the stored image features."""
    kept_ids = selection["kept_ids"] if selection else ""
    if image_features is not None:
        from smpp_ray.train.image_features import feature_split_dataset

        if train_config.augment:
            console.details(__name__).info("train.cache_image_features: augmentation off (stored features "
                                           "fix each image)")
        location = image_features["location"]
        datasets = {"train": feature_split_dataset(location, "train", kept_ids=kept_ids),
                    "val": feature_split_dataset(location, "val")}
        if selection:
            datasets[SELECT_DATASET] = feature_split_dataset(location, "train")
        return datasets
    datasets = {"train": create_split_dataset(data_dir, "train", spec, train=train_config.augment, kept_ids=kept_ids),
                "val": create_split_dataset(data_dir, "val", spec, train=False)}
    if selection:
        datasets[SELECT_DATASET] = create_split_dataset(data_dir, "train", spec, train=False)
    return datasets


def _selection_plan(train_config: TrainConfig, run_path: str, train_rows: int) -> dict[str, Any] | None:
    """What dataset-level sample selection the workers run (None: off or per batch)."""
    if train_config.sample_selection_keep >= 1.0 or train_config.sample_selection != "dataset":
        return None
    if train_config.selection_warmup_epochs >= train_config.epochs:
        logger.warning("train.selection_warmup_epochs=%d >= train.epochs=%d: sample selection never runs",
                       train_config.selection_warmup_epochs, train_config.epochs)
        return None
    return {"keep": train_config.sample_selection_keep, "warmup_epochs": train_config.selection_warmup_epochs,
            "kept_ids": kept_ids_location(run_path), "kept": kept_count(train_rows, train_config.sample_selection_keep)}


def _epoch_rows(epoch: int, train_rows: int, selection: dict[str, Any] | None) -> int:
    """Train posts an epoch reads: all of them until selection starts, the kept ones after."""
    return selection["kept"] if selection and epoch >= selection["warmup_epochs"] else train_rows


def _ingest_config(base: type, split_unequal: tuple[str, ...]) -> Any:
    """Ray Train's ``DataConfig`` splitting ``train`` (and ``split_unequal``) across the workers.

    ``split_unequal`` datasets (val, the selection pass's) are split with ``equal=False``: the
    default ``equal=True`` drops up to ``world - 1`` rows so every rank steps in lock-step, which
    training needs, but a val post left out would change the metrics with the worker count, and
    a post the selection pass never scores could be neither kept nor dropped on merit. Neither
    pass steps an optimizer, so shards of different lengths cost nothing but the wait at the
    final all-reduce.
    """

    class IngestConfig(base):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            unequal = {k: v for k, v in datasets.items() if k in split_unequal}
            output = super().configure({k: v for k, v in datasets.items() if k not in unequal}, world_size,
                                       worker_handles, worker_node_ids, **kwargs)
            for name, dataset in unequal.items():
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self._resolve_execution_options(name)
                hints = worker_node_ids if self._enable_shard_locality else None
                for rank, shard in enumerate(dataset.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[rank][name] = shard
            return output

    return IngestConfig(datasets_to_split=["train", *split_unequal])


def _validate(model_config: ModelConfig, train_config: TrainConfig) -> None:
    if train_config.cache_image_features and model_config.unfreeze_image_blocks > 0:
        raise ValueError(
            "train.cache_image_features=true needs a frozen image tower, but "
            f"model.unfreeze_image_blocks={model_config.unfreeze_image_blocks}; set one of them off")
    if train_config.fail_at_epoch >= 0 and train_config.max_failures < 1:
        raise ValueError(f"train.fail_at_epoch={train_config.fail_at_epoch} needs train.max_failures >= 1 "
                         "to recover, got 0")


def _check_cpu_budget(train_config: TrainConfig) -> None:
    """Refuse a worker group that would leave Ray Data no CPU: the run would hang, not fail.

    Training workers hold their CPUs for the whole run; decoding and tokenising run as Ray Data
    tasks that need at least one more logical CPU, or every epoch waits forever on its input.
    """
    import ray

    from smpp_ray.runtime import init_ray

    init_ray()  # joins RAY_ADDRESS or starts a local Ray unless one is up already
    total = float(ray.cluster_resources().get("CPU", 0.0))
    needed = train_config.num_workers * train_config.cpus_per_worker
    if needed <= total < needed + 1:
        raise ValueError(
            f"train.num_workers={train_config.num_workers} x train.cpus_per_worker={train_config.cpus_per_worker} "
            f"takes {needed:g} of the cluster's {total:g} logical CPUs and leaves Ray Data none for "
            "preprocessing; lower train.cpus_per_worker or give Ray more logical CPUs (ray.num_cpus)")


def _prototypes_file(prototypes_dir: str | None, model_config: ModelConfig) -> str | None:
    """Location of the bank the workers read: the stage folder's file, or the file itself."""
    if not prototypes_dir:
        if model_config.use_prototypes:
            raise ValueError("model.use_prototypes=true needs a prototypes folder (run `smpp prototypes`)")
        return None
    location = storage.normalize(prototypes_dir)
    if storage.is_file(location):
        return location
    location = storage.join(location, PROTOTYPES_FILE)
    if not storage.is_file(location):
        raise FileNotFoundError(f"prototype bank {location!r} not found; run `smpp prototypes` first")
    return location


def _steps_per_epoch(train_rows: int, train_config: TrainConfig) -> int:
    """Optimizer steps per epoch per worker, as ``train_epoch`` will take them."""
    rows_per_worker = train_rows // train_config.num_workers  # streaming_split(equal=True) drops the rest
    if rows_per_worker == 0:
        raise ValueError(f"{train_rows} train posts cannot feed {train_config.num_workers} workers")
    batches = math.ceil(rows_per_worker / train_config.batch_size)
    return math.ceil(batches / train_config.grad_accum_steps)


def _previous_run(run_path: str, model_config: ModelConfig) -> dict[str, Any] | None:
    """The latest checkpoint of an earlier launch with this name; its model config must match."""
    from ray.train import Result

    if not storage.is_dir(run_path):
        return None
    filesystem, path = storage.resolve(run_path)
    try:
        result = Result.from_path(path, storage_filesystem=filesystem)
    except RuntimeError:  # no checkpoint reported yet (no checkpoint manager snapshot)
        return None
    if result.checkpoint is None:
        return None
    # Resuming: folders Ray uploaded but never recorded (a run killed mid-report) go now, while
    # nothing writes to the run; retention would never delete them.
    committed = [_checkpoint_location(c, run_path) for c, _ in result.best_checkpoints]
    ckpt.remove_uncommitted_checkpoints(run_path, [*committed, _checkpoint_location(result.checkpoint, run_path)])
    meta = ckpt.read_meta(_checkpoint_location(result.checkpoint, run_path))
    stored = meta["model_config"]
    current = dataclasses.asdict(model_config)
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if changed:
        diff = ", ".join(f"model.{k}={stored.get(k)!r} (now {current.get(k)!r})" for k in changed)
        raise ValueError(f"train run {run_path!r} was started with {diff}; resume with the same model config "
                         "or choose another train.name")
    return {"result": result, "meta": meta}


def _finished(previous: dict[str, Any], train_config: TrainConfig) -> bool:
    state = LoopState.from_dict(previous["meta"]["state"])
    return state.stopped_early or previous["meta"]["epoch"] + 1 >= train_config.epochs


def _checkpoint_location(checkpoint: Any, run_path: str) -> str:
    """A Ray ``Checkpoint``'s full location: its ``path`` is inside its filesystem (``bucket/key``
    on S3), so it takes the scheme of the run's location back."""
    path = str(checkpoint.path)
    if storage.is_uri(run_path):
        scheme = run_path.partition("://")[0]
        return storage.normalize(f"{scheme}://{path.lstrip('/')}")
    return storage.normalize(path)


def _finish(result: Any, run_path: str, tracking: TrackingContext | None) -> dict[str, Any]:
    """Find the best checkpoint in the run's storage, log it to MLflow, build the summary."""
    best = result.get_best_checkpoint("val_top1", "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"training run {run_path} reported no checkpoint")
    best_location = _checkpoint_location(best, run_path)
    best_meta = ckpt.read_meta(best_location)
    last_meta = ckpt.read_meta(_checkpoint_location(result.checkpoint, run_path))
    state = LoopState.from_dict(last_meta["state"])
    metrics = best_meta["metrics"]
    summary: dict[str, Any] = {
        **{k: metrics[k] for k in ("val_top1", "val_top1_cat", "val_loss", "train_loss", "samples_per_s")},
        "best_epoch": best_meta["epoch"],
        "epochs_run": last_meta["epoch"] + 1,
        "resumes": state.attempt,
        "stopped_early": state.stopped_early,
        "best_checkpoint": best_location,
        "run_path": run_path,
        "history": state.history,
    }
    kept_ids = kept_ids_location(run_path)
    if state.selection:
        summary["selection"] = {**state.selection, "kept_ids": kept_ids}
    if tracking is not None:
        log_artifact(tracking.tracking_uri, tracking.run_id, best_location, BEST_CHECKPOINT_DIR)
        if state.selection and storage.is_file(kept_ids):
            log_artifact(tracking.tracking_uri, tracking.run_id, kept_ids, SELECTION_DIR)
        set_tags(tracking.tracking_uri, tracking.run_id,
                 {"smpp.train.run_path": run_path, "smpp.train.best_epoch": best_meta["epoch"]})
    logger.info("training done: best epoch %d val_top1 %.4f (checkpoint %s)", best_meta["epoch"],
                metrics["val_top1"], best_location)
    return summary


# ---------------------------------------------------------------------------------------------
# Worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: build the model, resume from Ray's checkpoint, then :func:`fit` with
    this worker's shards in and ``ray.train.report`` out."""
    import ray.train

    worker = _start_worker(config)
    names = ("train", "val", *([SELECT_DATASET] if config["selection"] else []))
    shards = {name: ray.train.get_dataset_shard(name) for name in names}
    cfg = worker.train_config
    per_batch = cfg.sample_selection == "batch"
    settings = StepSettings(grad_accum_steps=cfg.grad_accum_steps,
                            sample_selection_keep=cfg.sample_selection_keep if per_batch else 1.0,
                            warmup_steps=cfg.selection_warmup_epochs * config["steps_per_epoch"],
                            device=worker.device)
    fit(worker.model, worker.loss_fn, worker.optimizer, worker.scheduler, settings, epochs=cfg.epochs,
        patience=cfg.early_stopping_patience, state=worker.state, hooks=_fit_hooks(worker, shards),
        probe_rows=PROBE_ROWS if worker.rank == 0 else 0, sharded=True)


@dataclasses.dataclass
class _Worker:
    """One Ray Train worker: its configs, its place in the group, its model and optimiser, and the
    loop state it resumes from."""

    config: dict[str, Any]
    train_config: TrainConfig
    model_config: ModelConfig
    taxonomy: Taxonomy
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: LoopState


def _start_worker(config: dict[str, Any]) -> _Worker:
    """Build this worker's model and optimiser, restore Ray's latest checkpoint, wrap for DDP."""
    import ray.train
    import ray.train.torch

    train_config = TrainConfig(**config["train_config"])
    model_config = ckpt.model_config_from_meta({"model_config": config["model_config"]}, where="train loop")
    taxonomy = Taxonomy.from_dict(config["taxonomy"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(train_config.cpus_per_worker)))
    model, loss_fn = _build_model(model_config, taxonomy, config["prototypes_path"], train_config.seed)
    model.to(device)  # before the optimizer exists, so restored optimizer state lands there too
    optimizer = create_optimizer(model, train_config.optimizer, train_config.lr, train_config.weight_decay,
                                 backbone_lr=train_config.backbone_lr)
    scheduler = create_scheduler(optimizer, config["warmup_steps"], config["total_steps"])
    state = _restore(model, optimizer, scheduler, device, rank)
    selection = config["selection"]
    if selection and rank == 0 and not state.selection:
        _discard_stale_selection(selection["kept_ids"], state.epoch, selection)
    # prepare_model is collective (DDP broadcasts rank 0's weights): no rank reads the train
    # shard before a stale kept-ids file is gone.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})
    return _Worker(config, train_config, model_config, taxonomy, rank, world, device, model, loss_fn, optimizer,
                   scheduler, state)


def _fit_hooks(worker: _Worker, shards: dict[str, Any]) -> FitHooks:
    """What :func:`fit` calls on a Ray Train worker: its shards as batches, sample selection,
    the fault hook, all-reduced train metrics, and per epoch the checkpoint report, the console
    line and the MLflow metrics (rank 0)."""
    cfg, config, batch, rank = worker.train_config, worker.config, worker.train_config.batch_size, worker.rank
    selection = config["selection"]

    def select(epoch: int, state: LoopState) -> dict[str, Any] | None:
        if not selection or state.selection or epoch < selection["warmup_epochs"]:
            return None
        return _select_posts(worker.model, shards[SELECT_DATASET], selection, epoch, batch, worker.device, rank,
                             worker.world)

    def end_epoch(metrics: dict[str, Any], state: LoopState, probe: dict[str, Any] | None, seconds: float) -> None:
        _report(worker.model, worker.optimizer, worker.scheduler, worker.model_config, worker.taxonomy,
                config["prototypes_path"], metrics, state, probe, rank)
        if rank == 0:
            _epoch_line(metrics, metrics["epoch"], cfg.epochs, seconds)
            if config["tracking"]:
                log_metrics(config["tracking"]["tracking_uri"], config["tracking"]["run_id"],
                            {k: v for k, v in metrics.items() if k != "epoch"}, step=metrics["epoch"] + 1)

    return FitHooks(
        train_batches=lambda epoch: iterate_torch(shards["train"], batch, train=True, seed=cfg.seed + epoch,
                                                  prefetch_batches=cfg.prefetch_batches),
        val_batches=lambda: iterate_torch(shards["val"], batch, train=False),
        select=select,
        on_step=lambda epoch: _failure_hook(cfg.fail_at_epoch, epoch, rank, worker.world, config["run_path"]),
        train_metrics=lambda stats: _reduce_train_stats(stats, worker.device),
        end_epoch=end_epoch)


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
             rank: int) -> LoopState:
    """Load Ray Train's checkpoint into the model, optimizer and scheduler (a resumed run or a
    restarted group); the loop state to go on from (a fresh one when there is none)."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        return LoopState()
    with restored.as_directory() as directory:
        loaded = ckpt.load_training_state(directory, map_location=device)
    model.load_trainable_state_dict(loaded["trainable"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    state = LoopState.from_dict(loaded["meta"]["state"])
    state.attempt += 1
    from smpp_ray.console import line

    line(f"rank {rank} resumed from epoch {state.epoch} (attempt {state.attempt})")
    return state


def _discard_stale_selection(location: str, resumed_epoch: int, selection: dict[str, Any]) -> None:
    """Remove a kept-ids file that the weights this run resumes from did not score.

    A file from an earlier launch with another keep share or warm-up, or from a run that went
    back to an earlier checkpoint, would otherwise filter the epochs before selection. A file
    scored by exactly these weights (a worker failed after the pass, before the epoch's
    checkpoint) is kept: the pass would give it again, so it is reused.
    """
    from smpp_ray.console import line

    facts = read_kept_facts(location)
    if facts is None or (_same_selection(facts, resumed_epoch, selection)
                         and resumed_epoch + 1 >= selection["warmup_epochs"]):
        return
    storage.remove(location)
    line(f"removed kept ids {location} scored after epoch {facts.get('scored_after_epoch')} "
         f"(keep {facts.get('keep')}); this run resumes after epoch {resumed_epoch}")


def _same_selection(facts: dict[str, Any], scored_after_epoch: int, selection: dict[str, Any]) -> bool:
    return facts.get("scored_after_epoch") == scored_after_epoch and facts.get("keep") == selection["keep"]


def _select_posts(model: torch.nn.Module, select_shard: Any, selection: dict[str, Any], epoch: int,
                  batch_size: int, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """The dataset-level selection pass at the start of ``epoch``: every rank scores its shard of
    the train split, rank 0 ranks all posts and writes the kept ids; returns the selection facts.

    Ends in a broadcast from rank 0 after the write, so no rank starts the epoch's train shard
    (whose pipeline reads the file) before the file is complete.
    """
    from smpp_ray.console import line

    started = time.perf_counter()
    location = selection["kept_ids"]
    facts = read_kept_facts(location) if rank == 0 else None
    reuse = _broadcast(facts if facts is not None and _same_selection(facts, epoch - 1, selection) else None,
                       rank, world)
    if reuse is not None:
        if rank == 0:
            line(f"reusing kept ids {location}: {reuse['kept']}/{reuse['total']} posts, scored after epoch {epoch - 1}")
        return {**reuse, "reused": True}
    batches = iterate_torch(select_shard, batch_size, train=False)
    pids, losses = _gather_scores(*score_classification_loss(model, batches, device), world)
    facts = None
    if rank == 0:
        index = select_easiest(pids, losses, selection["keep"])
        facts = {"keep": selection["keep"], "kept": int(len(index)), "total": len(pids), "epoch": epoch,
                 "scored_after_epoch": epoch - 1, "seconds": time.perf_counter() - started}
        write_kept_ids(location, [pids[i] for i in index], losses[index], facts)
        line(f"sample selection after epoch {epoch}: kept {facts['kept']}/{facts['total']} posts by "
             f"classification loss in {facts['seconds']:.1f} s -> {location}")
    return {**_broadcast(facts, rank, world), "reused": False}


def _gather_scores(pids: list[str], losses: Any, world: int) -> tuple[list[str], Any]:
    """Every rank's ``(pid, loss)`` on every rank, concatenated in rank order."""
    import numpy as np
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return pids, losses
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (pids, losses))
    return [p for part, _ in gathered for p in part], np.concatenate([loss for _, loss in gathered])


def _epoch_line(metrics: dict[str, Any], epoch: int, epochs: int, seconds: float) -> None:
    """``epoch 2/4 train_loss .. val_top1 .. samples/s .. input wait ..% ETA ..`` for the console."""
    from smpp_ray.console import line

    left = (epochs - epoch - 1) * seconds
    line(f"epoch {epoch + 1}/{epochs} train_loss {metrics['train_loss']:.4f} val_top1 {metrics.get('val_top1', float('nan')):.3f} "
         f"{metrics['samples_per_s']:.0f} samples/s, input wait {metrics['data_wait_fraction']:.0%}, "
         f"{seconds:.0f} s/epoch, ETA {left:.0f} s")


def _build_model(model_config: ModelConfig, taxonomy: Taxonomy, prototypes_path: str | None, seed: int):
    """The model (same prompt init on every rank, though DDP broadcasts rank 0's anyway) and its loss."""
    from smpp_ray.model.model import seeded_model

    model = seeded_model(model_config, taxonomy, prototypes_path, seed)
    return model, create_loss_fn(model)


def create_loss_fn(model: torch.nn.Module):
    """``loss_fn(outputs, batch) -> (B,)``: the model's weighted per-sample loss (for selection)."""

    def loss_fn(outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        return model.compute_losses(outputs, batch["subcategory_id"], batch["category_id"], batch["label"],
                                    reduction="none")["loss"]  # (B,)

    return loss_fn


def _reduce_train_stats(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Loss and throughput over all workers: sums of losses/samples, the slowest worker's times
    (epoch and input wait, each maximised separately)."""
    import torch.distributed as dist

    sums = torch.tensor([stats["loss_sum"], stats["samples"], stats["kept"]], dtype=torch.float64)
    seconds = torch.tensor([stats["seconds"], stats["data_wait_seconds"]], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        sums, seconds = sums.to(backend_device), seconds.to(backend_device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    loss_sum, samples, kept = (float(v) for v in sums.cpu())
    epoch_seconds, wait_seconds = (float(v) for v in seconds.cpu())
    return {"train_loss": loss_sum / max(1.0, samples), "train_samples": samples,
            "kept_fraction": kept / max(1.0, samples), "train_seconds": epoch_seconds,
            "samples_per_s": samples / max(1e-9, epoch_seconds),
            "data_wait_fraction": wait_seconds / max(1e-9, epoch_seconds)}


def _broadcast(value: Any, rank: int, world: int) -> Any:
    """Rank 0's object on every rank (gloo/nccl via ``broadcast_object_list``)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _report(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, model_config: ModelConfig,
            taxonomy: Taxonomy, prototypes_path: str | None, metrics: dict[str, float], state: LoopState,
            probe: dict[str, Any] | None, rank: int) -> None:
    """Every rank reports (it is a barrier); only rank 0 attaches the checkpoint it wrote."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="smpp-ckpt-") as directory:
        ckpt.save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler,
                             model_config=model_config, taxonomy=taxonomy, prototypes_path=prototypes_path,
                             metrics=metrics, state=state.to_dict(), probe=probe)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _failure_hook(fail_at_epoch: int, epoch: int, rank: int, world: int, run_path: str):
    """Testing aid: rank 1 (rank 0 when alone) raises after the first optimizer step of
    ``fail_at_epoch``, once: a marker file in the run's storage lets the restarted group pass.

    Failing after a step rather than at the epoch start makes the failure deterministic: the
    step's all-reduce is a barrier, so rank 0 has finished logging the previous epoch.
    """
    if epoch != fail_at_epoch or rank != min(1, world - 1):
        return None

    def fail(steps: int) -> None:
        marker = storage.join(run_path, f"fail_at_epoch_{epoch}.marker")
        if storage.exists(marker):
            return
        storage.write_text(marker, f"failed on purpose at {time.time()}\n")
        raise RuntimeError(f"train.fail_at_epoch: rank {rank} fails on purpose in epoch {epoch} "
                           f"after {steps} step(s)")

    return fail
