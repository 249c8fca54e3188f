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

``output_format="smp-challenge"`` writes instead the file a SMP Challenge participant uploads
(:mod:`smpp_ray.scoring.submission`): a score for every row of the ``test_`` files, the network's
where it can, the fallback regressor's for a post whose image is unusable, the label prior for
a post with another bad field (:mod:`smpp_ray.scoring.fallback`); rows in = network-scored +
fallback-scored + prior-scored, each row once.
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
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.manifest import DatasetManifest
from smpp_ray.scoring.bundle import MODEL_CHOICES, ScorerBundle, is_bundle
from smpp_ray.stage_table import STAGE_FOLDERS, pipeline_layout

logger = logging.getLogger(__name__)

#: Sources only MLflow resolves.
MLFLOW_SOURCES = ("models:/", "runs:/", "mlflow-artifacts:/")
_OUTPUT_SUFFIXES = (".csv", ".parquet")
#: ``--format``: the scores table (every model's score, classes) or an SMP Challenge submission.
OUTPUT_FORMATS = ("table", "smp-challenge")


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
    if is_bundle(location):
        return ScorerBundle.from_folder(location)
    layout = pipeline_layout(location)
    return ScorerBundle.from_stages(*(layout[STAGE_FOLDERS[stage]] for stage in ("train", "extract", "tune")))


def _prepared_posts(posts: str, work: str, state, config: Config, *, keep_imageless: bool = False
                    ) -> tuple[str, dict]:
    """A prepared dataset of the new posts: ``posts`` itself when it is one, else prepare's output
    (validated with the pipeline's taxonomy and image settings, not today's config).
    ``keep_imageless`` keeps the metadata of posts whose image alone is bad (for the fallback)."""
    from smpp_ray.data.prepare import prepare_dataset

    extras = tuple(state.tabular.extra_columns)
    if Dataset(posts).has_manifest():
        manifest = Dataset(posts).manifest()
        if manifest.extra_columns != extras:
            raise ValueError(f"dataset {posts!r} carries extra columns {list(manifest.extra_columns)}, but the "
                             f"scorer was fitted on {list(extras)}: prepare the posts with data.extra_columns "
                             "set to the scorer's (or give the raw posts, which predict prepares so)")
        return posts, manifest
    if keep_imageless and config.data.format == "smpd":
        _refuse_train_files(posts)
    logger.info("predict: validating new posts from %s", posts)
    out = storage.join(work, "new_data")
    d = config.data
    written = prepare_dataset(posts, out, max_image_side=int(state.image.get("max_side", d.max_image_side)),
                               jpeg_quality=int(state.image.get("jpeg_quality", d.jpeg_quality)),
                               rows_per_shard=d.rows_per_shard, max_reject_fraction=d.max_reject_fraction,
                               max_image_bytes=int(state.image.get("max_bytes", d.max_image_bytes)),
                               taxonomy=state.taxonomy,
                               keep_imageless=keep_imageless, image_root=d.image_root, data_format=d.format,
                               columns=d.columns, extra_columns=extras)
    return out, DatasetManifest(written)


def _refuse_train_files(posts: str) -> None:
    """A submission scores the test_ files alone: refuse a folder with train_ files before prepare
    validates every training post (hours on the real SMPD) only to be refused afterwards."""
    from smpp_ray.data import smpd

    train = smpd.find_file_set(posts, "train_")
    if train is not None:
        raise ValueError(_TRAIN_FILES_REFUSED.format(posts=posts, names=", ".join(sorted(map(storage.name,
                                                                                           train.files.values())))))


_TRAIN_FILES_REFUSED = ("--format smp-challenge scores the challenge's test_ files; {posts!r} also holds train_ files "
                        "({names}): give a folder with only the test_ files and their images")


def scores_dataset(data_dir: str, bundle: ScorerBundle, *, model: str, config: Config):
    """The lazy Ray Dataset of score rows for every post of a prepared dataset."""
    from smpp_ray.data.reads import read_parquet
    from smpp_ray.data.schema import POSTS_SCHEMA
    from smpp_ray.features.extract import decode_stage_memory, in_decode_blocks, inference_pool
    from smpp_ray.scoring.scorer import PostScorer, checkpoint_backbone_spec

    cfg = config.extract
    image_size = checkpoint_backbone_spec(bundle.checkpoint).image_size
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


def check_output_location(out: str, inputs: dict[str, str]) -> None:
    """Refuse an ``--out`` that would destroy what predict did not write (ValueError, exit 2).

    A folder output is emptied before the parts are written, so it must be empty, absent or
    hold only Parquet parts (an earlier run's scores); and no output may be one of the inputs or
    lie inside one (the pipeline folder, the posts folder).
    """
    for flag, location in inputs.items():
        if location.startswith(MLFLOW_SOURCES):
            continue
        inside = storage.normalize(location).rstrip("/")
        if out.rstrip("/") == inside or out.startswith(inside + "/"):
            raise ValueError(f"--out {out!r} is {flag} {inside!r} or inside it; write the scores elsewhere "
                             "(predict never writes into its inputs)")
    if out.endswith(_OUTPUT_SUFFIXES) or not storage.is_dir(out):
        return
    names = storage.list_names(out)
    others = [name for name in names if not name.endswith(".parquet") and name not in _staging_names(names)]
    if others:
        raise ValueError(f"--out {out!r} is a folder holding files predict did not write ({', '.join(others[:5])}"
                         f"{' ...' if len(others) > 5 else ''}); a folder output is replaced whole, so give an "
                         "empty or new folder")


def _staging_names(names: list[str]) -> set[str]:
    """Staging folders an interrupted run left inside a mount-point ``--out`` (removed on the next)."""
    return {name for name in names if name.startswith(storage.INNER_STAGING)}


def _replace_parts(staged: str, out: str) -> None:
    """Make the parts in ``staged`` the folder ``out``'s whole content (the previous parts go)."""
    previous = storage.list_names(out) if storage.is_dir(out) else []
    storage.swap_in(staged, out, sorted({*previous, *storage.list_names(staged)} - _staging_names(previous)))


def _write_scores(dataset, out: str, schema: pa.Schema) -> int:
    """Stream the score rows into ``out`` (.csv/.parquet file, else a folder of Parquet parts)."""
    if not out.endswith(_OUTPUT_SUFFIXES):
        # The parts go into a fresh folder that replaces the previous scores only once complete
        # (locally in one atomic exchange): a run killed while scoring leaves the old scores whole.
        staged = storage.staging_location(out)
        dataset.write_parquet(staged)
        rows = sum(pq.ParquetFile(path, filesystem=fs).metadata.num_rows
                   for fs, path in map(storage.resolve, storage.list_parquet_files(staged)))
        _replace_parts(staged, out)
        return rows
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


def predict_posts(source: str, posts: str, out: str, *, config: Config, model: str = "blend",
                  output_format: str = "table") -> dict[str, Any]:
    """Score every post under ``posts`` with the scorer at ``source`` into ``out``; returns a summary.

    ``output_format`` ``table``: ``out`` ends in .csv or .parquet (one file) or is a folder
    (Parquet parts, for corpus-sized runs). ``smp-challenge``: ``out`` is the submission .csv
    (see :mod:`smpp_ray.scoring.submission`; ``posts`` must hold only ``test_`` files). Every
    location may be local or a URI.
    """
    from smpp_ray.runtime import init_ray
    from smpp_ray.scoring.post_features import load_feature_state
    from smpp_ray.tracking import resolve_tracking_uri

    if model not in MODEL_CHOICES:
        raise ValueError(f"--model {model!r}: expected one of {', '.join(MODEL_CHOICES)}")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"--format {output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    submission = output_format == "smp-challenge"
    if submission:
        from smpp_ray.scoring.submission import check_output

        check_output(str(out))
    started = time.perf_counter()
    posts, out = storage.normalize(posts), storage.normalize(out)
    check_output_location(out, inputs={"--posts": posts, "the scorer": str(source)})
    base = out.rsplit(".", 1)[0] if out.endswith(_OUTPUT_SUFFIXES) else out.rstrip("/")
    work = f"{base}.work"
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri, storage.parent(out)) \
        if str(source).startswith(MLFLOW_SOURCES) else ""
    bundle = resolve_bundle(str(source), stage_dir=work, tracking_uri=tracking_uri)
    state = load_feature_state(bundle.feature_state)
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)
    data_dir, manifest = _prepared_posts(posts, work, state, config, keep_imageless=submission)
    if submission:
        summary = _submission(str(source), bundle, data_dir, manifest, out, model=model, config=config)
    else:
        summary = _score_table(str(source), bundle, data_dir, manifest, out, base, model=model, config=config)
    storage.remove(work)  # kept on failure: prepare's rejects of a refused corpus are there
    seconds = time.perf_counter() - started
    logger.info("predict: scored %d of %d posts in %.1f s into %s", summary["scored"], summary["input_rows"],
                seconds, out)
    return {**summary, "model": model, "format": output_format, "seconds": round(seconds, 3)}


def _score_table(source: str, bundle: ScorerBundle, data_dir: str, manifest: DatasetManifest, out: str, base: str, *,
                 model: str, config: Config) -> dict[str, Any]:
    """The scores table of every written post; rejects beside it. Returns the summary's counts."""
    from smpp_ray.scoring.scorer import empty_scores, scores_schema

    written = manifest.written
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
    input_rows = manifest.input_rows
    if input_rows != scored + len(rejects):
        raise RuntimeError(f"predict lost posts: {input_rows} in, {scored} scored + {len(rejects)} rejected")
    return {"out": out, "rejects": rejects_file if len(rejects) else None, "input_rows": input_rows,
            "scored": scored, "rejected": len(rejects)}


def _submission(source: str, bundle: ScorerBundle, data_dir: str, manifest: DatasetManifest, out: str, *, model: str,
                config: Config) -> dict[str, Any]:
    """The SMP Challenge submission of a prepared folder of ``test_`` posts; returns the summary's counts."""
    from smpp_ray.scoring.fallback import FallbackScorer, missing_fallback
    from smpp_ray.scoring.submission import assemble_submission, write_submission

    files = manifest.raw_files
    if "train" in files:  # a prepared dataset given as --posts
        raise ValueError(_TRAIN_FILES_REFUSED.format(posts=manifest.raw_dir,
                                                     names=", ".join(sorted(map(str, files["train"].values())))))
    input_rows = manifest.input_rows
    rejects = _rejects(data_dir)
    if bundle.fallback is None and len(rejects):  # before the network runs: it cannot make the file whole
        raise ValueError(f"{missing_fallback(source)}. {len(rejects)} test post(s) need it, the network cannot "
                         f"score them: " + "; ".join(f"row {r.row_index} ({r.field}: {r.reason})"
                                                     for r in rejects.head(5).itertuples()))
    fallback = FallbackScorer(bundle, source) if bundle.fallback is not None else None
    posts = _post_keys(data_dir)
    if len(posts):
        network = _collect_scores(scores_dataset(data_dir, bundle, model=model, config=config))
    else:
        network = pd.DataFrame({"pid": pd.Series(dtype=str), "predicted_popularity": pd.Series(dtype=float)})
    result = assemble_submission(posts, network, _imageless(data_dir), rejects, fallback, input_rows=input_rows,
                                 source=source)
    written = write_submission(result, out)
    tally = result.counts()
    if written["fallback_file"]:
        logger.warning("predict: %d posts scored by the fallback regressor, %d by the prior; reasons in %s",
                       tally["fallback_scored"], tally["prior_scored"], written["fallback_file"])
    if input_rows != tally["scored"] + tally["fallback_scored"] + tally["prior_scored"] or \
            len(rejects) != tally["fallback_scored"] + tally["prior_scored"]:
        raise RuntimeError(f"predict lost posts: {input_rows} in, {tally} ({len(rejects)} rejected)")
    return {**written, "input_rows": input_rows, **tally, "rejected": len(rejects),
            "fallback_model": fallback.facts.family if fallback is not None else None}


def _post_keys(data_dir: str) -> pd.DataFrame:
    """pid and row_index of every written post (every split: a test_-only folder has only test)."""
    from smpp_ray.data.schema import SPLITS

    files = [f for split in SPLITS for f in storage.list_parquet_files(Dataset(data_dir).posts(split))]
    tables = [pq.read_table(path, columns=["pid", "row_index"], filesystem=fs) for fs, path in map(storage.resolve, files)]
    if not tables:
        return pd.DataFrame({"pid": pd.Series(dtype=str), "row_index": pd.Series(dtype="int64")})
    return pa.concat_tables(tables).to_pandas()


def _collect_scores(dataset) -> pd.DataFrame:
    """pid and predicted_popularity of every scored post, gathered on the driver (two columns a post)."""
    parts = [batch[["pid", "predicted_popularity"]]
             for batch in dataset.iter_batches(batch_format="pandas", batch_size=4096)]
    return pd.concat(parts, ignore_index=True)


def _imageless(data_dir: str) -> pd.DataFrame:
    """The prepared metadata of the posts rejected for their image alone (empty when none were kept)."""
    from smpp_ray.data.schema import POSTS_SCHEMA

    return _read_parquet_folder(Dataset(data_dir).imageless, POSTS_SCHEMA)


def _read_parquet_folder(location: str, schema: pa.Schema) -> pd.DataFrame:
    """Every Parquet part of a folder as one frame; the schema's empty frame when there is none."""
    files = storage.list_parquet_files(location)
    if not files:
        return schema.empty_table().to_pandas()
    tables = [pq.read_table(path, filesystem=fs) for fs, path in map(storage.resolve, files)]
    return pa.concat_tables(tables).to_pandas()


def _write_empty(frame: pd.DataFrame, out: str) -> None:
    if out.endswith(".csv"):
        storage.write_text(out, frame.to_csv(index=False))
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        if out.endswith(".parquet"):
            storage.write_bytes(out, sink.getvalue().to_pybytes())
            return
        staged = storage.staging_location(out)
        storage.write_bytes(storage.join(staged, "part-00000.parquet"), sink.getvalue().to_pybytes())
        _replace_parts(staged, out)


def _rejects(data_dir: str) -> pd.DataFrame:
    from smpp_ray.data.schema import REJECTS_SCHEMA

    return _read_parquet_folder(Dataset(data_dir).rejects, REJECTS_SCHEMA)
