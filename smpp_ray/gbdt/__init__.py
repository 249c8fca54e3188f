"""GBDT regression on the extracted features: Ray Tune search over LightGBM and CatBoost,
MLflow-tracked trials, refit of the best configurations, a blend chosen on val, evaluation."""

from smpp_ray.gbdt.run import tune_models
from smpp_ray.gbdt.search import SearchInterrupted

__all__ = ["tune_models", "SearchInterrupted"]
