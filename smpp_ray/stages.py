"""Stage entry points: ``run_<stage>(config, ...) -> artifact folder``.

Each wraps one library function (which takes plain arguments) with what every stage shares:
Ray start-up, an MLflow run (a child of the pipeline run when there is one), ``summary.json``
in the output folder, and a fingerprint of inputs + config that lets the pipeline skip a stage
whose artifact is already complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smpp_ray.config import Config, config_to_dict, flatten_config_dict
from smpp_ray.tracking import (
    STAGE_TAG,
    TrackingContext,
    client,
    log_artifact,
    log_metrics,
    metric_name,
    resolve_tracking_uri,
    set_tags,
    tracked_run,
)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"

#: The config sections each stage depends on; a change elsewhere does not invalidate its artifact.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "synth": ("synth",),
    "prepare": ("data",),
    "prototypes": ("model", "prototypes"),
    "train": ("model", "train"),
    "extract": ("extract",),
    "tune": ("tune",),
}


@dataclass(frozen=True)
class StageRun:
    """Where a stage reports: tracking store/experiment and the parent (pipeline) run, if any."""

    tracking_uri: str
    experiment: str
    enabled: bool = True
    parent_run_id: str | None = None


def default_stage_run(config: Config, parent_run_id: str | None = None, root: str | Path = ".") -> StageRun:
    uri = resolve_tracking_uri(config.tracking.tracking_uri, root)
    return StageRun(uri, config.tracking.experiment, config.tracking.enabled, parent_run_id)


def read_summary(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write from a killed run: treat as incomplete


def stage_fingerprint(stage: str, config: Config, inputs: dict[str, str]) -> str:
    """Hash of the stage's config sections and its inputs' own fingerprints (or paths)."""
    values = config_to_dict(config)
    relevant = {section: values[section] for section in STAGE_SECTIONS[stage]}
    upstream = {}
    for name, location in inputs.items():
        summary = read_summary(location) if location and Path(location).is_dir() else None
        upstream[name] = summary["fingerprint"] if summary else str(location)
    blob = json.dumps({"stage": stage, "config": relevant, "inputs": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_complete(stage: str, config: Config, inputs: dict[str, str], out_dir: str | Path) -> bool:
    summary = read_summary(out_dir)
    return bool(summary and summary.get("status") == "complete"
                and summary.get("fingerprint") == stage_fingerprint(stage, config, inputs))


def _numeric_leaves(values: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dicts to ``a.b`` keys, keeping numbers only (for MLflow)."""
    flat: dict[str, float] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            flat.update(_numeric_leaves(value, f"{prefix}{key}."))
    elif isinstance(values, (int, float)) and not isinstance(values, bool):
        flat[prefix.rstrip(".")] = float(values)
    return flat


def _run_stage(stage: str, config: Config, out_dir: str | Path, inputs: dict[str, str],
               stage_run: StageRun, body: Callable[[TrackingContext | None], dict[str, Any]]) -> Path:
    """Run ``body`` inside the stage's MLflow run and write ``summary.json`` for it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = {s: config_to_dict(config)[s] for s in STAGE_SECTIONS[stage]}
    started = time.time()
    logger.info("stage %s: starting (out=%s)", stage, out)
    with tracked_run(stage_run.tracking_uri, stage_run.experiment, stage,
                     parent_run_id=stage_run.parent_run_id, params=flatten_config_dict(sections),
                     tags={STAGE_TAG: stage}, enabled=stage_run.enabled) as run_id:
        context = TrackingContext(stage_run.tracking_uri, stage_run.experiment, run_id) if run_id else None
        result = body(context)
        metrics = result.get("metrics", {})
        if run_id:
            # Only what the stage did not log itself: a final value at step 0 would sit in front
            # of its per-epoch series and bend every training curve.
            logged = set(client(stage_run.tracking_uri).get_run(run_id).data.metrics)
            final = {k: v for k, v in _numeric_leaves(metrics).items() if metric_name(k) not in logged}
            log_metrics(stage_run.tracking_uri, run_id, final)
            set_tags(stage_run.tracking_uri, run_id, {f"input.{k}": v for k, v in inputs.items()})
        summary = {
            "stage": stage,
            "status": "complete",
            "inputs": inputs,
            "config": sections,
            "metrics": metrics,
            "artifacts": result.get("artifacts", {}),
            "mlflow_run_id": run_id,
            "fingerprint": stage_fingerprint(stage, config, inputs),
            "seconds": round(time.time() - started, 2),
        }
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        if run_id:
            log_artifact(stage_run.tracking_uri, run_id, out / SUMMARY_FILE)
    logger.info("stage %s: done in %.1f s", stage, time.time() - started)
    return out


def local_absolute(location: str | Path) -> str:
    """Local paths made absolute (Ray workers and Tune trials run in other working folders);
    URIs (``s3://``, ``gs://``) pass through."""
    text = str(location)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def _ensure_ray(config: Config) -> None:
    from smpp_ray.runtime import init_ray

    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)


def run_synth(config: Config, out_dir: str | Path, stage_run: StageRun | None = None) -> Path:
    """Write a synthetic SMPD corpus (no Ray needed)."""
    out_dir = local_absolute(out_dir)
    from smpp_ray.data.synth import synthesize_corpus

    stage_run = stage_run or default_stage_run(config)
    s = config.synth

    def body(_: TrackingContext | None) -> dict[str, Any]:
        summary = synthesize_corpus(str(out_dir), posts=s.posts, seed=s.seed, image_size=s.image_size,
                                    users=s.users, test_posts=s.test_posts)
        return {"metrics": summary, "artifacts": {"raw": str(out_dir)}}

    return _run_stage("synth", config, out_dir, {}, stage_run, body)


def run_prepare(config: Config, raw_dir: str | Path, out_dir: str | Path,
                stage_run: StageRun | None = None) -> Path:
    """Validate a raw SMPD folder and write Parquet shards, rejects and the manifest."""
    raw_dir, out_dir = local_absolute(raw_dir), local_absolute(out_dir)
    from smpp_ray.data.prepare import prepare_dataset

    stage_run = stage_run or default_stage_run(config)
    d = config.data
    _ensure_ray(config)

    def body(_: TrackingContext | None) -> dict[str, Any]:
        manifest = prepare_dataset(str(raw_dir), str(out_dir), split=d.split, val_fraction=d.val_fraction,
                                   test_fraction=d.test_fraction, max_image_side=d.max_image_side,
                                   jpeg_quality=d.jpeg_quality, rows_per_shard=d.rows_per_shard)
        return {"metrics": manifest.get("counts", {}),
                "artifacts": {"manifest": str(Path(out_dir) / "manifest.json"),
                              "posts": str(Path(out_dir) / "posts"), "rejects": str(Path(out_dir) / "rejects")}}

    return _run_stage("prepare", config, out_dir, {"raw": str(raw_dir)}, stage_run, body)


def run_prototypes(config: Config, data_dir: str | Path, out_dir: str | Path,
                   stage_run: StageRun | None = None) -> Path:
    """Select diverse class members and write the visual/textual prototype bank."""
    data_dir, out_dir = local_absolute(data_dir), local_absolute(out_dir)
    from smpp_ray.model.prototypes import build_prototypes

    stage_run = stage_run or default_stage_run(config)
    p, m = config.prototypes, config.model
    _ensure_ray(config)

    def body(_: TrackingContext | None) -> dict[str, Any]:
        result = build_prototypes(str(data_dir), str(out_dir), backbone=m.backbone, pretrained=m.pretrained,
                                  shots=p.shots, time_buckets=p.time_buckets, batch_size=p.batch_size,
                                  num_actors=p.num_actors, num_gpus_per_actor=p.num_gpus_per_actor, seed=p.seed)
        return {"metrics": result,
                "artifacts": {"prototypes": str(Path(out_dir) / "prototypes.safetensors"),
                              "members": str(Path(out_dir) / "members.json")}}

    return _run_stage("prototypes", config, out_dir, {"data": str(data_dir)}, stage_run, body)


def run_train(config: Config, data_dir: str | Path, prototypes_dir: str | Path, out_dir: str | Path,
              stage_run: StageRun | None = None) -> Path:
    """Prompt-tune the network on Ray Train; the best checkpoint path goes into summary.json."""
    data_dir, prototypes_dir, out_dir = local_absolute(data_dir), local_absolute(prototypes_dir), local_absolute(out_dir)
    from smpp_ray.train import train_model

    stage_run = stage_run or default_stage_run(config)
    _ensure_ray(config)

    def body(tracking: TrackingContext | None) -> dict[str, Any]:
        result = train_model(str(data_dir), str(prototypes_dir), str(out_dir), model_config=config.model,
                             train_config=config.train, tracking=tracking)
        best = result.get("best_checkpoint")
        metrics = {k: v for k, v in result.items() if k != "best_checkpoint"}
        return {"metrics": metrics, "artifacts": {"best_checkpoint": best}}

    return _run_stage("train", config, out_dir, {"data": str(data_dir), "prototypes": str(prototypes_dir)},
                      stage_run, body)


def best_checkpoint(train_dir: str | Path) -> str:
    """The best checkpoint recorded by a finished train stage."""
    summary = read_summary(train_dir)
    if not summary or not summary.get("artifacts", {}).get("best_checkpoint"):
        raise ValueError(f"{str(train_dir)!r} holds no finished train stage (summary.json with best_checkpoint); "
                         "run `smpp train` first or pass the checkpoint folder itself")
    return summary["artifacts"]["best_checkpoint"]


def resolve_checkpoint(path: str | Path | None) -> str | None:
    """A train stage folder or a checkpoint folder (with trainable.pt) → checkpoint folder."""
    if path is None or str(path) == "":
        return None
    path = Path(local_absolute(path))
    if (path / "trainable.pt").is_file():
        return str(path)
    if (path / SUMMARY_FILE).is_file():
        return best_checkpoint(path)
    raise ValueError(f"checkpoint {str(path)!r} is neither a checkpoint folder (trainable.pt) "
                     "nor a train stage folder (summary.json)")


def run_extract(config: Config, data_dir: str | Path, checkpoint: str | Path | None, out_dir: str | Path,
                stage_run: StageRun | None = None) -> Path:
    """Network + tabular features for every post, partitioned by split."""
    data_dir, out_dir = local_absolute(data_dir), local_absolute(out_dir)
    from smpp_ray.features import extract_features

    stage_run = stage_run or default_stage_run(config)
    _ensure_ray(config)
    checkpoint_dir = resolve_checkpoint(checkpoint)

    def body(_: TrackingContext | None) -> dict[str, Any]:
        result = extract_features(str(data_dir), checkpoint_dir, str(out_dir), extract_config=config.extract)
        return {"metrics": result, "artifacts": {"features": str(out_dir),
                                                 "feature_manifest": str(Path(out_dir) / "feature_manifest.json")}}

    inputs = {"data": str(data_dir), "checkpoint": str(checkpoint or "")}
    return _run_stage("extract", config, out_dir, inputs, stage_run, body)


def run_tune(config: Config, features_dir: str | Path, out_dir: str | Path,
             stage_run: StageRun | None = None) -> Path:
    """Search LightGBM and CatBoost on Ray Tune, refit, blend, evaluate."""
    features_dir, out_dir = local_absolute(features_dir), local_absolute(out_dir)
    from smpp_ray.gbdt import tune_models

    stage_run = stage_run or default_stage_run(config)
    _ensure_ray(config)

    def body(tracking: TrackingContext | None) -> dict[str, Any]:
        result = tune_models(str(features_dir), str(out_dir), tune_config=config.tune, tracking=tracking)
        metrics = {**result["metrics"], "blend_weights": result["blend_weights"]}
        return {"metrics": metrics, "artifacts": result["paths"]}

    return _run_stage("tune", config, out_dir, {"features": str(features_dir)}, stage_run, body)
