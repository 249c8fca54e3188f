"""Saving the refit models in MLflow's lightgbm / catboost flavours, logging and registering them.

Models are saved with the flavour's ``save_model`` into the stage output, uploaded with an
explicit-URI :class:`mlflow.MlflowClient` and registered as a version of
``<prefix>-<family>`` whose source is the run's artifact folder, so no process-global MLflow
state is touched (a Ray job driver and a notebook can log to different stores side by side).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import tracking

logger = logging.getLogger(__name__)


def save_flavour(family: str, model: Any, path: Path, sample: pd.DataFrame) -> Path:
    """Write ``model`` as an MLflow model folder (overwriting a previous one) with its signature."""
    from mlflow.models import infer_signature

    if path.exists():
        shutil.rmtree(path)  # save_model refuses an existing folder; a rerun overwrites cleanly
    signature = infer_signature(sample, np.asarray(model.predict(sample), dtype=np.float64))
    if family == "lightgbm":
        import mlflow.lightgbm

        mlflow.lightgbm.save_model(model, str(path), signature=signature)
    elif family == "catboost":
        import mlflow.catboost

        mlflow.catboost.save_model(model, str(path), signature=signature)
    else:
        raise ValueError(f"unknown model family {family!r}; expected lightgbm or catboost")
    return path


def load_flavour(family: str, uri: str) -> Any:
    """Load a model saved by :func:`save_flavour` (a local path or an artifact URI) in its own flavour."""
    if family == "lightgbm":
        import mlflow.lightgbm

        return mlflow.lightgbm.load_model(uri)
    if family == "catboost":
        import mlflow.catboost

        return mlflow.catboost.load_model(uri)
    raise ValueError(f"unknown model family {family!r}; expected lightgbm or catboost")


def log_and_register(tracking_uri: str, run_id: str, model_dir: Path, name: str,
                     artifact_path: str = "model") -> dict[str, str]:
    """Upload ``model_dir`` to ``run_id`` and register it as a new version of ``name``."""
    client = tracking.client(tracking_uri)
    client.log_artifacts(run_id, str(model_dir), artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        client.get_registered_model(name)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST: first version of this name
        client.create_registered_model(name)
    version = client.create_model_version(name, source=source, run_id=run_id)
    logger.info("registered %s version %s from %s", name, version.version, source)
    return {"name": name, "version": str(version.version), "source": source, "run_id": run_id}


def registered_source(tracking_uri: str, name: str, version: str | None = None) -> str:
    """The artifact URI of a registered version (the latest when ``version`` is None)."""
    client = tracking.client(tracking_uri)
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise LookupError(f"no registered model named {name!r} in {tracking_uri}")
    chosen = max(versions, key=lambda v: int(v.version)) if version is None else \
        next((v for v in versions if str(v.version) == str(version)), None)
    if chosen is None:
        raise LookupError(f"registered model {name!r} has no version {version!r}")
    return chosen.source
