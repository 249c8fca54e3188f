"""The scorer bundle: every part that scoring a new post needs, found in one place.

A bundle is either read in place from a finished pipeline (its best checkpoint, the extract
stage's feature state, the tune stage's models, feature spec and blend weights) or is a folder of
its own (what is logged to MLflow and registered as the ``smpp-scorer`` model)::

    bundle.json        format, version, families, blend weights, backbone, what each part is
    checkpoint/        the trained checkpoint folder (trainable state, prototypes, meta.json)
    backbone/<file>    the pretrained backbone weights, when the checkpoint names a weights file
    feature_state/     see :mod:`smpp_ray.features.state`
    feature_spec.json  the GBDT input columns and categories
    blend.json         blend weights chosen on val
    models/<family>/   MLflow lightgbm / catboost model folders
    fallback/          optional (bundles of tune stages that fitted one): the fallback regressor
      fallback.json      family, groups, label prior (:mod:`smpp_ray.gbdt.fallback`)
      feature_spec.json  its input columns (no network feature)
      model/             its MLflow model folder (absent for a prior-only fallback)

This module is the one owner of that layout; :class:`smpp_ray.scoring.scorer.Scorer` loads it and
:class:`smpp_ray.scoring.fallback.FallbackScorer` its fallback part. A bundle without ``fallback/``
(written before it existed) loads with ``fallback`` None.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from smpp_ray import console, digests, storage
from smpp_ray.gbdt.fallback import FALLBACK_FILE
from smpp_ray.gbdt.output import BLEND_FILE, FEATURE_SPEC_FILE, MODELS_DIR

logger = logging.getLogger(__name__)

FORMAT = "smpp-scorer-bundle"
VERSION = 1
BUNDLE_FILE = "bundle.json"
FAMILIES = ("lightgbm", "catboost")
#: What ``--model`` may choose: the blend of the families or one of them.
MODEL_CHOICES = ("blend", *FAMILIES)


@dataclass(frozen=True)
class FallbackPart:
    """Locations of the fallback regressor's files: it scores posts whose image is unusable."""

    facts: str
    """``fallback.json``: family, groups, the label prior."""
    model: str | None = None
    """MLflow model folder; None for a prior-only fallback."""
    feature_spec: str | None = None

    @classmethod
    def from_tune(cls, tune_dir: str) -> FallbackPart | None:
        """The fallback of a tune folder, in place; None when its tune stage fitted none."""
        from smpp_ray.gbdt.fallback import FallbackFacts, FallbackLocations

        where = FallbackLocations.of(tune_dir)
        if not storage.is_file(where.facts):
            return None
        if not FallbackFacts.load(where.facts).has_model:
            return cls(where.facts)
        return cls(where.facts, where.model, where.feature_spec)

    def describe(self) -> dict[str, object]:
        """What bundle.json records of it."""
        from smpp_ray.gbdt.fallback import FallbackFacts

        facts = FallbackFacts.load(self.facts)
        return {"folder": _FALLBACK_DIR, "family": facts.family, "groups": list(facts.groups), "prior": facts.prior,
                "model": self.model is not None}


_FALLBACK_DIR = "fallback"


def is_bundle(location: str) -> bool:
    """Whether ``location`` is a scorer bundle folder (written by :meth:`ScorerBundle.write`)."""
    return storage.is_file(storage.join(location, BUNDLE_FILE))


@dataclass(frozen=True)
class ScorerBundle:
    """Locations of the parts of a scorer (each any location: local path or URI)."""

    checkpoint: str
    feature_state: str
    feature_spec: str
    blend: str
    models: dict[str, str]
    """family -> MLflow model folder."""
    pretrained: str | None = None
    """The backbone weights file to load in place of the one the checkpoint names (bundled copy)."""
    fallback: FallbackPart | None = None
    """The fallback regressor and label prior; None in bundles written before they existed."""

    @classmethod
    def from_stages(cls, train: str, features: str, tune: str) -> ScorerBundle:
        """The parts of finished train, extract and tune stages (their folders), in place (nothing
        is copied)."""
        from smpp_ray.features.manifest import FeatureSet
        from smpp_ray.gbdt.output import TuneOutput
        from smpp_ray.model.checkpoint import best_checkpoint
        from smpp_ray.summary import require_summary

        require_summary(features, "extract")
        require_summary(tune, "tune")
        digests.verify_manifest(tune)
        where = TuneOutput.at(tune)
        families = list(storage.read_json(where.blend)["weights"])
        bundle = cls(best_checkpoint(train), FeatureSet(features).state,
                     where.feature_spec, where.blend, {family: where.model(family) for family in families},
                     fallback=FallbackPart.from_tune(tune))
        bundle.verify_parts()
        return bundle

    @classmethod
    def from_folder(cls, folder: str) -> ScorerBundle:
        """A bundle folder written by :meth:`write` (local or any location)."""
        folder = storage.normalize(folder)
        location = storage.join(folder, BUNDLE_FILE)
        if not storage.is_file(location):
            raise ValueError(f"{folder!r} is not a scorer bundle: {BUNDLE_FILE} missing (give a pipeline folder "
                             "with --pipeline, or a registered model models:/<name>@<alias>)")
        digests.verify_manifest(folder)
        facts = storage.read_json(location)
        if facts.get("format") != FORMAT or facts.get("version") != VERSION:
            raise ValueError(f"scorer bundle {folder!r} has format {facts.get('format')!r} version "
                             f"{facts.get('version')!r}; this version reads {FORMAT!r} version {VERSION}")
        fallback = None
        if facts.get("fallback"):
            part = storage.join(folder, facts["fallback"]["folder"])
            has_model = bool(facts["fallback"].get("model"))
            fallback = FallbackPart(storage.join(part, FALLBACK_FILE),
                                    storage.join(part, "model") if has_model else None,
                                    storage.join(part, FEATURE_SPEC_FILE) if has_model else None)
        return cls(storage.join(folder, "checkpoint"), storage.join(folder, "feature_state"),
                   storage.join(folder, FEATURE_SPEC_FILE), storage.join(folder, BLEND_FILE),
                   {family: storage.join(folder, MODELS_DIR, family) for family in facts["families"]},
                   storage.join(folder, facts["pretrained"]) if facts.get("pretrained") else None, fallback)

    def verify_parts(self) -> None:
        """Check every part against the digests written with it, on this process, before any
        work is sent to Ray (a damaged part is a ValueError naming the file: exit 2, not a
        failed actor). A bundle folder is checked whole by :meth:`from_folder`."""
        from smpp_ray.gbdt.registry import model_folder
        from smpp_ray.model.checkpoint import TRAINABLE_FILE, read_meta, verified_file

        verified_file(self.checkpoint, TRAINABLE_FILE, read_meta(self.checkpoint))
        models = [*self.models.values(), *([self.fallback.model] if self.fallback and self.fallback.model else [])]
        for location in models:   # the feature state is checked by FeatureState.load, its one reader
            digests.verify_manifest(model_folder(location), shown=location)

    def families(self) -> list[str]:
        return list(self.models)

    def write(self, folder: str) -> str:
        """Copy every part into one bundle folder (a local path or any location); returns it."""
        from smpp_ray.model.checkpoint import model_config_from_meta, read_meta

        folder = storage.normalize(folder)
        storage.reset_dir(folder)
        _copy_tree(self.checkpoint, storage.join(folder, "checkpoint"))
        _copy_tree(self.feature_state, storage.join(folder, "feature_state"))
        for family, location in self.models.items():
            _copy_tree(location, storage.join(folder, MODELS_DIR, family))
        storage.copy_file(self.feature_spec, storage.join(folder, FEATURE_SPEC_FILE))
        storage.copy_file(self.blend, storage.join(folder, BLEND_FILE))
        if self.fallback is not None:
            part = storage.join(folder, _FALLBACK_DIR)
            storage.copy_file(self.fallback.facts, storage.join(part, FALLBACK_FILE))
            if self.fallback.model is not None and self.fallback.feature_spec is not None:
                _copy_tree(self.fallback.model, storage.join(part, "model"))
                storage.copy_file(self.fallback.feature_spec, storage.join(part, FEATURE_SPEC_FILE))
        config = model_config_from_meta(read_meta(self.checkpoint), where=self.checkpoint)
        weights = self.pretrained or _weights_file(config.pretrained)
        bundled = None
        if weights:
            bundled = f"backbone/{storage.name(weights)}"
            storage.copy_file(weights, storage.join(folder, bundled))
        storage.write_json(storage.join(folder, BUNDLE_FILE), {
            "format": FORMAT, "version": VERSION, "families": self.families(),
            "weights": storage.read_json(self.blend)["weights"], "backbone": config.backbone,
            "pretrained": bundled, "source_checkpoint": self.checkpoint,
            "fallback": self.fallback.describe() if self.fallback is not None else None,
        })
        digests.write_manifest(folder)   # last: it covers every file above
        console.details(__name__).info("wrote scorer bundle %s (%s%s)", folder, ", ".join(self.families()),
                                       ", fallback" if self.fallback is not None else "")
        return folder


def _weights_file(pretrained: str) -> str | None:
    """The backbone weights file to bundle: ``pretrained`` when it is a file (an open_clip tag is
    fetched by open_clip itself, an empty value means a randomly initialised tiny backbone)."""
    if not pretrained:
        return None
    try:
        return storage.normalize(pretrained) if storage.is_file(pretrained) else None
    except (storage.StorageError, OSError):
        return None


def _copy_tree(source: str, target: str) -> None:
    """Every file under ``source`` to the same relative place under ``target``."""
    source = storage.normalize(source)
    for location in storage.list_files(source, recursive=True):
        relative = location[len(source):].lstrip("/" + os.sep)
        storage.copy_file(location, storage.join(target, relative))
