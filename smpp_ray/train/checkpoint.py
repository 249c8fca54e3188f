"""Training checkpoints: only the trainable state, plus what it takes to rebuild the model anywhere.

A checkpoint folder holds::

    trainable.pt              model.trainable_state_dict() (prompts, fusion, heads; no frozen CLIP)
    optimizer.pt              {"optimizer": ..., "scheduler": ...} state dicts, for resuming
    meta.json                 format version, epoch, model config, taxonomy, prototype reference,
                              this epoch's metrics and the loop state (history, early stopping)
    prototypes.safetensors    a copy of the prototype bank, so the folder is self-contained
    probe.pt                  pids + logits of the first validation rows as the worker computed them

The frozen backbone is rebuilt from ``model_config`` (open_clip name + pretrained tag), so a
checkpoint stays small however large the backbone is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from smpp_ray.config import ModelConfig
from smpp_ray.data.schema import Taxonomy

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 1
TRAINABLE_FILE = "trainable.pt"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "meta.json"
PROTOTYPES_FILE = "prototypes.safetensors"
PROBE_FILE = "probe.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under a DDP wrapper (``getattr(model, "module", model)``)."""
    return getattr(model, "module", model)


def save_checkpoint(directory: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, model_config: ModelConfig, taxonomy: Taxonomy,
                    prototypes_path: str | None, metrics: dict[str, float], state: dict[str, Any],
                    probe: dict[str, Any] | None = None) -> Path:
    """Write one checkpoint folder (see the module docstring) and return its path.

    ``state`` is the loop state needed to resume exactly: ``epoch``, ``global_step``, early
    stopping counters, ``attempt`` and the per-epoch ``history``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).trainable_state_dict(), directory / TRAINABLE_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               directory / OPTIMIZER_FILE)
    if prototypes_path:
        shutil.copyfile(prototypes_path, directory / PROTOTYPES_FILE)
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
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def read_meta(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder, with errors that name the folder."""
    path = Path(checkpoint_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(checkpoint_dir)!r} is not a training checkpoint: {META_FILE} missing")
    meta = json.loads(path.read_text())
    version = meta.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"checkpoint {str(checkpoint_dir)!r} has format_version {version!r}; "
                         f"this code reads version {CHECKPOINT_FORMAT_VERSION}")
    return meta


def model_config_from_meta(meta: dict[str, Any], where: str = "checkpoint") -> ModelConfig:
    """Rebuild the :class:`ModelConfig` stored in ``meta.json``; unknown keys are an error."""
    values = dict(meta["model_config"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: model_config key {unknown[0]!r} is not a ModelConfig field")
    return ModelConfig(**values)


def prototypes_in_checkpoint(checkpoint_dir: str | Path, meta: dict[str, Any]) -> str | None:
    """The checkpoint's own prototype copy, else the original path it was trained with."""
    local = Path(checkpoint_dir) / PROTOTYPES_FILE
    if local.is_file():
        return str(local)
    original = meta.get("prototypes_path")
    if original and not Path(original).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint_dir)!r} has no {PROTOTYPES_FILE} and its "
                                f"original prototypes {original!r} do not exist")
    return original


def load_training_state(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything a worker needs to resume: ``meta``, ``trainable``, ``optimizer``, ``scheduler``."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    trainable = torch.load(checkpoint_dir / TRAINABLE_FILE, map_location=map_location, weights_only=True)
    opt = torch.load(checkpoint_dir / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
    return {"meta": meta, "trainable": trainable, "optimizer": opt["optimizer"], "scheduler": opt["scheduler"]}


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a train output folder holding ``best_checkpoint/``."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if (path / "best_checkpoint" / META_FILE).is_file():
        return path / "best_checkpoint"
    raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint folder ({META_FILE}) nor a train "
                            "output folder with best_checkpoint/")


def load_model_from_checkpoint(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """The trained :class:`SMPPModel` in eval mode, outside Ray (feature extraction, predict).

    The frozen backbone is rebuilt from the stored model config, then the trainable state is
    loaded over it; a key mismatch raises (``load_trainable_state_dict`` is strict).
    """
    from smpp_ray.model.model import create_model

    checkpoint_dir = resolve_checkpoint_dir(checkpoint_dir)
    meta = read_meta(checkpoint_dir)
    config = model_config_from_meta(meta, where=str(checkpoint_dir))
    taxonomy = Taxonomy.from_dict(meta["taxonomy"])
    model = create_model(config, taxonomy, prototypes_in_checkpoint(checkpoint_dir, meta))
    state = torch.load(checkpoint_dir / TRAINABLE_FILE, map_location="cpu", weights_only=True)
    model.load_trainable_state_dict(state)
    model.to(device)
    model.eval()
    logger.info("loaded checkpoint %s (epoch %d, val_top1 %s)", checkpoint_dir, meta["epoch"],
                meta.get("metrics", {}).get("val_top1"))
    return model
