"""``smpp predict``: score new posts as a Ray Data job, at a cost that follows the posts scored.

The scorer is a finished pipeline folder, a scorer bundle folder, or a registered model
(``models:/smpp-scorer@champion``, ``runs:/<id>/scorer``). New posts are a raw SMPD folder
(validated by prepare itself, rejects kept) or an already prepared dataset, at any location. Then::

    read_parquet(posts) -> PostFeaturiser (CPU tasks: feature state, decode, tokenise)
                        -> PostScorer (actor pool: network on its device, projections, GBDTs)
                        -> scores (.csv / .parquet file, or a folder of Parquet parts)

Only the saved feature state and the checkpoint are read, never the training posts, so scoring
20 posts costs 20 posts of work. Rows in = rows scored + rows rejected, checked before returning;
rejects (file, row, field, reason) go beside the scores as ``<out>.rejects.csv``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.config import Config
from smpp_ray.scoring.bundle import MODEL_CHOICES, ScorerBundle

logger = logging.getLogger(__name__)

#: Sources only MLflow resolves.
MLFLOW_SOURCES = ("models:/", "runs:/", "mlflow-artifacts:/")
_OUTPUT_SUFFIXES = (".csv", ".parquet")


def resolve_bundle(source: str, *, stage_dir: str | None, tracking_uri: str = "") -> ScorerBundle:
    """The scorer at ``source``: a pipeline folder, a bundle folder, or an MLflow model URI.

    A registered model is downloaded from MLflow and staged under ``stage_dir`` (the run's own
    storage), so Ray workers on every node read it from there rather than from the driver's disk;
    with ``stage_dir`` None it stays in a local folder of this process (a Serve replica's own copy).
    """
    if source.startswith(MLFLOW_SOURCES):
        from smpp_ray.scoring.pyfunc import download_bundle

        if stage_dir is None:
            local = download_bundle(source, tempfile.mkdtemp(prefix="smpp-scorer-"), tracking_uri=tracking_uri)
            return ScorerBundle.from_folder(local)
        with tempfile.TemporaryDirectory(prefix="smpp-scorer-") as scratch:
            local = download_bundle(source, scratch, tracking_uri=tracking_uri)
            staged = storage.join(stage_dir, "scorer")
            storage.remove(staged)
            storage.upload_dir(local, staged)
        return ScorerBundle.from_folder(staged)
    location = storage.normalize(source)
    if storage.is_file(storage.join(location, "bundle.json")):
        return ScorerBundle.from_folder(location)
    return ScorerBundle.from_pipeline(location)


def _prepared_posts(posts: str, work: str, state, config: Config) -> tuple[str, dict]:
    """A prepared dataset of the new posts: ``posts`` itself when it is one, else prepare's output
    (validated with the pipeline's taxonomy and image settings, not today's config)."""
    from smpp_ray.data.manifest import load_manifest, manifest_location
    from smpp_ray.data.prepare import prepare_dataset
    from smpp_ray.data.schema import Taxonomy

    if storage.is_file(manifest_location(posts)):
        return posts, load_manifest(posts)
    logger.info("predict: validating new posts from %s", posts)
    out = storage.join(work, "new_data")
    d = config.data
    manifest = prepare_dataset(posts, out, max_image_side=int(state.image.get("max_side", d.max_image_side)),
                               jpeg_quality=int(state.image.get("jpeg_quality", d.jpeg_quality)),
                               rows_per_shard=d.rows_per_shard, max_reject_fraction=d.max_reject_fraction,
                               max_image_bytes=int(state.image.get("max_bytes", d.max_image_bytes)),
                               taxonomy=Taxonomy.from_dict(state.taxonomy) if state.taxonomy else None)
    return out, manifest


def scores_dataset(data_dir: str, bundle: ScorerBundle, *, model: str, config: Config):
    """The lazy Ray Dataset of score rows for every post of a prepared dataset."""
    from smpp_ray.data.reads import read_parquet
    from smpp_ray.data.schema import POSTS_SCHEMA
    from smpp_ray.features.extract import decode_stage_memory, in_decode_blocks, inference_pool
    from smpp_ray.scoring.scorer import PostScorer, checkpoint_input_spec

    cfg = config.extract
    image_size = checkpoint_input_spec(bundle.checkpoint).image_size
    location = storage.join(data_dir, "posts")
    posts = in_decode_blocks(read_parquet(location, columns=POSTS_SCHEMA.names), location, cfg, image_size)
    # Arrow batches, converted here as extraction converts its metadata: the same pandas values.
    featurised = posts.map_batches(
        featurise_batch, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=1,
        memory=decode_stage_memory(cfg.batch_size, image_size),
        fn_kwargs={"state_location": bundle.feature_state, "checkpoint": bundle.checkpoint})
    options, actor = inference_pool(cfg)
    return featurised.map_batches(PostScorer, fn_constructor_kwargs={"bundle": bundle, "model": model, **actor},
                                  **options)


_FEATURISERS: dict[tuple[str, str], Any] = {}


def featurise_batch(batch: pa.Table, *, state_location: str, checkpoint: str) -> dict:
    """CPU stage: one :class:`PostFeaturiser` per worker process (Ray reuses task workers)."""
    from smpp_ray.scoring.scorer import PostFeaturiser

    key = (state_location, checkpoint)
    if key not in _FEATURISERS:
        _FEATURISERS.clear()
        _FEATURISERS[key] = PostFeaturiser(state_location, checkpoint)
    return _FEATURISERS[key](batch.to_pandas())


def _write_scores(dataset, out: str, schema: pa.Schema) -> int:
    """Stream the score rows into ``out`` (.csv/.parquet file, else a folder of Parquet parts)."""
    if not out.endswith(_OUTPUT_SUFFIXES):
        storage.reset_dir(out)
        dataset.write_parquet(out)
        return sum(pq.ParquetFile(path, filesystem=fs).metadata.num_rows
                   for fs, path in map(storage.resolve, storage.list_parquet_files(out)))
    rows = 0
    with tempfile.TemporaryDirectory(prefix="smpp-predict-") as scratch:
        local = os.path.join(scratch, storage.name(out))
        writer = None
        for batch in dataset.iter_batches(batch_format="pandas", batch_size=4096):
            rows += len(batch)
            if out.endswith(".csv"):
                batch.to_csv(local, mode="a", header=writer is None, index=False)
                writer = True
            else:
                table = pa.Table.from_pandas(batch, schema=schema, preserve_index=False)
                writer = writer or pq.ParquetWriter(local, table.schema)
                writer.write_table(table)
        if isinstance(writer, pq.ParquetWriter):
            writer.close()
        if writer is None:  # no post to score: still an output file, with the header
            return 0
        with open(local, "rb") as handle:
            storage.write_bytes(out, handle.read())
    return rows


def predict_posts(source: str, posts: str, out: str, *, config: Config, model: str = "blend") -> dict[str, Any]:
    """Score every post under ``posts`` with the scorer at ``source`` into ``out``; returns a summary.

    ``out`` ends in .csv or .parquet (one file) or is a folder (Parquet parts, for corpus-sized
    runs). Every location may be local or a URI.
    """
    from smpp_ray.runtime import init_ray
    from smpp_ray.scoring.scorer import empty_scores, load_feature_state, scores_schema
    from smpp_ray.tracking import resolve_tracking_uri

    if model not in MODEL_CHOICES:
        raise ValueError(f"--model {model!r}: expected one of {', '.join(MODEL_CHOICES)}")
    started = time.perf_counter()
    posts, out = storage.normalize(posts), storage.normalize(out)
    base = out.rsplit(".", 1)[0] if out.endswith(_OUTPUT_SUFFIXES) else out.rstrip("/")
    work = f"{base}.work"
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri, storage.parent(out)) \
        if str(source).startswith(MLFLOW_SOURCES) else ""
    bundle = resolve_bundle(str(source), stage_dir=work, tracking_uri=tracking_uri)
    state = load_feature_state(bundle.feature_state)
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)
    data_dir, manifest = _prepared_posts(posts, work, state, config)
    counts = manifest.get("counts", {})
    written = int(counts.get("written", sum((counts.get("per_split") or {}).values())))
    logger.info("predict: scoring %d posts with %s (%s)", written, source, model)
    if written:
        scored = _write_scores(scores_dataset(data_dir, bundle, model=model, config=config), out,
                               scores_schema(bundle))
    else:
        scored = 0
        _write_empty(empty_scores(bundle), out)
    rejects = _rejects(data_dir)
    rejects_file = f"{base}.rejects.csv"
    storage.remove(rejects_file)
    if len(rejects):
        storage.write_text(rejects_file, rejects.to_csv(index=False))
        logger.warning("predict: %d posts rejected, reasons in %s", len(rejects), rejects_file)
    input_rows = int(counts.get("input_rows", written))
    if input_rows != scored + len(rejects):
        raise RuntimeError(f"predict lost posts: {input_rows} in, {scored} scored + {len(rejects)} rejected")
    storage.remove(work)
    seconds = time.perf_counter() - started
    logger.info("predict: scored %d of %d posts in %.1f s into %s", scored, input_rows, seconds, out)
    return {"out": out, "rejects": rejects_file if len(rejects) else None, "input_rows": input_rows,
            "scored": scored, "rejected": len(rejects), "model": model, "seconds": round(seconds, 3)}


def _write_empty(frame: pd.DataFrame, out: str) -> None:
    if out.endswith(".csv"):
        storage.write_text(out, frame.to_csv(index=False))
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        target = out if out.endswith(".parquet") else storage.join(out, "part-00000.parquet")
        storage.write_bytes(target, sink.getvalue().to_pybytes())


def _rejects(data_dir: str) -> pd.DataFrame:
    from smpp_ray.data.schema import REJECTS_SCHEMA, rejects_path

    files = storage.list_parquet_files(rejects_path(data_dir))
    if not files:
        return REJECTS_SCHEMA.empty_table().to_pandas()
    tables = [pq.read_table(path, filesystem=fs) for fs, path in map(storage.resolve, files)]
    return pa.concat_tables(tables).to_pandas()
