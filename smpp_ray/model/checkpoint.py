"""Training checkpoints: only the trainable state, plus what it takes to rebuild the model anywhere.

A checkpoint folder holds::

    trainable.pt              model.trainable_state_dict() (prompts, fusion, heads; no frozen CLIP)
    optimizer.pt              {"optimizer": ..., "scheduler": ...} state dicts, for resuming
    meta.json                 format version, epoch, model config, taxonomy, prototype reference,
                              this epoch's metrics and the loop state (history, early stopping)
    prototypes.safetensors    a copy of the prototype bank, so the folder is self-contained
    probe.pt                  pids + logits of the first validation rows as the worker computed them

The frozen backbone is rebuilt from ``model_config`` (open_clip name + pretrained tag or
location), so a checkpoint stays small however large the backbone is.

A checkpoint is written into a local scratch folder (Ray Train then persists it to the run's
storage) and read back by location: a local folder or a URI such as
``s3://bucket/run/train/ray_results/smpp-train/checkpoint_...``. This module is also the one
resolver of "which checkpoint": :func:`resolve_checkpoint` takes a checkpoint folder or a
finished train stage folder (its ``summary.json`` names the best checkpoint).

Torch is imported where it is used, so resolving a checkpoint costs no torch import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smpp_ray import console, storage
from smpp_ray.config import ModelConfig
from smpp_ray.data.schema import Taxonomy
from smpp_ray.summary import SUMMARY_FILE, read_summary

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
TRAINABLE_FILE = "trainable.pt"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "meta.json"
PROBE_FILE = "probe.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under a DDP wrapper (``getattr(model, "module", model)``)."""
    return getattr(model, "module", model)


def save_checkpoint(directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, model_config: ModelConfig, taxonomy: Taxonomy,
                    prototypes_path: str | None, metrics: dict[str, float], state: dict[str, Any],
                    probe: dict[str, Any] | None = None) -> Path:
    """Write one checkpoint into the local scratch folder ``directory`` and return its path.

    ``prototypes_path`` is the bank's location (local or URI): the bank is copied in from this
    node's cached copy, and the location is recorded in ``meta.json``. ``state`` is the loop
    state needed to resume exactly: ``epoch``, ``global_step``, early stopping counters,
    ``attempt`` and the per-epoch ``history``.
    """
    import shutil

    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).trainable_state_dict(), directory / TRAINABLE_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               directory / OPTIMIZER_FILE)
    if prototypes_path:
        from smpp_ray.model.prototypes import PROTOTYPES_FILE

        shutil.copyfile(storage.local_copy(prototypes_path), directory / PROTOTYPES_FILE)
    if probe is not None:
        torch.save(probe, directory / PROBE_FILE)
    meta = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "epoch": int(state["epoch"]),
        "model_config": dataclasses.asdict(model_config),
        "taxonomy": taxonomy.to_dict(),
        "prototypes_path": prototypes_path,
        "metrics": metrics,
        "state": state,
        # Checked on load: a flipped byte in the weights fails loudly instead of scoring with them
        "digests": {TRAINABLE_FILE: storage.file_digest(str(directory / TRAINABLE_FILE))},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def read_meta(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of the checkpoint at a location (local folder or URI), with errors that name it."""
    location = storage.join(os.fspath(checkpoint), META_FILE)
    try:
        text = storage.read_text(location)
    except storage.StorageError as err:
        raise FileNotFoundError(f"{storage.normalize(os.fspath(checkpoint))!r} is not a training checkpoint: "
                                f"{META_FILE} missing") from err
    meta = json.loads(text)
    version = meta.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"checkpoint {storage.normalize(os.fspath(checkpoint))!r} has format_version "
                         f"{version!r}; this code reads version {CHECKPOINT_FORMAT_VERSION}")
    return meta


def verified_file(checkpoint: str, name: str, meta: dict[str, Any]) -> str:
    """This node's copy of the checkpoint's file ``name``, checked against the digest ``meta.json``
    records for it (checkpoints written before digests are taken as they are)."""
    local = storage.local_copy(storage.join(checkpoint, name))
    expected = (meta.get("digests") or {}).get(name)
    if expected and storage.file_digest(local) != expected:
        raise ValueError(f"{storage.join(checkpoint, name)} does not match the digest {META_FILE} records for it: "
                         "the file is damaged or was replaced; restore it or rerun `smpp train`")
    return local


def model_config_from_meta(meta: dict[str, Any], where: str = "checkpoint") -> ModelConfig:
    """Rebuild the :class:`ModelConfig` stored in ``meta.json``; unknown keys are an error."""
    values = dict(meta["model_config"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: model_config key {unknown[0]!r} is not a ModelConfig field")
    return ModelConfig(**values)


def prototypes_in_checkpoint(checkpoint: str | os.PathLike[str], meta: dict[str, Any]) -> str | None:
    """Location of the checkpoint's own prototype copy, else of the original bank it was trained with."""
    from smpp_ray.model.prototypes import PROTOTYPES_FILE  # torch comes with the module: only here

    own = storage.join(os.fspath(checkpoint), PROTOTYPES_FILE)
    if storage.is_file(own):
        return own
    original = meta.get("prototypes_path")
    if original and not storage.is_file(original):
        raise FileNotFoundError(f"checkpoint {storage.normalize(os.fspath(checkpoint))!r} has no "
                                f"{PROTOTYPES_FILE} and its original prototypes {original!r} do not exist")
    return original


def load_training_state(checkpoint: str | os.PathLike[str],
                        map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything a worker needs to resume: ``meta``, ``trainable``, ``optimizer``, ``scheduler``.

    ``checkpoint`` is a local folder (what ``Checkpoint.as_directory`` gives) or any location.
    """
    import torch

    location = os.fspath(checkpoint)
    meta = read_meta(location)
    trainable = torch.load(storage.local_copy(storage.join(location, TRAINABLE_FILE)),
                           map_location=map_location, weights_only=True)
    opt = torch.load(storage.local_copy(storage.join(location, OPTIMIZER_FILE)),
                     map_location=map_location, weights_only=True)
    return {"meta": meta, "trainable": trainable, "optimizer": opt["optimizer"], "scheduler": opt["scheduler"]}


# ---------------------------------------------------------------------------------------------
# Which checkpoint


#: Ray Train names each reported checkpoint's folder ``checkpoint_<timestamp>`` under the run.
CHECKPOINT_DIR_PREFIX = "checkpoint_"


def remove_uncommitted_checkpoints(run_path: str, committed: list[str]) -> list[str]:
    """Remove the ``checkpoint_*`` folders of ``run_path`` that are not in ``committed``; returns them.

    Ray Train uploads a checkpoint folder before it records it in its checkpoint manager's
    snapshot; a run killed in between leaves a folder no Result lists, which retention never
    deletes and which would sit in the run's storage for good (a few hundred MB each with
    unfrozen CLIP blocks). ``committed`` are the folders Ray's snapshot lists (any locations;
    matched by name). Call it only while no run writes to ``run_path``.
    """
    keep = {storage.name(storage.normalize(c)) for c in committed}
    removed = []
    for entry in storage.list_names(run_path):
        location = storage.join(run_path, entry)
        if entry.startswith(CHECKPOINT_DIR_PREFIX) and entry not in keep and storage.is_dir(location):
            storage.remove(location)
            removed.append(location)
            logger.warning("removed checkpoint folder %s: Ray Train never committed it (a run stopped "
                           "while reporting it)", location)
    return removed


def best_checkpoint(train_dir: str) -> str:
    """The best checkpoint's location recorded by the finished train stage in ``train_dir``."""
    summary = read_summary(train_dir)
    best = summary.artifact("best_checkpoint") if summary else None
    if summary is None or not summary.complete or not best:
        raise ValueError(f"{storage.normalize(train_dir)!r} holds no finished train stage ({SUMMARY_FILE} with "
                         "best_checkpoint); run `smpp train` first or pass the checkpoint folder itself")
    return best


def resolve_checkpoint(location: str | os.PathLike[str] | None) -> str | None:
    """A checkpoint folder (with ``trainable.pt``) or a train stage folder (``summary.json``) ->
    the checkpoint folder's location; None for None or empty. ValueError for anything else."""
    if location is None or os.fspath(location) == "":
        return None
    location = storage.normalize(os.fspath(location))
    if storage.is_file(storage.join(location, TRAINABLE_FILE)):
        return location
    if storage.is_file(storage.join(location, SUMMARY_FILE)):
        best = best_checkpoint(location)
        if not storage.is_file(storage.join(best, TRAINABLE_FILE)):
            raise ValueError(f"train stage {location!r} names best checkpoint {best!r}, which holds no "
                             f"{TRAINABLE_FILE} (deleted?); rerun `smpp train`")
        return best
    raise ValueError(f"checkpoint {location!r} is neither a checkpoint folder ({TRAINABLE_FILE}) "
                     f"nor a train stage folder ({SUMMARY_FILE})")


def load_model_from_checkpoint(checkpoint: str | os.PathLike[str], device: str | torch.device = "cpu",
                               pretrained: str | None = None):
    """The trained :class:`SMPPModel` in eval mode, outside Ray (feature extraction, predict).

    ``checkpoint`` is any location :func:`resolve_checkpoint` accepts. Remote files are fetched
    once per node into its cache (``storage.local_copy``), so a pool of inference actors on one
    node downloads the trainable state once. The frozen backbone is rebuilt from the stored model
    config, then the trainable state is loaded over it; a key mismatch raises
    (``load_trainable_state_dict`` is strict). ``pretrained`` replaces the backbone weights
    location the checkpoint names (a scorer bundle carries its own copy).
    """
    import torch

    from smpp_ray.model.model import create_model

    location = resolve_checkpoint(checkpoint)
    if location is None:
        raise ValueError("no checkpoint given")
    meta = read_meta(location)
    config = model_config_from_meta(meta, where=location)
    if pretrained:
        config = dataclasses.replace(config, pretrained=pretrained)
    taxonomy = Taxonomy.from_dict(meta["taxonomy"])
    model = create_model(config, taxonomy, prototypes_in_checkpoint(location, meta))
    state = torch.load(verified_file(location, TRAINABLE_FILE, meta), map_location="cpu", weights_only=True)
    model.load_trainable_state_dict(state)
    model.to(device)
    model.eval()
    console.details(__name__).info("loaded checkpoint %s (epoch %d, val_top1 %s)", location, meta["epoch"],
                meta.get("metrics", {}).get("val_top1"))
    return model
