"""Features for the popularity regressors: network outputs of the trained checkpoint (Ray Data
actor pool) joined by pid with user, time, text, geo, category and leak-free history features.

``extract_features(data_dir, checkpoint_dir, out_dir, extract_config=...)`` (locations: local
paths or URIs) writes ``split=*/part-*.parquet`` and ``feature_manifest.json`` (column -> group,
categorical), whose one reader and writer is :mod:`smpp_ray.features.manifest`.
"""

from smpp_ray.features.extract import checkpoint_location, extract_features, validate_checkpoint
from smpp_ray.features.manifest import (
    GROUPS,
    KEY_COLUMNS,
    MANIFEST_FILE,
    FeatureColumn,
    FeatureSet,
    categorical_columns,
    manifest_columns,
    select_columns,
)
from smpp_ray.features.network import NetworkFeatureExtractor

__all__ = ["GROUPS", "KEY_COLUMNS", "MANIFEST_FILE", "FeatureColumn", "FeatureSet", "NetworkFeatureExtractor",
           "categorical_columns", "checkpoint_location", "extract_features", "manifest_columns", "select_columns",
           "validate_checkpoint"]
