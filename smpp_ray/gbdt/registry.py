"""Saving the refit models in MLflow's lightgbm / catboost flavours, logging and registering them.

Models are saved with the flavour's ``save_model`` into a local scratch folder and uploaded to
the stage output (any location, ``s3://`` included), then logged with an explicit-URI
:class:`mlflow.MlflowClient` and registered as a version of ``<prefix>-<family>`` whose source
is the run's artifact folder, so no process-global MLflow state is touched (a Ray job driver and
a notebook can log to different stores side by side). Reading a model from a location fetches
it into the node's cache first (:func:`smpp_ray.storage.local_copy`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import digests, storage, tracking

logger = logging.getLogger(__name__)


#: URI schemes only MLflow resolves (registry, run and tracking-server artifacts); any other
#: location is a storage location, fetched to this node before MLflow reads it.
MLFLOW_SCHEMES = ("runs:", "models:", "mlflow-artifacts:", "dbfs:", "http:", "https:")


def _check_family(family: str) -> None:
    if family not in ("lightgbm", "catboost"):
        raise ValueError(f"unknown model family {family!r}; expected lightgbm or catboost")


def save_flavour(family: str, model: Any, location: str, sample: pd.DataFrame) -> str:
    """Write ``model`` as an MLflow model folder at ``location`` (any location; a previous model
    there is replaced) with its signature; returns the normalised location."""
    from mlflow.models import infer_signature

    _check_family(family)
    signature = infer_signature(sample, np.asarray(model.predict(sample), dtype=np.float64))
    with tempfile.TemporaryDirectory(prefix=f"smpp-{family}-") as scratch:
        local = os.path.join(scratch, family)  # save_model wants a folder that does not exist yet
        if family == "lightgbm":
            import mlflow.lightgbm

            mlflow.lightgbm.save_model(model, local, signature=signature)
        else:
            import mlflow.catboost

            mlflow.catboost.save_model(model, local, signature=signature)
        digests.write_manifest(local)
        return storage.upload_dir(local, location)


def model_folder(location: str) -> str:
    """What MLflow can read for a model at ``location``: a local folder (a remote one fetched into
    this node's cache), or an MLflow URI (``runs:/``, ``models:/``, ...) passed through."""
    if str(location).startswith(MLFLOW_SCHEMES):
        return str(location)
    return storage.local_copy(location)


def load_flavour(family: str, location: str) -> Any:
    """Load a model saved by :func:`save_flavour` in its own flavour, from any location (local,
    ``file://``, ``s3://``, ...; its files checked against their digests) or an MLflow artifact URI."""
    _check_family(family)
    source = model_folder(location)
    if not str(location).startswith(MLFLOW_SCHEMES):
        digests.verify_manifest(source, shown=location)
    if family == "lightgbm":
        import mlflow.lightgbm

        return mlflow.lightgbm.load_model(source)
    import mlflow.catboost

    return mlflow.catboost.load_model(source)


def log_and_register(tracking_uri: str, run_id: str, model_location: str, name: str, *,
                     description: str = "", tags: Mapping[str, Any] | None = None,
                     params: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Log the model folder at ``model_location`` (any location) as an MLflow *logged model* of
    ``run_id`` (the UI's Models tab: its params, tags and signature), and register it as a new
    version of ``name`` (created with ``description`` the first time; the version gets ``tags``)."""
    client = tracking.client(tracking_uri)
    text_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment, name=name, source_run_id=run_id, tags=text_tags,
                                        params={str(k): tracking.param_value(v) for k, v in (params or {}).items()})
    try:
        client.log_model_artifacts(logged.model_id, storage.local_copy(model_location))
    except Exception:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    source = logged.artifact_location
    try:
        client.get_registered_model(name)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST: first version of this name
        client.create_registered_model(name, description=description or None)
    version = client.create_model_version(name, source=source, run_id=run_id, tags=text_tags,
                                          model_id=logged.model_id)
    logger.info("registered %s version %s (logged model %s)", name, version.version, logged.model_id)
    return {"name": name, "version": str(version.version), "source": source, "run_id": run_id,
            "model_id": logged.model_id}


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
