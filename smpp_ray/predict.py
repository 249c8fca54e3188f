"""``smpp predict``: score new posts with a finished pipeline, through the same path as evaluation.

New posts (SMPD layout, labels optional) are prepared with the pipeline's own data settings, then
joined as the test split to the pipeline's train and val shards, so every fitted piece of the
features (PCA on train, tag vocabulary of train, user history from training-time posts) is the
one the models were trained with. Features are extracted with the pipeline's checkpoint and
scored by its LightGBM/CatBoost models and blend weights. Posts that fail validation are written
to ``<out>.rejects.csv`` with the reason; the others are scored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from smpp_ray.config import Config, config_from_dict, config_to_dict

logger = logging.getLogger(__name__)


def _stage_summary(folder: Path) -> dict[str, Any]:
    path = folder / "summary.json"
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} has no finished stage (summary.json); is --pipeline a finished pipeline?")
    return json.loads(path.read_text())


def _pipeline_config(config: Config, layout: dict[str, Path]) -> Config:
    """The config the pipeline's data and extract stages ran with (not today's defaults)."""
    values = config_to_dict(config)
    for stage in ("data", "features"):
        values.update(_stage_summary(layout[stage])["config"])
    return config_from_dict(values)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # free on the same filesystem; shards are never modified in place
    except OSError:
        shutil.copy2(source, target)


def _combined_dataset(pipeline_data: Path, new_data: Path, out: Path) -> Path:
    """Pipeline train/val shards + every new post as the test split, with the pipeline's manifest."""
    if out.exists():
        shutil.rmtree(out)
    for split in ("train", "val"):
        for shard in sorted((pipeline_data / "posts" / f"split={split}").glob("*.parquet")):
            _link_or_copy(shard, out / "posts" / f"split={split}" / shard.name)
    manifest = json.loads((pipeline_data / "manifest.json").read_text())
    test_dir = out / "posts" / "split=test"
    test_dir.mkdir(parents=True, exist_ok=True)
    for number, shard in enumerate(sorted((new_data / "posts").glob("split=*/*.parquet"))):
        table = _with_pipeline_ids(pq.read_table(shard), manifest)
        pq.write_table(table, test_dir / f"new-{number:05d}-{shard.name}")
    shutil.copy2(pipeline_data / "manifest.json", out / "manifest.json")
    return out


def _with_pipeline_ids(table: pa.Table, manifest: dict[str, Any]) -> pa.Table:
    """Class and concept ids re-derived from names with the pipeline's manifest.

    New posts were prepared on their own, and ids (concepts above all) index *that* dataset's
    vocabulary; the models learned the pipeline's. A name the pipeline never saw gets -1.
    """
    taxonomy = manifest["taxonomy"]
    vocabularies = {
        "category": {c["name"]: c["id"] for c in taxonomy["categories"]},
        "subcategory": {c["name"]: c["id"] for c in taxonomy["subcategories"]},
        "concept": {name: i for i, name in enumerate(manifest.get("concepts", []))},
    }
    for name, ids in vocabularies.items():
        codes = [ids.get(value, -1) for value in table.column(name).to_pylist()]
        position = table.schema.get_field_index(f"{name}_id")
        table = table.set_column(position, table.schema.field(position), pa.array(codes, pa.int32()))
    return table


def score_features(tune_dir: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Per-family and blended predictions for feature rows, with the tune stage's models."""
    from smpp_ray.gbdt.blend import apply_weights
    from smpp_ray.gbdt.data import FeatureSpec, encode
    from smpp_ray.gbdt.registry import load_flavour

    spec = FeatureSpec.from_dict(json.loads((tune_dir / "feature_spec.json").read_text()))
    weights = json.loads((tune_dir / "blend.json").read_text())["weights"]
    X = encode(frame, spec)
    predictions = {}
    for family in weights:
        model = load_flavour(family, str(tune_dir / "models" / family))
        predictions[family] = np.asarray(model.predict(X), dtype=np.float64)
    scores = pd.DataFrame({"pid": frame["pid"].astype(str).to_numpy()})
    for family, values in predictions.items():
        scores[f"pred_{family}"] = values
    scores["predicted_popularity"] = apply_weights(predictions, weights)
    return scores


def predict_posts(pipeline_dir: str | Path, posts_dir: str | Path, out_file: str | Path, *,
                  config: Config) -> Path:
    """Write ``out_file`` (.csv or .parquet): Pid, predicted popularity, predicted subcategory."""
    from smpp_ray.data.prepare import prepare_dataset
    from smpp_ray.features import extract_features
    from smpp_ray.pipeline import pipeline_layout
    from smpp_ray.runtime import init_ray
    from smpp_ray.stages import best_checkpoint, local_absolute

    pipeline_dir, posts_dir, out_file = local_absolute(pipeline_dir), local_absolute(posts_dir), Path(local_absolute(out_file))
    if out_file.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--out {str(out_file)!r} must end in .csv or .parquet")
    layout = pipeline_layout(pipeline_dir)
    _stage_summary(layout["tune"])
    checkpoint = best_checkpoint(layout["train"])
    used = _pipeline_config(config, layout)
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)

    work = out_file.parent / f".{out_file.name}.work"
    d = used.data
    logger.info("predict: preparing new posts from %s", posts_dir)
    manifest = prepare_dataset(str(posts_dir), str(work / "new_data"), split=d.split, val_fraction=d.val_fraction,
                               test_fraction=d.test_fraction, max_image_side=d.max_image_side,
                               jpeg_quality=d.jpeg_quality, rows_per_shard=d.rows_per_shard)
    combined = _combined_dataset(layout["data"], work / "new_data", work / "combined")
    logger.info("predict: extracting features with %s", checkpoint)
    extract_features(str(combined), checkpoint, str(work / "features"), extract_config=used.extract)
    frame = pd.read_parquet(work / "features" / "split=test")
    scores = score_features(layout["tune"], frame)
    scores["predicted_subcategory"] = _predicted_subcategory(frame, layout["data"])
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix == ".csv":
        scores.to_csv(out_file, index=False)
    else:
        scores.to_parquet(out_file, index=False)
    rejects = pd.read_parquet(work / "new_data" / "rejects") if (work / "new_data" / "rejects").exists() else None
    if rejects is not None and len(rejects):
        rejects.to_csv(out_file.with_suffix(".rejects.csv"), index=False)
        logger.warning("predict: %d posts rejected, reasons in %s", len(rejects), out_file.with_suffix(".rejects.csv"))
    logger.info("predict: scored %d of %d posts into %s", len(scores), manifest["counts"]["input_rows"], out_file)
    shutil.rmtree(work, ignore_errors=True)
    return out_file


def _predicted_subcategory(frame: pd.DataFrame, data_dir: Path) -> list[str | None]:
    from smpp_ray.data.manifest import load_taxonomy

    names = load_taxonomy(str(data_dir)).subcategories
    return [names[int(i)] if 0 <= int(i) < len(names) else None for i in frame["net_pred_subcategory"].to_numpy()]
