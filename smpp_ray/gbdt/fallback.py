"""The fallback regressor: what scores a post the network cannot see (its image is missing or corrupt).

A SMP Challenge submission needs a score for every test post, and a few of them always come
with an unreadable image. The tune stage therefore fits, beside the family models, one GBDT on
the feature groups that need no image (every group of ``tune.feature_groups`` but ``network``),
with the best configuration the search found, on the same splits as the final models; and it
records the training label mean, the constant that scores a post with no usable metadata either.

This module is the one owner of those files in the tune folder::

    models/fallback/               MLflow model folder (lightgbm or catboost flavour); absent when
                                   no feature group needs no image (prior only)
    fallback_feature_spec.json     its :class:`smpp_ray.gbdt.data.FeatureSpec` (no network column)
    fallback.json                  family, groups, prior, rounds, params, val/test SRC and MAE
    fallback_predictions.parquet   pid, split, label, category, pred (val from the train-only refit)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from smpp_ray import storage
from smpp_ray.features.manifest import GROUPS

FALLBACK_FILE = "fallback.json"
FALLBACK_SPEC_FILE = "fallback_feature_spec.json"
FALLBACK_PREDICTIONS_FILE = "fallback_predictions.parquet"
#: The model folder, relative to the tune folder (beside ``models/<family>/``).
FALLBACK_MODEL_DIR = "models/fallback"
#: Feature groups computed from the network (the image and the embeddings retrieval searches with):
#: a post without a usable image has none of them.
IMAGE_GROUPS = ("network", "neighbours", "user_neighbours")
#: Which family's best configuration the fallback reuses, in order of preference.
FAMILY_PREFERENCE = ("lightgbm", "catboost")


def fallback_groups(feature_groups: Sequence[str]) -> tuple[str, ...]:
    """The groups of ``tune.feature_groups`` (all groups when empty) that need no image."""
    return tuple(g for g in (tuple(feature_groups) or GROUPS) if g not in IMAGE_GROUPS)


def fallback_family(models: Sequence[str]) -> str:
    """The family whose search's best configuration the fallback is fit with."""
    for family in FAMILY_PREFERENCE:
        if family in models:
            return family
    raise ValueError(f"tune.models {list(models)!r} has none of {list(FAMILY_PREFERENCE)}: no configuration "
                     "to fit the fallback regressor with")


@dataclass(frozen=True)
class FallbackLocations:
    """Where the fallback's files of one tune folder are (any location)."""

    facts: str
    model: str
    feature_spec: str
    predictions: str

    @classmethod
    def of(cls, tune_dir: str) -> FallbackLocations:
        return cls(storage.join(tune_dir, FALLBACK_FILE), storage.join(tune_dir, *FALLBACK_MODEL_DIR.split("/")),
                   storage.join(tune_dir, FALLBACK_SPEC_FILE), storage.join(tune_dir, FALLBACK_PREDICTIONS_FILE))


@dataclass(frozen=True)
class FallbackFacts:
    """The contents of ``fallback.json``."""

    family: str | None
    """GBDT family of ``models/fallback/``; None when no feature group needs no image (prior only)."""
    groups: tuple[str, ...]
    prior: float
    """Mean training label (the final models' fit rows): the score of a post nothing else can score."""
    rounds: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    refit_on: str = "train"
    val_src: float | None = None
    val_mae: float | None = None
    test_src: float | None = None
    test_mae: float | None = None

    @property
    def has_model(self) -> bool:
        return self.family is not None

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "groups": list(self.groups), "prior": self.prior, "rounds": self.rounds,
                "params": self.params, "refit_on": self.refit_on,
                **{k: _finite(getattr(self, k)) for k in ("val_src", "val_mae", "test_src", "test_mae")}}

    def save(self, location: str) -> str:
        return storage.write_text(location, json.dumps(self.to_dict(), indent=1, default=_json_default))

    @classmethod
    def load(cls, location: str) -> FallbackFacts:
        values = storage.read_json(location)
        try:
            prior = float(values["prior"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{location}: no numeric 'prior' ({err})") from None
        if not math.isfinite(prior):
            raise ValueError(f"{location}: prior {prior!r} is not finite")
        return cls(values.get("family"), tuple(values.get("groups") or ()), prior, int(values.get("rounds") or 0),
                   dict(values.get("params") or {}), str(values.get("refit_on", "train")),
                   *(values.get(k) for k in ("val_src", "val_mae", "test_src", "test_mae")))


def _finite(value: float | None) -> float | None:
    """JSON null for a metric with no value (NaN: a split without labels)."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {value!r} of type {type(value).__name__} to JSON")
