"""The tune stage's folder: the one owner of its file names (readers and the writer ask a
:class:`TuneOutput` where a file is, never join a name themselves)::

    ray_results/<family>/      Tune experiment folders (``Tuner.restore`` resumes from them)
    search_<family>.json       every trial: config, status, best val score and its round
    models/<family>/           MLflow model folder of the final model (lightgbm / catboost flavour)
    feature_spec.json          feature list, groups and categorical vocabularies of the models
    blend.json                 blend weights and calibrators (chosen on val), objective, rounds
    predictions.parquet        pid, split, label, category, pred_<model> / raw_<model>
    metrics.json               overall / per category / per decile metrics on val and test
    plots/<name>.png           pred_vs_true, mae_per_category, feature_importance, deciles
    fallback.json, fallback_feature_spec.json, fallback_predictions.parquet, models/fallback/
                               the fallback regressor (see :class:`smpp_ray.gbdt.fallback.FallbackLocations`)

A scorer bundle (:mod:`smpp_ray.scoring.bundle`) lays out its models, feature spec and blend
under the same names (:data:`FEATURE_SPEC_FILE`, :data:`BLEND_FILE`, :data:`MODELS_DIR`).
"""

from __future__ import annotations

from dataclasses import dataclass

from smpp_ray import storage

FEATURE_SPEC_FILE = "feature_spec.json"
BLEND_FILE = "blend.json"
MODELS_DIR = "models"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
PLOTS_DIR = "plots"
SEARCHES_DIR = "ray_results"


@dataclass(frozen=True)
class TuneOutput:
    """Where each file of one tune stage folder is (any location: a local path or a URI)."""

    location: str

    @classmethod
    def at(cls, location: str) -> TuneOutput:
        return cls(storage.normalize(location))

    @property
    def ray_results(self) -> str:
        """The Tune experiments, one folder per family."""
        return storage.join(self.location, SEARCHES_DIR)

    @property
    def metrics(self) -> str:
        return storage.join(self.location, METRICS_FILE)

    @property
    def predictions(self) -> str:
        return storage.join(self.location, PREDICTIONS_FILE)

    @property
    def feature_spec(self) -> str:
        return storage.join(self.location, FEATURE_SPEC_FILE)

    @property
    def blend(self) -> str:
        return storage.join(self.location, BLEND_FILE)

    @property
    def plots(self) -> str:
        return storage.join(self.location, PLOTS_DIR)

    def plot(self, name: str) -> str:
        """One plot (``pred_vs_true``, ``mae_per_category``, ``feature_importance``, ``deciles``)."""
        return storage.join(self.plots, f"{name}.png")

    def model(self, family: str) -> str:
        """The final model of ``family`` (an MLflow model folder)."""
        return storage.join(self.location, MODELS_DIR, family)

    def search(self, family: str) -> str:
        """The trials of ``family``'s search (JSON)."""
        return storage.join(self.location, f"search_{family}.json")
