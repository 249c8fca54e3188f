"""``smpp extract``: network + tabular features for every post, partitioned by split.

Output (``out_dir``, any location: a local path or ``s3://...``)::

    split=train/part-*.parquet   key columns pid, uid, postdate, label, category, subcategory
    split=val/part-*.parquet     + feature columns (see feature_manifest.json)
    split=test/part-*.parquet
    feature_manifest.json        every feature column with its group and categorical flag
    feature_state/               what was fitted on train, for featurising new posts
                                 (:mod:`smpp_ray.features.state`)

How the work is split:

1. Metadata only (never images) is read on the driver for the tabular and leak-free history
   features, which need whole-corpus views (a user's earlier posts, train tag vocabulary).
2. With a checkpoint, one Ray Data pass streams the posts: ``read_parquet`` -> JPEG decoding and
   tokenisation in CPU tasks (:func:`decode_batch`) -> the model in an actor pool
   (:class:`NetworkFeatureExtractor`, ``ActorPoolStrategy(min_size, max_size)``, ``num_gpus``)
   -> ``_network/split=*`` Parquet. Decoding is a separate stage so GPUs wait on nothing; its
   concurrency is sized from one batch decoded on the driver (:func:`size_decode_stage`). With
   ``extract.gpu_decode`` the CPU tasks only tokenise and the actors decode the JPEGs on their
   device. An actor that dies mid-run is restarted and its batch retried (:func:`inference_pool`).
3. The PCAs of the embeddings and the fused vector (:func:`pca_inputs`) are fitted on
   ``_network/split=train`` only, streamed batch by batch.
4. With ``extract.neighbour_embeddings``, the training posts' embeddings become the retrieval
   bank (:mod:`smpp_ray.features.neighbours`), put once in the object store.
5. A second Ray Data pass computes each post's leak-free neighbour features in an actor pool
   (:class:`NeighbourFeaturiser`: the bank is read once per node, zero-copy, by every actor
   there), joins the network rows with the tabular rows *by pid* (order independent; the
   tabular table is shared once through the object store), projects the embeddings and writes
   the final files; the driver then checks every post appears exactly once.

The dataset, the checkpoint and the output are locations (:mod:`smpp_ray.storage`): the actors
receive the checkpoint's location, not a driver path, and each loads it on its own node.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.config import ExtractConfig, parse_resources
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.manifest import DatasetManifest
from smpp_ray.data.reads import parquet_rows, read_parquet
from smpp_ray.data.schema import SPLITS, Taxonomy
from smpp_ray.features.history import HistoryPool, history_columns
from smpp_ray.features.manifest import (
    GROUPS,
    KEY_COLUMNS,
    FeatureColumn,
    FeatureSet,
    split_folder,
)
from smpp_ray.features.neighbours import (
    EMBEDDING_OUTPUTS,
    NEIGHBOUR_PREFIXES,
    NeighbourBank,
    NeighbourSettings,
)
from smpp_ray.features.network import TENSOR_OUTPUTS, NetworkFeatureExtractor, decode_batch
from smpp_ray.features.pca import PCAAccumulator, PCAProjection
from smpp_ray.features.state import FeatureState
from smpp_ray.features.tabular import TabularFeatures, build_tabular_features, load_post_metadata

logger = logging.getLogger(__name__)

NETWORK_TMP = "_network"
#: Rows per output file: few enough files for fast listing, small enough to stream.
ROWS_PER_FILE = 8192
EMBEDDINGS = ("image_embedding", "text_embedding")
#: Every output a train-only PCA may reduce; its projection is keyed by the name's first word
#: (``image``, ``text``, ``fused``) and its columns are ``net_<key>_pc_<i>``.
PCA_INPUTS = (*EMBEDDINGS, "fused")
#: Seconds to wait for the minimum actor pool (model loading included) before failing.
MIN_ACTORS_WAIT_S = 900
#: Testing aid, read on the driver: a file path. The first inference actor to create that file
#: exits abruptly (``os._exit``) in its second batch, as a lost node or an OOM kill would, so a
#: test can check that the restarted actor's retried batch leaves every pid written exactly once.
CRASH_ONCE_ENV = "SMPP_TEST_EXTRACT_CRASH_ONCE"


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint that was checked against the dataset and loads into its backbone."""

    path: str
    """The checkpoint folder's location (what every actor loads on its own node)."""
    backbone: str
    image_size: int
    context_length: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def _part_files():
    """A FilenameProvider naming files ``part-<task>-<write uuid>.parquet``."""
    from ray.data.datasource import FilenameProvider

    class PartFiles(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}-{write_uuid}.parquet"

    return PartFiles()


def extract_features(data_dir: str, checkpoint_dir: str | None, out_dir: str, *,
                     extract_config: ExtractConfig) -> dict[str, Any]:
    """Write features of every post of ``data_dir`` to ``out_dir`` and return a summary.

    ``data_dir``, ``checkpoint_dir`` and ``out_dir`` are locations (local paths or URIs).
    ``checkpoint_dir`` None writes tabular features only (a metadata-only baseline, no Ray
    needed). A missing checkpoint, or one whose taxonomy or backbone does not fit the dataset,
    raises ValueError naming the location and what differs, before any work starts.
    """
    started = time.perf_counter()
    data_dir, out_dir = storage.normalize(data_dir), storage.normalize(out_dir)
    manifest = Dataset(data_dir).manifest()
    checkpoint = validate_checkpoint(checkpoint_dir, data_dir) if checkpoint_dir else None

    tabular, table, pool = metadata_features(data_dir, manifest, extract_config.user_description_components)
    feature_columns = tabular.columns
    for split in SPLITS:
        storage.reset_dir(FeatureSet(out_dir).split(split))

    summary: dict[str, Any] = {"network": checkpoint is not None}
    projections: dict[str, PCAProjection] = {}
    bank: NeighbourBank | None = None
    if checkpoint is None:
        _write_tabular_only(table, out_dir)
    else:
        tmp_dir = storage.join(out_dir, NETWORK_TMP)
        storage.reset_dir(tmp_dir)
        summary.update(_run_network_pass(data_dir, checkpoint, tmp_dir, extract_config))
        if extract_config.pca_components > 0:
            projections = _fit_embedding_pcas(tmp_dir, extract_config.pca_components, pca_inputs(extract_config))
        settings = NeighbourSettings.from_config(extract_config)
        if settings.enabled:
            bank = neighbour_bank(tmp_dir, table, manifest.taxonomy, settings)
            summary["neighbour_bank_posts"] = len(bank)
        _run_join_pass(tmp_dir, table, projections, out_dir, bank, extract_config)
        storage.remove(tmp_dir)

    rows = _check_outputs(out_dir, table)
    schema = _ensure_every_split_has_a_file(out_dir)
    network_columns = [FeatureColumn(name, "network", categorical=name.startswith("net_pred_"))
                       for name in schema.names if name.startswith("net_")]
    columns = feature_columns + network_columns + (bank.settings.columns() if bank is not None else [])
    FeatureSet(out_dir).write_manifest(columns)
    state = FeatureState(tabular.state, pool, projections, manifest.taxonomy, manifest.concepts,
                         checkpoint.backbone if checkpoint else None, checkpoint.path if checkpoint else None,
                         manifest.image, data_dir, bank)
    state.save(out_dir)

    summary.update({
        "rows": rows,
        "feature_columns": len(columns),
        "columns_per_group": {g: sum(c.group == g for c in columns) for g in GROUPS},
        "pca_components": extract_config.pca_components if checkpoint else 0,
        "seconds": round(time.perf_counter() - started, 3),
        "features_dir": out_dir,
        "fitted": tabular.fitted,
    })
    for name, projection in projections.items():
        total = float(projection.explained_variance.sum())
        summary[f"{name}_pca_variance"] = round(total, 6)
    logger.info("wrote features of %s posts (%d columns) to %s", rows, len(columns), out_dir)
    return summary


def metadata_features(data_dir: str, manifest: DatasetManifest, user_description_components: int
                      ) -> tuple[TabularFeatures, pa.Table, HistoryPool]:
    """Tabular + history features of every post (metadata only), as one Arrow table with ``split``.

    The returned :class:`TabularFeatures` lists every column (history included) and what was
    fitted; the :class:`HistoryPool` is the training history the history features came from.
    """
    meta = load_post_metadata(data_dir)
    tabular = build_tabular_features(meta, user_description_components=user_description_components,
                                     corpus_start=manifest.time_start, extra_columns=manifest.extra_columns)
    pool = HistoryPool.from_posts(meta)
    history = pool.features(meta["uid"].to_numpy(), meta["postdate"].to_numpy())
    frame = pd.concat([tabular.frame, history], axis=1)
    frame["split"] = meta["split"].to_numpy()
    tabular.frame = frame
    tabular.columns = tabular.columns + history_columns()
    return tabular, pa.Table.from_pandas(frame, preserve_index=False), pool


# ---------------------------------------------------------------------------------------------
# Checkpoint


def checkpoint_location(checkpoint_dir: str) -> str:
    """The checkpoint folder given it or a finished train stage folder (see
    :func:`smpp_ray.model.checkpoint.resolve_checkpoint`, the one resolver)."""
    from smpp_ray.model.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(checkpoint_dir) or ""
    except ValueError as err:
        raise ValueError(f"checkpoint {storage.normalize(checkpoint_dir)!r} not found: {err}") from err


def validate_checkpoint(checkpoint_dir: str, data_dir: str) -> CheckpointInfo:
    """Check a checkpoint against the dataset before any work starts; ValueError says what is wrong.

    Checks: the folder and its ``trainable.pt`` / ``meta.json`` exist; its taxonomy equals the
    dataset manifest's; its backbone is a known architecture and the trainable state loads into
    it (a dry load on CPU of the driver's cached copy, so a mismatch fails here, not inside an
    actor). The returned :attr:`CheckpointInfo.path` is the checkpoint's location.
    """
    from smpp_ray.model.backbone import backbone_spec
    from smpp_ray.model.checkpoint import (
        TRAINABLE_FILE,
        load_model_from_checkpoint,
        model_config_from_meta,
        read_meta,
    )

    location = checkpoint_location(checkpoint_dir)
    if not storage.is_file(storage.join(location, TRAINABLE_FILE)):
        raise ValueError(f"checkpoint {location!r} has no {TRAINABLE_FILE}")
    local = storage.local_copy(location)  # the driver's own copy, for the checks below
    try:
        meta = read_meta(local)
        config = model_config_from_meta(meta, where=location)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {location!r} has an unreadable meta.json: {err}") from err
    difference = taxonomy_difference(Taxonomy.from_dict(meta["taxonomy"]), Dataset(data_dir).taxonomy())
    if difference:
        raise ValueError(f"checkpoint {location!r} does not match dataset {data_dir!r}: {difference}")
    prototype_backbone = _prototype_backbone(local, meta)
    if prototype_backbone and prototype_backbone != config.backbone:
        raise ValueError(f"checkpoint {location!r} was trained on backbone {config.backbone!r} but its "
                         f"prototypes were built with backbone {prototype_backbone!r}")
    try:
        spec = backbone_spec(config.backbone, config.context_length)
    except ValueError as err:
        raise ValueError(f"checkpoint {location!r}: {err}") from err
    try:
        model = load_model_from_checkpoint(local, device="cpu")
    except Exception as err:  # any load failure means the state does not fit the stored backbone
        raise ValueError(f"checkpoint {location!r} does not load into backbone {config.backbone!r}: {err}") from err
    del model
    return CheckpointInfo(location, config.backbone, spec.image_size, spec.context_length, spec.mean, spec.std)


def _prototype_backbone(checkpoint_dir: str, meta: dict) -> str:
    """The backbone recorded in the checkpoint's prototype bank (empty when none is recorded)."""
    from smpp_ray.model.checkpoint import prototypes_in_checkpoint
    from smpp_ray.model.prototypes import read_prototype_metadata

    try:
        prototypes = prototypes_in_checkpoint(checkpoint_dir, meta)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err
    if not prototypes:
        return ""
    return read_prototype_metadata(prototypes).get("backbone", "")


def taxonomy_difference(checkpoint: Taxonomy, dataset: Taxonomy) -> str:
    """Empty when equal, else the first difference in words."""
    for level, a, b in (("categories", checkpoint.categories, dataset.categories),
                        ("subcategories", checkpoint.subcategories, dataset.subcategories)):
        if len(a) != len(b):
            return f"checkpoint has {len(a)} {level}, dataset has {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return f"{level} id {i} is {x!r} in the checkpoint but {y!r} in the dataset"
    for i, (x, y) in enumerate(zip(checkpoint.parents, dataset.parents, strict=True)):
        if x != y:
            return f"subcategory {checkpoint.subcategories[i]!r} has parent {x} in the checkpoint but {y} in the dataset"
    return ""


# ---------------------------------------------------------------------------------------------
# Ray Data passes


def network_feature_dataset(data_dir: str, checkpoint: CheckpointInfo, cfg: ExtractConfig,
                            decode_concurrency: int | None = None):
    """The lazy Ray Dataset of network features: posts -> decode (CPU tasks) -> model (actor pool).

    Rows: ``pid``, ``split``, the extractor's arrays and ``worker``. Nothing runs until consumed.
    ``decode_concurrency`` caps the decode tasks running at once (None: Ray Data's default).
    """
    location = Dataset(data_dir).posts_root
    posts = in_decode_blocks(read_parquet(location).select_columns(["pid", "image", "title", "tags", "split"]),
                             location, cfg, checkpoint.image_size)
    decoded = posts.map_batches(
        decode_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
        memory=decode_stage_memory(cfg.batch_size, checkpoint.image_size, decode_images=not cfg.gpu_decode),
        concurrency=decode_concurrency, fn_kwargs=_decode_kwargs(checkpoint, cfg))
    options, actor = inference_pool(cfg)
    if cfg.gpu_decode:
        actor = {**actor, **_device_decode_kwargs(checkpoint)}
    extractor: type = NetworkFeatureExtractor
    crash_marker = os.environ.get(CRASH_ONCE_ENV, "")
    if crash_marker:
        extractor, actor = _CrashOnceExtractor, {**actor, "crash_marker": crash_marker}
    return decoded.map_batches(extractor, fn_constructor_kwargs={"checkpoint_dir": checkpoint.path, **actor},
                               **options)


def _decode_kwargs(checkpoint: CheckpointInfo, cfg: ExtractConfig) -> dict[str, Any]:
    """:func:`decode_batch`'s keyword arguments for this checkpoint."""
    return {"backbone": checkpoint.backbone, "image_size": checkpoint.image_size,
            "context_length": checkpoint.context_length, "mean": checkpoint.mean, "std": checkpoint.std,
            "decode_images": not cfg.gpu_decode}


def _device_decode_kwargs(checkpoint: CheckpointInfo) -> dict[str, Any]:
    """The extractor's constructor arguments that make it decode JPEG bytes on its device."""
    return {"image_size": checkpoint.image_size, "mean": checkpoint.mean, "std": checkpoint.std,
            "backbone": checkpoint.backbone, "context_length": checkpoint.context_length}


class _CrashOnceExtractor(NetworkFeatureExtractor):
    """Testing aid (:data:`CRASH_ONCE_ENV`): the extractor, but the actor that first creates
    ``crash_marker`` dies in its second batch, after one batch of its output has gone downstream."""

    def __init__(self, checkpoint_dir: str, *, crash_marker: str, **kwargs: Any) -> None:
        super().__init__(checkpoint_dir, **kwargs)
        self.crash_marker = crash_marker
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.calls == 2:
            try:  # O_EXCL: exactly one actor of all (and of all restarts) wins the marker
                os.close(os.open(self.crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                logger.warning("feature extractor %s exits abruptly (%s)", self.worker, CRASH_ONCE_ENV)
                os._exit(1)
        return super().__call__(batch)


#: What a decode worker process holds before its first batch (torch, torchvision, the tokenizer),
#: measured at 550-750 MiB: reserved so Ray Data schedules decode tasks on memory that exists.
DECODE_WORKER_BASELINE_BYTES = 768 * 1024 * 1024


#: Decoded pixels a block may hold when it carries several batches (see :func:`decode_block_rows`).
DECODED_BLOCK_BYTES = 32 * 1024 * 1024
#: At most this many batches per block.
MAX_BATCHES_PER_BLOCK = 8
#: Blocks each inference actor should get at least (Ray Data keeps up to 4 calls in flight per actor).
BLOCKS_PER_ACTOR = 4


def decode_block_rows(batch_size: int, image_size: int, rows: int = 0, actors: int = 1) -> int:
    """Rows per block ahead of decoding: a whole number of batches, as many as fit
    :data:`DECODED_BLOCK_BYTES` of decoded pixels (at least one, at most :data:`MAX_BATCHES_PER_BLOCK`),
    and few enough that ``rows`` posts still make :data:`BLOCKS_PER_ACTOR` blocks for each of
    ``actors`` (``rows`` 0: unknown, no such cap).

    A block is Ray Data's unit of work: one decode task and one object-store put and get each.
    With small images and a small model that per-block cost, not decoding or the model, set the
    pace at one batch per block (bench/results.md); images of a real backbone's size keep one
    batch per block, whose decoded pixels already fill the budget. Whole batches, so each actor
    call gets full ones; enough blocks, so a small corpus still reaches every actor.
    """
    per_batch = batch_size * 3 * image_size ** 2 * 4
    batches = min(MAX_BATCHES_PER_BLOCK, DECODED_BLOCK_BYTES // max(1, per_batch))
    if rows > 0:
        batches = min(batches, rows // max(1, BLOCKS_PER_ACTOR * max(1, actors) * batch_size))
    return batch_size * max(1, batches)


def in_decode_blocks(posts: Any, location: str, cfg: ExtractConfig, image_size: int) -> Any:
    """``posts`` (read from ``location``) cut into :func:`decode_block_rows` blocks for the decode
    stage and the actor pool (a streaming split, no shuffle): Parquet reads coalesce small files
    into one block, which would hand the whole corpus to a single actor. Shared by extraction and
    ``smpp predict``."""
    rows = decode_block_rows(cfg.batch_size, image_size, parquet_rows(location), cfg.max_actors)
    return posts.repartition(target_num_rows_per_block=rows)


def decode_stage_memory(batch_size: int, image_size: int, *, decode_images: bool = True) -> int:
    """Bytes a decode task reserves: the worker's baseline plus its decoded block, input and output
    (only the baseline when it only tokenises: ``extract.gpu_decode``).

    Reserving it also keeps Ray Data from fusing decoding into the model actors, which it does for
    stages with equal resources: decoding must run in its own CPU tasks, in parallel with
    inference, so accelerators never wait.
    """
    rows = decode_block_rows(batch_size, image_size)
    pixels = 2 * rows * 3 * image_size ** 2 * 4 if decode_images else 0
    return DECODE_WORKER_BASELINE_BYTES + pixels


def decode_concurrency(actors: int, actor_images_per_s: float, decode_images_per_s: float, cpu_cap: int) -> int:
    """Decode tasks that keep ``actors`` inference actors fed: ``ceil(actors x actor rate / decode
    rate)``, at least 1 and at most ``cpu_cap``; ``cpu_cap`` when a rate is unknown (<= 0 or NaN)."""
    cpu_cap = max(1, int(cpu_cap))
    if not (actor_images_per_s > 0 and decode_images_per_s > 0):
        return cpu_cap
    return max(1, min(cpu_cap, math.ceil(actors * actor_images_per_s / decode_images_per_s)))


def _sample_batch(data_dir: str, rows: int) -> dict[str, np.ndarray]:
    """Up to ``rows`` posts from the first shards, as a numpy batch (what a decode task gets)."""
    tables: list[pa.Table] = []
    for location in storage.list_parquet_files(Dataset(data_dir).posts_root):
        fs, path = storage.resolve(location)
        for part in pq.ParquetFile(path, filesystem=fs).iter_batches(
                batch_size=rows, columns=["pid", "image", "title", "tags"]):
            tables.append(pa.Table.from_batches([part]))
            if sum(t.num_rows for t in tables) >= rows:
                break
        if sum(t.num_rows for t in tables) >= rows:
            break
    table = pa.concat_tables(tables).slice(0, rows) if tables else None
    if table is None or table.num_rows == 0:
        raise ValueError(f"no posts under {Dataset(data_dir).posts_root!r} to measure the decode rate on")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _images_per_s(fn: Any, batch: dict[str, np.ndarray]) -> tuple[float, Any]:
    """Images/s of ``fn`` on ``batch`` after one warm-up call on two rows (tokenizer, model set-up)."""
    fn({name: values[:2] for name, values in batch.items()})
    started = time.perf_counter()
    out = fn(batch)
    seconds = time.perf_counter() - started
    return (len(batch["pid"]) / seconds if seconds > 0 else float("inf")), out


def size_decode_stage(data_dir: str, checkpoint: CheckpointInfo, cfg: ExtractConfig,
                      cluster_cpus: float) -> dict[str, Any]:
    """How many decode tasks run at once, from one batch decoded (as the stage would) on the driver.

    The expected rate of one actor is ``extract.actor_images_per_s``, or for CPU actors one batch
    timed on the driver with the actor's threads; for GPU actors without it the rate is unknown and
    decode gets every CPU the actor pool leaves. ``extract.decode_concurrency`` > 0 overrides the
    size (the rates are still measured and reported).
    """
    import torch

    batch = _sample_batch(data_dir, cfg.batch_size)
    decode_rate, decoded = _images_per_s(lambda b: decode_batch(b, **_decode_kwargs(checkpoint, cfg)), batch)
    actor_rate = float(cfg.actor_images_per_s)
    if actor_rate <= 0 and cfg.num_gpus_per_actor == 0:
        _, actor = inference_pool(cfg)
        threads = torch.get_num_threads()
        try:
            extractor = NetworkFeatureExtractor(
                checkpoint.path, **actor, **(_device_decode_kwargs(checkpoint) if cfg.gpu_decode else {}))
            actor_rate, _ = _images_per_s(extractor, decoded)
            del extractor
        finally:
            torch.set_num_threads(threads)  # the extractor set the actor's threads in this process
    cpu_cap = max(1, int(cluster_cpus - cfg.max_actors * cfg.cpus_per_actor))
    auto = decode_concurrency(cfg.max_actors, actor_rate, decode_rate, cpu_cap)
    size = cfg.decode_concurrency or auto
    source = "config" if cfg.decode_concurrency else ("rates" if actor_rate > 0 else "free_cpus")
    logger.info("decode: %.1f images/s per task (measured on %d posts%s); actor: %s images/s expected; "
                "%d decode task(s) (%s; %d CPUs free beside %d actor(s))", decode_rate, len(batch["pid"]),
                ", tokenise only" if cfg.gpu_decode else "", f"{actor_rate:.1f}" if actor_rate > 0 else "unknown",
                size, source, cpu_cap, cfg.max_actors)
    return {"decode_images_per_s": round(decode_rate, 2),
            "expected_actor_images_per_s": round(actor_rate, 2) if actor_rate > 0 else None,
            "decode_concurrency": size, "decode_concurrency_auto": auto, "decode_concurrency_from": source,
            "gpu_decode": cfg.gpu_decode}


def inference_pool(cfg: ExtractConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``map_batches`` options of the inference actor pool (``extract.*``), and the device and
    threads each actor's constructor takes. Shared by extraction and ``smpp predict``."""
    import ray.data

    options = {"compute": ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
               "num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.num_gpus_per_actor,
               "resources": parse_resources(cfg.actor_resources, "extract.actor_resources"),
               "batch_size": cfg.batch_size, "batch_format": "numpy"}
    # A dead actor (lost node, OOM kill) is restarted and its unfinished batches are retried
    # there: Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1 (Ray 2.60
    # deprecates passing them: they would go through **ray_remote_args). A batch's output
    # leaves the actor only when the call returns, so a retry never duplicates rows;
    # tests/test_faults.py kills an actor mid-run to hold Ray to that.
    actor = {"device": "cuda" if cfg.num_gpus_per_actor > 0 else "cpu",
             "num_threads": max(1, int(round(cfg.cpus_per_actor)))}
    return options, actor


def _run_network_pass(data_dir: str, checkpoint: CheckpointInfo, tmp_dir: str, cfg: ExtractConfig) -> dict[str, Any]:
    """Network features of every post to ``tmp_dir/split=*``; returns throughput and actors used."""
    import ray
    import ray.data

    from smpp_ray.runtime import init_ray

    init_ray()
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if cfg.num_gpus_per_actor > 0 and gpus < cfg.min_actors * cfg.num_gpus_per_actor:
        raise ValueError(f"extract.min_actors={cfg.min_actors} x extract.num_gpus_per_actor={cfg.num_gpus_per_actor} "
                         f"needs {cfg.min_actors * cfg.num_gpus_per_actor:g} GPUs but the Ray cluster has {gpus:g}")
    decode = size_decode_stage(data_dir, checkpoint, cfg, ray.cluster_resources().get("CPU", 1.0))
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    previous_wait = context.wait_for_min_actors_s
    # Start the whole minimum pool before work flows (Ray's default starts actors lazily, so the
    # first actor up can take every batch), and fail clearly if the cluster cannot host it.
    context.wait_for_min_actors_s = MIN_ACTORS_WAIT_S
    try:
        network_feature_dataset(data_dir, checkpoint, cfg, decode["decode_concurrency"]).write_parquet(
            tmp_dir, partition_cols=["split"], filename_provider=_part_files())
    finally:
        context.wait_for_min_actors_s = previous_wait
    seconds = time.perf_counter() - started

    fs, path = storage.resolve(tmp_dir)
    written = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=["worker", "finished_at"])
    workers = sorted(set(written.column("worker").to_pylist()))
    steady = steady_throughput(written.column("finished_at").to_numpy())
    logger.info("network features of %d posts in %.1f s (steady %.1f images/s) by %d actor(s): %s",
                written.num_rows, seconds, steady, len(workers), workers)
    return {**decode, "network_seconds": round(seconds, 3),
            "images_per_s": round(written.num_rows / seconds, 2) if seconds > 0 else 0.0,
            "steady_images_per_s": round(steady, 2), "actors_used": len(workers), "workers": workers}


def steady_throughput(finished_at: np.ndarray) -> float:
    """Rows per second over the later half of the batches (by the time each batch finished).

    Start-up (actor creation, model loading) and the decode backlog built up meanwhile are both
    behind by then; NaN with fewer than two batches.
    """
    times, counts = np.unique(finished_at, return_counts=True)
    middle = (len(times) - 1) // 2
    if len(times) < 2 or times[-1] <= times[middle]:
        return float("nan")
    return float(counts[middle + 1:].sum() / (times[-1] - times[middle]))


def _filesystem_paths(files: list[str]) -> tuple[Any, list[str]]:
    """Locations of files on one filesystem -> that filesystem and their paths in it (what
    pyarrow and Ray Data take along with a filesystem: paths, not URIs)."""
    resolved = [storage.resolve(f) for f in files]
    return resolved[0][0], [path for _, path in resolved]


def pca_inputs(cfg: ExtractConfig) -> tuple[str, ...]:
    """The outputs reduced by a train-only PCA: the embeddings, and the fused vector with
    ``extract.pca_fused``."""
    return PCA_INPUTS if cfg.pca_fused else EMBEDDINGS


def _fit_embedding_pcas(tmp_dir: str, components: int, inputs: tuple[str, ...] = EMBEDDINGS
                        ) -> dict[str, PCAProjection]:
    """One PCA per output of ``inputs`` (:data:`PCA_INPUTS`), fitted on the train split's rows
    only (streamed); keyed ``image`` / ``text`` / ``fused``."""

    files = storage.list_parquet_files(FeatureSet(tmp_dir).split("train"))
    if not files:
        raise ValueError(f"no training posts under {tmp_dir!r}: the embedding PCA is fitted on train only; "
                         "set extract.pca_components=0 to keep the embeddings whole")
    fs, paths = _filesystem_paths(files)
    accumulators: dict[str, PCAAccumulator] = {}
    batches = read_parquet(paths, filesystem=fs).select_columns(list(inputs))
    for batch in batches.iter_batches(batch_size=4096, batch_format="numpy"):
        for name in inputs:
            values = np.asarray(batch[name])
            accumulators.setdefault(name, PCAAccumulator(values.shape[1])).add(values)
    return {name.split("_")[0]: accumulators[name].fit(components) for name in inputs}


def neighbour_bank(tmp_dir: str, table: pa.Table, taxonomy: Taxonomy, settings: NeighbourSettings) -> NeighbourBank:
    """The retrieval bank: the training posts' embeddings (``tmp_dir/split=train``, streamed) with
    their postdate, user, label and subcategory from the tabular ``table``."""
    files = storage.list_parquet_files(FeatureSet(tmp_dir).split("train"))
    outputs = [EMBEDDING_OUTPUTS[e] for e in settings.vector_keys]   # the image too: re-uploads
    pids: list[np.ndarray] = []
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    if files:
        fs, paths = _filesystem_paths(files)
        for batch in read_parquet(paths, filesystem=fs).select_columns(["pid", *outputs]).iter_batches(
                batch_size=4096, batch_format="numpy"):
            pids.append(np.asarray(batch["pid"]).astype(str))
            for name in outputs:
                arrays[name].append(np.asarray(batch[name], dtype=np.float32))
    pid = np.concatenate(pids) if pids else np.zeros(0, dtype=str)
    rows = table.take(pc.index_in(pa.array(pid, pa.string()), value_set=table.column("pid")))
    subcategory_ids = taxonomy.subcategory_ids
    bank = NeighbourBank.from_training_posts(
        settings, pid, rows.column("postdate").to_numpy(zero_copy_only=False),
        np.asarray(rows.column("uid").to_pylist(), dtype=str),
        rows.column("label").to_numpy(zero_copy_only=False).astype(np.float64),
        np.array([subcategory_ids.get(name, -1) for name in rows.column("subcategory").to_pylist()], dtype=np.int64),
        {name: np.concatenate(parts) if parts else np.zeros((0, 1), np.float32) for name, parts in arrays.items()})
    logger.info("neighbour bank: %d labelled training posts, embeddings %s, k %s", len(bank),
                list(settings.embeddings), list(settings.ks))
    return bank


class NeighbourFeaturiser:
    """Ray Data actor: network rows -> the same rows plus their neighbour features.

    The bank and the tabular table (for each pid's postdate and user) come from the object store,
    read once per actor without a copy (every actor on a node maps the same buffer).
    """

    def __init__(self, bank_ref: list, tabular_ref: list, device: str = "cpu") -> None:
        import ray

        self.bank = NeighbourBank.from_arrays(ray.get(bank_ref[0]))
        tabular = ray.get(tabular_ref[0])
        self.pids = pd.Index(tabular.column("pid").to_pylist())
        self.postdate = tabular.column("postdate").to_numpy(zero_copy_only=False)
        self.uid = np.asarray(tabular.column("uid").to_pylist(), dtype=str)
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pid = np.asarray(batch["pid"]).astype(str)
        rows = self.pids.get_indexer(pid)
        if (rows < 0).any():
            raise ValueError(f"post {pid[rows < 0][0]!r} has network features but no metadata row")
        features = self.bank.features(batch, self.postdate[rows], self.uid[rows], np.asarray(batch["pred_subcategory"]),
                                      device=self.device)
        return {**batch, **{name: features[name].to_numpy() for name in features.columns}}


def _run_join_pass(tmp_dir: str, table: pa.Table, projections: dict[str, PCAProjection], out_dir: str,
                   bank: NeighbourBank | None = None, cfg: ExtractConfig | None = None) -> None:
    """Network rows (+ neighbour features) joined with tabular rows by pid, embeddings projected,
    written per split."""
    import ray
    import ray.data

    tabular_ref = ray.put(table)
    bank_ref = ray.put(bank.arrays()) if bank is not None else None
    plain = {name: (p.mean, p.components) for name, p in projections.items()}
    for split in SPLITS:
        files = storage.list_parquet_files(FeatureSet(tmp_dir).split(split))
        if not files:
            continue
        fs, paths = _filesystem_paths(files)
        rows = read_parquet(paths, filesystem=fs)
        if bank_ref is not None and cfg is not None:
            options, actor = inference_pool(cfg)
            options["batch_size"] = bank.settings.block_rows
            rows = rows.map_batches(NeighbourFeaturiser, fn_constructor_kwargs={
                "bank_ref": [bank_ref], "tabular_ref": [tabular_ref], "device": actor["device"]}, **options)
        joined = rows.map_batches(
            join_network_batch, batch_format="numpy", batch_size=None,
            fn_kwargs={"tabular_ref": [tabular_ref], "projections": plain})
        joined.write_parquet(FeatureSet(out_dir).split(split), filename_provider=_part_files(),
                             min_rows_per_file=ROWS_PER_FILE, **storage.PARQUET_CHECKSUM_WRITE)


_TABULAR: dict[str, pa.Table] = {}


def join_network_batch(batch: dict[str, np.ndarray], *, tabular_ref: list,
                       projections: dict[str, tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    """Network arrays of a batch + the tabular rows of the same pids -> one flat output table.

    ``tabular_ref`` is ``[ObjectRef]`` of the whole tabular table (metadata-sized), fetched once
    per worker process; rows are matched by pid, so block order never matters.
    """
    import ray

    key = tabular_ref[0].hex()
    if key not in _TABULAR:
        _TABULAR.clear()
        _TABULAR[key] = ray.get(tabular_ref[0])
    tabular = _TABULAR[key]
    pids = pa.array(np.asarray(batch["pid"]).astype(str), pa.string())
    positions = pc.index_in(pids, value_set=tabular.column("pid"))
    if positions.null_count:
        missing = pids.filter(pc.is_null(positions))[0].as_py()
        raise ValueError(f"post {missing!r} has network features but no metadata row")
    rows = tabular.take(positions)
    return pa.table({**{name: rows.column(name) for name in rows.column_names if name != "split"},
                     **network_feature_columns(batch, projections),
                     **{name: np.asarray(values, dtype=np.float64) for name, values in batch.items()
                        if name.startswith(NEIGHBOUR_PREFIXES)}})


def network_feature_columns(batch: dict[str, np.ndarray],
                            projections: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Flat ``net_*`` columns from the extractor's arrays; an output of :data:`PCA_INPUTS` whose
    key (``image``, ``text``, ``fused``) has a PCA in ``projections`` is projected to
    ``net_<key>_pc_<i>``, any other is written whole (``net_<name>_<i>``)."""
    out: dict[str, np.ndarray] = {}
    for name in TENSOR_OUTPUTS:
        values = np.asarray(batch[name], dtype=np.float32)
        prefix = f"net_{name}"
        kind = name.split("_")[0]
        if name in PCA_INPUTS and kind in projections:
            mean, components = projections[kind]
            values = ((values.astype(np.float64) - mean) @ components.T).astype(np.float32)
            prefix = f"net_{kind}_pc"
        for i in range(values.shape[1]):
            out[f"{prefix}_{i}"] = values[:, i]
    out["net_pred_subcategory"] = np.asarray(batch["pred_subcategory"], dtype=np.int64)
    out["net_pred_category"] = np.asarray(batch["pred_category"], dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Writing and checking


def _write_tabular_only(table: pa.Table, out_dir: str) -> None:
    fs, root = storage.resolve(out_dir)
    for split in SPLITS:
        part = table.filter(pc.equal(table.column("split"), split)).drop_columns(["split"])
        for i, start in enumerate(range(0, part.num_rows, ROWS_PER_FILE)):
            pq.write_table(part.slice(start, ROWS_PER_FILE), f"{root}/{split_folder(split)}/part-{i:05d}.parquet",
                           filesystem=fs, **storage.PARQUET_CHECKSUM_WRITE)


def _check_outputs(out_dir: str, table: pa.Table) -> dict[str, int]:
    """Every post of every split appears exactly once in its split's output files."""
    rows: dict[str, int] = {}
    for split in SPLITS:
        expected = table.filter(pc.equal(table.column("split"), split)).column("pid")
        files = storage.list_parquet_files(FeatureSet(out_dir).split(split))
        written = (pa.concat_arrays([c for fs, path in map(storage.resolve, files)
                                     for c in pq.read_table(path, columns=["pid"], filesystem=fs).column("pid").chunks])
                   if files else pa.array([], pa.string()))
        if written.to_pandas().duplicated().any() or len(written) != len(expected) or \
                set(written.to_pylist()) != set(expected.to_pylist()):
            raise RuntimeError(f"split {split!r}: wrote {len(written)} feature rows for {len(expected)} posts "
                               f"under {out_dir!r}; the pid sets differ")
        rows[split] = len(written)
    return rows


def _ensure_every_split_has_a_file(out_dir: str) -> pa.Schema:
    """An empty split still gets one (empty) file with the full schema, so readers see the columns."""
    fs, root = storage.resolve(out_dir)
    files = {split: storage.list_parquet_files(FeatureSet(out_dir).split(split)) for split in SPLITS}
    any_file = next((f[0] for f in files.values() if f), None)
    if any_file is None:
        raise ValueError(f"no posts to write under {out_dir!r}: the dataset is empty")
    file_fs, file_path = storage.resolve(any_file)
    schema = pq.read_schema(file_path, filesystem=file_fs)
    for split, split_files in files.items():
        if not split_files:
            pq.write_table(schema.empty_table(), f"{root}/{split_folder(split)}/part-00000.parquet", filesystem=fs,
                           **storage.PARQUET_CHECKSUM_WRITE)
    missing = [k for k in KEY_COLUMNS if k not in schema.names]
    if missing:
        raise RuntimeError(f"feature files under {out_dir!r} lack key columns {missing}")
    return schema
