"""Features for the popularity regressors: network outputs of the trained checkpoint (Ray Data
actor pool) joined by pid with user, time, text, geo, category and leak-free history features.

``extract_features(data_dir, checkpoint_dir, out_dir, extract_config=...)`` writes
``split=*/part-*.parquet`` and ``feature_manifest.json`` (column -> group, categorical).
"""

from smpp_ray.features.extract import extract_features, validate_checkpoint
from smpp_ray.features.manifest import (
    GROUPS,
    KEY_COLUMNS,
    FeatureColumn,
    categorical_columns,
    load_feature_manifest,
    select_columns,
)
from smpp_ray.features.network import NetworkFeatureExtractor

__all__ = ["GROUPS", "KEY_COLUMNS", "FeatureColumn", "NetworkFeatureExtractor", "categorical_columns",
           "extract_features", "load_feature_manifest", "select_columns", "validate_checkpoint"]
