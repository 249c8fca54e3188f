"""Scoring prepared posts: feature state + checkpoint + GBDT models -> predicted popularity.

Two parts, so a Ray Data job can run them in different places:

- :class:`PostFeaturiser` (CPU): the tabular and history features from the saved feature state
  (:mod:`smpp_ray.features.state`), the decoded pixels and the tokens of a batch of prepared posts;
- :class:`PostScorer` (an actor: the network on its device, then LightGBM/CatBoost): the network
  features (embeddings projected with the train-only PCA), the neighbour features from the saved
  retrieval bank, the model matrix, each family's score and the blend.

:class:`Scorer` runs both in one process (the registered MLflow model, the Serve replicas). Every
path computes a post's features with the same functions as extraction, so a test post scored here
gets the score the evaluation path gave it. No training post is read.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from smpp_ray.scoring.bundle import MODEL_CHOICES, ScorerBundle
from smpp_ray.scoring.post_features import load_feature_state, metadata_features

logger = logging.getLogger(__name__)

def checkpoint_backbone_spec(checkpoint: str):
    """The image size, text length and normalisation the checkpoint's backbone expects."""
    from smpp_ray.model.backbone import backbone_spec
    from smpp_ray.model.checkpoint import model_config_from_meta, read_meta

    config = model_config_from_meta(read_meta(checkpoint), where=checkpoint)
    return backbone_spec(config.backbone, config.context_length)


class PostFeaturiser:
    """Prepared posts (a pandas batch of POSTS_SCHEMA columns) -> ``pid``, ``pixels``, ``tokens``,
    ``uid`` and ``postdate`` (what retrieval needs) and one column per tabular/history feature.
    Plain class: Ray Data maps it in CPU tasks."""

    def __init__(self, state_location: str, checkpoint: str) -> None:
        from smpp_ray.model.preprocess import BatchPreprocessor

        self.state_location = state_location
        spec = checkpoint_backbone_spec(checkpoint)
        self.preprocessor = BatchPreprocessor(spec.backbone, spec.image_size, spec.context_length, train=False,
                                              mean=spec.mean, std=spec.std)

    def __call__(self, posts: pd.DataFrame) -> dict[str, np.ndarray]:
        state = load_feature_state(self.state_location)
        features = metadata_features(state, posts)
        decoded = self.preprocessor({"pid": posts["pid"].to_numpy(), "image": posts["image"].to_numpy(),
                                     "title": posts["title"].to_numpy(), "tags": posts["tags"].to_numpy()})
        return {"pid": posts["pid"].astype(str).to_numpy(), "pixels": decoded["pixels"], "tokens": decoded["tokens"],
                "uid": posts["uid"].astype(str).to_numpy(), "postdate": posts["postdate"].astype("int64").to_numpy(),
                **features}


class PostScorer:
    """Featurised batch -> one score row per post: ``pid``, ``predicted_popularity`` (the chosen
    model), predicted subcategory and category names, ``pred_<family>`` per family.

    Callable class for Ray Data's actor pool: the network and the GBDT models load once per actor.
    """

    def __init__(self, bundle: ScorerBundle, model: str = "blend", device: str = "cpu", num_threads: int = 0) -> None:
        import torch

        from smpp_ray.features.network import NetworkFeatureExtractor
        from smpp_ray.gbdt.data import FeatureSpec
        from smpp_ray.gbdt.registry import load_flavour

        if model not in MODEL_CHOICES:
            raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODEL_CHOICES)}")
        from smpp_ray.gbdt.blend import read_blend

        if model != "blend" and model not in bundle.models:
            raise ValueError(f"model {model!r} is not in this scorer (it has {', '.join(bundle.models)})")
        self.model = model
        self.blend = read_blend(bundle.blend)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.network = NetworkFeatureExtractor(bundle.checkpoint, device=device, num_threads=num_threads,
                                               pretrained=bundle.pretrained)
        self.spec = FeatureSpec.load(bundle.feature_spec)
        self.families = {family: load_flavour(family, location) for family, location in bundle.models.items()}
        state = load_feature_state(bundle.feature_state)
        self.projections = state.projections()
        self.neighbours = state.neighbours
        self.device = device
        self.subcategories = list(state.taxonomy.subcategories) if state.taxonomy else []
        self.categories = list(state.taxonomy.categories) if state.taxonomy else []

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        from smpp_ray.features.extract import network_feature_columns
        from smpp_ray.gbdt.data import encode

        outputs = self.network({"pid": batch["pid"], "pixels": batch["pixels"], "tokens": batch["tokens"]})
        network = network_feature_columns(outputs, self.projections)
        tabular = {k: v for k, v in batch.items() if k not in ("pid", "pixels", "tokens", "uid", "postdate")}
        frame = pd.DataFrame({**tabular, **network})
        if self.neighbours is not None:
            # The same bank and function as extraction: a post scored here retrieves exactly the
            # training posts its evaluation row retrieved.
            neighbours = self.neighbours.features(outputs, batch["postdate"], batch["uid"], network["net_pred_subcategory"],
                                                  device=self.device)
            frame = pd.concat([frame, neighbours.set_axis(frame.index)], axis=1)
        X = encode(frame, self.spec)
        raw = {family: np.asarray(model.predict(X), dtype=np.float64) for family, model in self.families.items()}
        out = pd.DataFrame({
            "pid": np.asarray(batch["pid"]).astype(str),
            # the calibrated score of the chosen model, as the tune stage's pred_<model> columns
            "predicted_popularity": self.blend.score(self.model, raw),
            "predicted_subcategory": [_name(self.subcategories, i) for i in network["net_pred_subcategory"]],
            "predicted_category": [_name(self.categories, i) for i in network["net_pred_category"]],
        })
        for family in raw:
            out[f"pred_{family}"] = self.blend.score(family, raw)
        return out


class Scorer:
    """Both parts in one process: prepared posts in, score rows out (the pyfunc and Serve path),
    plus the bundle's fallback regressor (None in older bundles) for posts without a usable image."""

    def __init__(self, bundle: ScorerBundle, model: str = "blend", device: str = "cpu", num_threads: int = 0) -> None:
        from smpp_ray.scoring.fallback import FallbackScorer

        self.bundle = bundle
        self.featuriser = PostFeaturiser(bundle.feature_state, bundle.checkpoint)
        self.scorer = PostScorer(bundle, model=model, device=device, num_threads=num_threads)
        self.state = load_feature_state(bundle.feature_state)
        self.fallback = FallbackScorer(bundle) if bundle.fallback is not None else None

    def score(self, posts: pd.DataFrame) -> pd.DataFrame:
        if not len(posts):
            return empty_scores(self.bundle)
        return self.scorer(self.featuriser(posts))

    def score_records(self, records: list[Any], *, max_side: int, quality: int
                      ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
        """Raw post records (SMPD fields + image) -> (scores of the valid ones, rejects)."""
        from smpp_ray.scoring.posts import parse_posts

        posts, rejects = parse_posts(records, max_side=max_side, quality=quality, taxonomy=self.state.taxonomy,
                                     extra_columns=self.state.tabular.extra_columns)
        return self.score(posts), rejects

    def score_imageless(self, posts: pd.DataFrame) -> pd.DataFrame:
        """Score rows (the network's columns; classes and family scores null) of posts whose image
        alone is unusable, by the fallback regressor, plus ``scored_by`` (``fallback``, or
        ``prior`` for a prior-only fallback). ValueError when the bundle has none."""
        from smpp_ray.scoring.fallback import SCORED_BY_FALLBACK, SCORED_BY_PRIOR, missing_fallback

        if self.fallback is None:
            raise ValueError(missing_fallback(self.bundle.checkpoint))
        out = empty_scores(self.bundle).reindex(range(len(posts)))
        out["pid"] = posts["pid"].astype(str).to_numpy()
        out["predicted_popularity"] = self.fallback.score(posts)
        out["scored_by"] = SCORED_BY_FALLBACK if self.fallback.has_model else SCORED_BY_PRIOR
        return out


def scores_schema(bundle: ScorerBundle) -> pa.Schema:
    """The Arrow schema of score rows for a bundle's families."""
    return pa.schema([("pid", pa.string()), ("predicted_popularity", pa.float64()),
                      ("predicted_subcategory", pa.string()), ("predicted_category", pa.string()),
                      *((f"pred_{family}", pa.float64()) for family in bundle.models)])


def empty_scores(bundle: ScorerBundle) -> pd.DataFrame:
    return scores_schema(bundle).empty_table().to_pandas()


def _name(names: list[str], index: Any) -> str | None:
    i = int(index)
    return names[i] if 0 <= i < len(names) else None
