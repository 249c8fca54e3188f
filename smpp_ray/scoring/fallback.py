"""Scoring posts the network cannot see: the fallback regressor on their metadata, else the prior.

A post whose image is missing or corrupt still has its title, tags, date, user and geo; the tune
stage fitted a GBDT on exactly those feature groups (:mod:`smpp_ray.gbdt.fallback`), and the
scorer bundle carries it (:class:`smpp_ray.scoring.bundle.FallbackPart`). Its features are
computed from the saved feature state by the same function as the network path's
(:func:`smpp_ray.scoring.post_features.metadata_features`) and encoded with the fallback's own
:class:`~smpp_ray.gbdt.data.FeatureSpec`, so a post scored here gets the score the tune stage's
fallback predictions give it. A post with no usable metadata either gets the prior, the mean
training label. Each score says which of the three made it (``scored_by``).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from smpp_ray.gbdt.fallback import FALLBACK_FILE
from smpp_ray.scoring.bundle import ScorerBundle

logger = logging.getLogger(__name__)

#: ``scored_by`` values: the network and the family models, the fallback regressor, the prior.
SCORED_BY_NETWORK = "network"
SCORED_BY_FALLBACK = "fallback"
SCORED_BY_PRIOR = "prior"


def missing_fallback(source: str) -> str:
    """What to say when a scorer has no fallback part: what is missing, and how to get it."""
    return (f"the scorer {source!r} has no fallback regressor or label prior (no {FALLBACK_FILE} beside its models: "
            "its tune stage predates them); rerun `smpp tune --force` on its features and score again")


class FallbackScorer:
    """Prepared posts (POSTS_SCHEMA columns; ``image`` may be empty bytes) -> fallback scores.

    Loads the model and feature spec once (a Serve replica, a predict driver); ``prior`` is
    there even for a prior-only fallback (``has_model`` False).
    """

    def __init__(self, bundle: ScorerBundle, source: str = "") -> None:
        from smpp_ray.gbdt.data import FeatureSpec
        from smpp_ray.gbdt.fallback import FallbackFacts
        from smpp_ray.gbdt.registry import load_flavour

        if bundle.fallback is None:
            raise ValueError(missing_fallback(source or bundle.checkpoint))
        self.facts = FallbackFacts.load(bundle.fallback.facts)
        self.state_location = bundle.feature_state
        self.model = None
        self.spec = None
        if bundle.fallback.model is not None and bundle.fallback.feature_spec is not None:
            if self.facts.family is None:
                raise ValueError(f"{bundle.fallback.facts}: a fallback model is bundled but no family is recorded")
            self.model = load_flavour(self.facts.family, bundle.fallback.model)
            self.spec = FeatureSpec.load(bundle.fallback.feature_spec)

    @property
    def prior(self) -> float:
        return self.facts.prior

    @property
    def has_model(self) -> bool:
        return self.model is not None

    def features(self, posts: pd.DataFrame) -> pd.DataFrame:
        """The fallback's model matrix of ``posts`` (metadata features only, as the network path computes them)."""
        from smpp_ray.gbdt.data import encode
        from smpp_ray.scoring.post_features import load_feature_state, metadata_features

        if self.spec is None:
            raise ValueError("this fallback is the prior only: it has no model to compute features for")
        state = load_feature_state(self.state_location)
        return encode(pd.DataFrame(metadata_features(state, posts.reset_index(drop=True))), self.spec)

    def score(self, posts: pd.DataFrame) -> np.ndarray:
        """One fallback score per post, in order (float64); the prior for every post without a model."""
        if not len(posts):
            return np.empty(0, dtype=np.float64)
        if self.model is None:
            return np.full(len(posts), self.prior, dtype=np.float64)
        return np.asarray(self.model.predict(self.features(posts)), dtype=np.float64)


def fallback_scores(bundle: ScorerBundle, posts: pd.DataFrame) -> np.ndarray:
    """Fallback scores of prepared posts without a usable image (loads the fallback each call:
    for a few posts; hold a :class:`FallbackScorer` to score many batches)."""
    return FallbackScorer(bundle).score(posts)
