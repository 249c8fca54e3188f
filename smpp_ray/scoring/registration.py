"""Registering the whole scorer (checkpoint, feature state, the tune stage's models and blend) as
one MLflow pyfunc model with the champion alias: what ``models:/<prefix>-scorer@champion`` serves.

The tune stage calls this after its search: the regressors (:mod:`smpp_ray.gbdt`) know nothing of
the scorer that wraps them.
"""

from __future__ import annotations

import logging
import tempfile

from smpp_ray.config import TuneConfig
from smpp_ray.features.manifest import FeatureSet
from smpp_ray.features.state import FeatureState, has_feature_state
from smpp_ray.gbdt.output import TuneOutput
from smpp_ray.scoring.bundle import FallbackPart, ScorerBundle
from smpp_ray.scoring.pyfunc import example_posts, log_scorer
from smpp_ray.tracking import TrackingContext

logger = logging.getLogger(__name__)


def register_scorer(ctx: TrackingContext, features_dir: str, tune_dir: str, config: TuneConfig) -> dict[str, str]:
    """Log and register the scorer of the features in ``features_dir`` and the models in
    ``tune_dir`` to the run ``ctx``; returns its registry facts (``name``, ``version``, ``uri``),
    nothing for metadata-only features (no network to score with)."""
    state = FeatureState.load(features_dir) if has_feature_state(features_dir) else None
    if state is None or not state.checkpoint or not state.dataset:
        logger.info("tune: the features have no feature state with a network checkpoint; "
                    "the scorer model is not registered (the family models are)")
        return {}
    tune = TuneOutput.at(tune_dir)
    bundle = ScorerBundle(state.checkpoint, FeatureSet(features_dir).state, tune.feature_spec, tune.blend,
                          {family: tune.model(family) for family in config.models},
                          fallback=FallbackPart.from_tune(tune_dir))
    with tempfile.TemporaryDirectory(prefix="smpp-scorer-") as scratch:
        return log_scorer(ctx.tracking_uri, ctx.run_id, bundle, name=f"{config.registered_model_prefix}-scorer",
                          alias=config.champion_alias, input_example=example_posts(state.dataset), scratch=scratch)
