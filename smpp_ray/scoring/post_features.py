"""The metadata features of new posts, as scoring computes them: the one place both the network
scorer (:mod:`smpp_ray.scoring.scorer`) and the fallback regressor (:mod:`smpp_ray.scoring.fallback`)
get them from, so a post without an image gets the features it would have had with one."""

from __future__ import annotations

import numpy as np
import pandas as pd

from smpp_ray.features.state import FeatureState

_STATES: dict[str, FeatureState] = {}


def load_feature_state(location: str) -> FeatureState:
    """The feature state at ``location``, loaded once per process (Ray reuses task workers)."""
    if location not in _STATES:
        _STATES.clear()
        _STATES[location] = FeatureState.load(location)
    return _STATES[location]


def metadata_features(state: FeatureState, posts: pd.DataFrame) -> dict[str, np.ndarray]:
    """The tabular and history feature columns (float64) of prepared posts, from the feature state.

    The one place they are computed for scoring: the network path (:class:`PostFeaturiser`) and
    the fallback regressor (:mod:`smpp_ray.scoring.fallback`) both call it, so a post without an
    image gets the same metadata features it would have had with one.
    """
    features, columns = state.new_post_features(posts.drop(columns=["image"], errors="ignore"))
    return {column.name: pd.to_numeric(features[column.name]).to_numpy(dtype=np.float64) for column in columns}
