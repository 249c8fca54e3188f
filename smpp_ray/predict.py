"""``smpp predict``: score new posts with a finished pipeline, through the same path as evaluation.

New posts (SMPD layout, labels optional) are prepared with the pipeline's own data settings, then
joined as the test split to the pipeline's train and val shards, so every fitted piece of the
features (PCA on train, tag vocabulary of train, user history from training-time posts) is the
one the models were trained with. Features are extracted with the pipeline's checkpoint and
scored by its LightGBM/CatBoost models and blend weights. Posts that fail validation are written
to ``<out>.rejects.csv`` with the reason; the others are scored.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.config import Config, config_from_dict, config_to_dict
from smpp_ray.data.manifest import load_manifest, manifest_location
from smpp_ray.data.schema import REJECTS_SCHEMA, posts_path, rejects_path
from smpp_ray.layout import pipeline_layout
from smpp_ray.summary import require_summary

logger = logging.getLogger(__name__)


def _pipeline_config(config: Config, layout: dict[str, str]) -> Config:
    """The config the pipeline's data and extract stages ran with (not today's defaults)."""
    values = config_to_dict(config)
    for folder, stage in (("data", "prepare"), ("features", "extract")):
        values.update(require_summary(layout[folder], stage)["config"])
    return config_from_dict(values)


def _copy_shard(source: str, target: str) -> None:
    if not storage.is_uri(source) and not storage.is_uri(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(source, target)  # free on one filesystem; shards are never modified in place
            return
        except OSError:
            pass
    storage.copy_file(source, target)


def _combined_dataset(pipeline_data: str, new_data: str, out: str) -> tuple[str, pd.DataFrame]:
    """Pipeline train/val shards + every new post as the test split, with the pipeline's manifest.

    A "new" post whose Pid is already a train/val post of the pipeline cannot be told apart from
    it in the joined features; it is returned as a reject (with the reason), not scored.
    """
    storage.remove(out)
    known: set[str] = set()
    for split in ("train", "val"):
        for shard in storage.list_parquet_files(posts_path(pipeline_data, split)):
            _copy_shard(shard, storage.join(out, "posts", f"split={split}", storage.name(shard)))
            fs, path = storage.resolve(shard)
            known.update(pq.read_table(path, columns=["pid"], filesystem=fs).column("pid").to_pylist())
    manifest = load_manifest(pipeline_data)
    test_dir = storage.make_dir(storage.join(out, "posts", "split=test"))
    new_shards = [f for f in storage.list_parquet_files(storage.join(new_data, "posts"))
                  if "/split=" in f]
    collisions: list[dict[str, Any]] = []
    for number, shard in enumerate(new_shards):
        fs, path = storage.resolve(shard)
        table = pq.read_table(path, filesystem=fs)
        pids = table.column("pid").to_pylist()
        seen = [pid in known for pid in pids]
        for pid, uid, clash in zip(pids, table.column("uid").to_pylist(), seen, strict=True):
            if clash:
                collisions.append({"source_file": storage.name(shard), "row_index": -1, "pid": pid, "uid": uid,
                                   "field": "Pid", "reason": "already a train/val post of the pipeline; a new "
                                                             "post needs a Pid the training data does not use"})
        table = table.filter(pa.array([not clash for clash in seen], type=pa.bool_()))  # empty shards too
        table = _with_pipeline_ids(table, manifest)
        out_fs, out_path = storage.resolve(storage.join(test_dir, f"new-{number:05d}-{storage.name(shard)}"))
        pq.write_table(table, out_path, filesystem=out_fs)
    storage.copy_file(manifest_location(pipeline_data), manifest_location(out))
    return out, pd.DataFrame(collisions, columns=[f.name for f in REJECTS_SCHEMA])


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


def score_features(tune_dir: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Per-family and blended predictions for feature rows, with the tune stage's models."""
    from smpp_ray.gbdt.blend import apply_weights
    from smpp_ray.gbdt.data import FEATURE_SPEC_FILE, FeatureSpec, encode
    from smpp_ray.gbdt.registry import load_flavour

    spec = FeatureSpec.load(storage.join(tune_dir, FEATURE_SPEC_FILE))
    weights = storage.read_json(storage.join(tune_dir, "blend.json"))["weights"]
    X = encode(frame, spec)
    predictions = {}
    for family in weights:
        model = load_flavour(family, storage.join(tune_dir, "models", family))
        predictions[family] = np.asarray(model.predict(X), dtype=np.float64)
    scores = pd.DataFrame({"pid": frame["pid"].astype(str).to_numpy()})
    for family, values in predictions.items():
        scores[f"pred_{family}"] = values
    scores["predicted_popularity"] = apply_weights(predictions, weights)
    return scores


def _write_table(frame: pd.DataFrame, location: str) -> None:
    if location.endswith(".csv"):
        storage.write_text(location, frame.to_csv(index=False))
    else:
        fs, path = storage.resolve(location)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, filesystem=fs)


def _read_folder(location: str) -> pd.DataFrame:
    fs, path = storage.resolve(location)
    return pq.read_table(path, filesystem=fs).to_pandas()


def predict_posts(pipeline_dir: str, posts_dir: str, out_file: str, *, config: Config) -> str:
    """Write ``out_file`` (.csv or .parquet, any location): Pid, predicted popularity, subcategory."""
    from smpp_ray.data.prepare import prepare_dataset
    from smpp_ray.features import extract_features
    from smpp_ray.runtime import init_ray
    from smpp_ray.train.checkpoint import best_checkpoint

    pipeline_dir, posts_dir, out_file = (storage.normalize(pipeline_dir), storage.normalize(posts_dir),
                                         storage.normalize(out_file))
    if not out_file.endswith((".csv", ".parquet")):
        raise ValueError(f"--out {out_file!r} must end in .csv or .parquet")
    layout = pipeline_layout(pipeline_dir)
    require_summary(layout["tune"], "tune")
    checkpoint = best_checkpoint(layout["train"])
    used = _pipeline_config(config, layout)
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)

    work = storage.join(storage.parent(out_file), f".{storage.name(out_file)}.work")
    d = used.data
    logger.info("predict: preparing new posts from %s", posts_dir)
    manifest = prepare_dataset(posts_dir, storage.join(work, "new_data"), split=d.split, val_fraction=d.val_fraction,
                               test_fraction=d.test_fraction, max_image_side=d.max_image_side,
                               jpeg_quality=d.jpeg_quality, rows_per_shard=d.rows_per_shard)
    combined, collisions = _combined_dataset(layout["data"], storage.join(work, "new_data"),
                                             storage.join(work, "combined"))
    logger.info("predict: extracting features with %s", checkpoint)
    extract_features(combined, checkpoint, storage.join(work, "features"), extract_config=used.extract)
    frame = _read_folder(storage.join(work, "features", "split=test"))
    scores = score_features(layout["tune"], frame)
    scores["predicted_subcategory"] = _predicted_subcategory(frame, layout["data"])
    _write_table(scores, out_file)
    rejects_dir = rejects_path(storage.join(work, "new_data"))
    rejects = _read_folder(rejects_dir) if storage.list_parquet_files(rejects_dir) else collisions.iloc[:0]
    rejects = pd.concat([rejects, collisions], ignore_index=True) if len(collisions) else rejects
    rejects_file = out_file.rsplit(".", 1)[0] + ".rejects.csv"
    if len(rejects):
        storage.write_text(rejects_file, rejects.to_csv(index=False))
        logger.warning("predict: %d posts rejected, reasons in %s", len(rejects), rejects_file)
    logger.info("predict: scored %d of %d posts into %s", len(scores), manifest["counts"]["input_rows"], out_file)
    storage.remove(work)
    return out_file


def _predicted_subcategory(frame: pd.DataFrame, data_dir: str) -> list[str | None]:
    from smpp_ray.data.manifest import load_taxonomy

    names = load_taxonomy(data_dir).subcategories
    return [names[int(i)] if 0 <= int(i) < len(names) else None for i in frame["net_pred_subcategory"].to_numpy()]
