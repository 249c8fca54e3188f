"""The configuration tree: typed, frozen dataclasses loaded from YAML with ``--set`` overrides.

Every field has a default, so an empty YAML file is a valid configuration (the demo). A YAML
file or ``--set section.key=value`` override that names an unknown key, or gives a value of the
wrong type or range, raises :class:`ConfigError` naming the key and the value.

This module imports neither torch nor Ray so it loads anywhere (a laptop without CUDA, the
driver of a Ray job, a docs build).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names which."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def parse_resources(entries: tuple[str, ...], key: str) -> dict[str, float]:
    """``("node_b=0.5", "accelerator_type:H100=0.01")`` -> ``{"node_b": 0.5, ...}`` (custom Ray resources)."""
    resources: dict[str, float] = {}
    for entry in entries:
        name, sep, amount = entry.rpartition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        _require(bool(sep and name) and value > 0,
                 f"{key}: {entry!r} must look like NAME=AMOUNT with AMOUNT > 0 (e.g. node_b=0.5)")
        resources[name] = value
    return resources



@dataclass(frozen=True)
class SynthConfig:
    """The synthetic SMPD corpus written by ``smpp synth``."""

    posts: int = 2000
    """Number of training posts to generate."""
    test_posts: int = 0
    """Number of unlabelled ``test_`` posts to generate beside the training files."""
    seed: int = 0
    """Seed of every random choice; the same seed gives byte-identical files."""
    image_size: int = 64
    """Side in pixels of the square JPEG images."""
    users: int = 0
    """Number of users; 0 picks about one user per 12 posts."""
    first_pid: int = 10_000
    """Pids start just above this; give new posts to score a range the training corpus does not use."""
    form: Literal["smpd2019", "smpd2024"] = "smpd2019"
    """File form: ``smpd2019`` (every JSON file a list of string-typed records, 16-float user
    descriptions) or ``smpd2024`` (the SMP Challenge's 2024+ user file: a pandas column dict with
    float counts, nulls, text descriptions; images under ``SMP_train_images/`` while the path
    file says ``train/``; metadata one folder deeper)."""

    def __post_init__(self) -> None:
        _require(self.form in ("smpd2019", "smpd2024"),
                 f"synth.form must be 'smpd2019' or 'smpd2024', got {self.form!r}")
        _require(self.posts >= 0, f"synth.posts must be >= 0, got {self.posts!r}")
        _require(self.posts + self.test_posts > 0, "synth.posts + synth.test_posts must be > 0 (no posts to write)")
        _require(self.test_posts >= 0, f"synth.test_posts must be >= 0, got {self.test_posts!r}")
        _require(16 <= self.image_size <= 1024, f"synth.image_size must be in [16, 1024], got {self.image_size!r}")
        _require(self.users >= 0, f"synth.users must be >= 0, got {self.users!r}")


@dataclass(frozen=True)
class DataConfig:
    """How ``smpp prepare`` turns a raw SMPD folder into Parquet shards."""

    split: Literal["time", "user"] = "time"
    """``time``: chronological by Postdate; ``user``: grouped by Uid (no user in two splits)."""
    val_fraction: float = 0.1
    """Share of labelled posts that go to the validation split."""
    test_fraction: float = 0.1
    """Share of labelled posts that go to the test split (unlabelled ``test_`` files go there too)."""
    max_image_side: int = 256
    """Images are resized so their longest side is at most this many pixels (kept as JPEG bytes)."""
    jpeg_quality: int = 90
    """JPEG quality of re-encoded images."""
    rows_per_shard: int = 2048
    """Target number of posts per Parquet file."""
    max_reject_fraction: float = 0.5
    """Fail (exit 2, with a per-field summary) when more than this share of rows is rejected: a
    mostly rejected corpus is a broken file (a row-shifted file, a wrong taxonomy), not bad rows."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Images larger than this are rejected from their file size, before any byte is read."""
    taxonomy: str = "infer"
    """Where the class list comes from. ``infer`` (default): the corpus's own ``taxonomy.json``
    beside its files when it has one (``smpp synth`` writes it), else the training files' own
    (Category, Subcategory) pairs. ``packaged``: the packaged 11/77 list of the synthetic corpus.
    Anything else: the location of a class list as JSON (the manifest.json ``taxonomy`` form).
    A name outside the list in use is a reject."""
    format: Literal["smpd", "table"] = "smpd"
    """``smpd``: the SMP Challenge's files (seven row-aligned files, 2019-2023 or 2024+ forms).
    ``table``: posts as rows of Parquet, JSON Lines or CSV files (one file or a folder of them,
    local or in a bucket), read and validated by Ray Data tasks; see ``data.columns``."""
    columns: tuple[str, ...] = ()
    """``table`` format: ``role=column`` entries naming the corpus's columns (pid, uid, postdate,
    image_path or image, label, category, subcategory, concept, title, tags, latitude, longitude,
    geoaccuracy, photo_count, ispro, photo_firstdate, timezone_offset, timezone_id, pathalias,
    ispublic, user_description, location_description, mediatype); a role whose column has its
    own name needs no entry."""
    extra_columns: tuple[str, ...] = ()
    """``table`` format: numeric columns of the corpus carried to the regressors as they are
    (feature group ``extra``, one feature ``extra_<column>`` each), e.g. crawled user statistics
    joined by Pathalias. A value is a number or empty (missing); anything else is a reject of its
    row. ``smpp predict`` reads the same columns of new posts, ``smpp serve`` the post's fields of
    the same names."""
    min_class_posts: int = 3
    """With an inferred class list, a subcategory with fewer labelled training posts than this is
    not a class: its rows are rejects (a stray typo never becomes a class)."""
    image_root: str = ""
    """Folder (relative to the raw folder) the image paths are read under; empty: found by probing
    the raw folder (the paths as written, then the paths with their first folder replaced by each
    sub-folder, e.g. ``SMP_train_images/`` for ``train/<Uid>/<Pid>.jpg``)."""

    def __post_init__(self) -> None:
        _require(0 < self.val_fraction < 1,
                 f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}: training picks its best epoch, "
                 "and tune its rounds, trials, blend and calibration, on the val split")
        _require(0 <= self.test_fraction < 1, f"data.test_fraction must be in [0, 1), got {self.test_fraction!r}")
        _require(self.val_fraction + self.test_fraction < 1,
                 f"data.val_fraction + data.test_fraction must be < 1, got {self.val_fraction + self.test_fraction!r}")
        _require(self.max_image_side >= 16, f"data.max_image_side must be >= 16, got {self.max_image_side!r}")
        _require(1 <= self.jpeg_quality <= 100, f"data.jpeg_quality must be in [1, 100], got {self.jpeg_quality!r}")
        _require(self.rows_per_shard > 0, f"data.rows_per_shard must be > 0, got {self.rows_per_shard!r}")
        _require(0 <= self.max_reject_fraction <= 1,
                 f"data.max_reject_fraction must be in [0, 1], got {self.max_reject_fraction!r}")
        _require(self.max_image_bytes > 0, f"data.max_image_bytes must be > 0, got {self.max_image_bytes!r}")
        _require(self.min_class_posts >= 1, f"data.min_class_posts must be >= 1, got {self.min_class_posts!r}")
        _require(bool(self.taxonomy.strip()), "data.taxonomy must be 'infer', 'packaged' or a file location, got ''")
        _require(not self.extra_columns or self.format == "table",
                 "data.extra_columns names columns of a table corpus; it needs data.format: table "
                 "(the SMP Challenge's files have fixed fields)")
        _require(all(isinstance(c, str) and c.strip() for c in self.extra_columns)
                 and len(set(self.extra_columns)) == len(self.extra_columns),
                 f"data.extra_columns must be distinct column names, got {list(self.extra_columns)!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The prompt-tuned CLIP network (backbone, prompts, prototypes, fusion, losses)."""

    backbone: str = "smpp-tiny-clip"
    """open_clip model name (``ViT-B-16``, ...) or the packaged tiny architecture ``smpp-tiny-clip``."""
    pretrained: str = ""
    """open_clip pretrained tag or a checkpoint file location (local or URI, fetched once per node); empty: random init (tiny model only)."""
    unfreeze_image_blocks: int = 0
    """Number of last image-tower blocks to fine-tune (0 keeps the tower frozen)."""
    unfreeze_text_blocks: int = 0
    """Number of last text-tower blocks to fine-tune (0 keeps the tower frozen)."""
    n_ctx: int = 4
    """Learnable context vectors of the global (class-level) prompt."""
    ctx_init: str = "a photo of a"
    """Phrase the global context is initialised from (its word count must equal n_ctx; empty: random)."""
    class_specific_ctx: bool = False
    """One context per class (CSC) instead of one shared context."""
    n_local_tokens: int = 4
    """Learnable tokens prepended to the post's own text (local prompt)."""
    fusion_layers: int = 1
    """Self-attention layers of the cross-modal fusion."""
    fusion_heads: int = 4
    """Attention heads of the cross-modal fusion."""
    use_prototypes: bool = True
    """Feed visual and textual prototypes of both levels (subcategory, category) into the fusion (ablation switch)."""
    use_global_prompts: bool = True
    """Score global-prompt class text features into the subcategory logits (ablation switch; see global_head)."""
    global_head: Literal["coop", "fused", "both"] = "coop"
    """What global-prompt class text features are scored against (added to the linear head on the fused vector):
    ``coop`` CLIP's image embedding at CLIP's temperature (CoOp; untrained, it is CLIP's zero-shot classifier),
    ``fused`` the fused vector (the earlier model), ``both`` the sum, each with its own learned scale."""
    use_local_prompts: bool = True
    """Compute the local token-to-patch alignment feature (ablation switch)."""
    use_fusion: bool = True
    """Cross-modal attention fusion; off averages the token set instead (ablation switch)."""
    direct_regression: bool = False
    """Add a head that regresses popularity from the fused vector (comparison with the proxy)."""
    weight_ce_sub: float = 1.0
    """Loss weight of the 77-way subcategory cross-entropy."""
    weight_ce_cat: float = 0.5
    """Loss weight of the 11-way category cross-entropy."""
    weight_contrastive: float = 0.2
    """Loss weight of the image-text InfoNCE."""
    weight_prototype: float = 0.1
    """Loss weight of the prototype alignment."""
    weight_regression: float = 0.0
    """Loss weight of the direct-regression head (used only with direct_regression)."""
    context_length: int = 0
    """Text token length; 0 uses the backbone's own."""

    def __post_init__(self) -> None:
        _require(self.n_ctx >= 1, f"model.n_ctx must be >= 1, got {self.n_ctx!r}")
        _require(self.n_local_tokens >= 0, f"model.n_local_tokens must be >= 0, got {self.n_local_tokens!r}")
        _require(self.fusion_layers >= 1, f"model.fusion_layers must be >= 1, got {self.fusion_layers!r}")
        _require(self.fusion_heads >= 1, f"model.fusion_heads must be >= 1, got {self.fusion_heads!r}")
        _require(self.global_head in ("coop", "fused", "both"),
                 f"unknown model.global_head {self.global_head!r}; expected coop, fused or both")
        _require(self.unfreeze_image_blocks >= 0 and self.unfreeze_text_blocks >= 0,
                 "model.unfreeze_image_blocks and model.unfreeze_text_blocks must be >= 0")
        if self.ctx_init:
            words = len(self.ctx_init.split())
            _require(words == self.n_ctx,
                     f"model.ctx_init {self.ctx_init!r} has {words} words but model.n_ctx is {self.n_ctx}")
        for name in ("weight_ce_sub", "weight_ce_cat", "weight_contrastive", "weight_prototype", "weight_regression"):
            _require(getattr(self, name) >= 0, f"model.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class PrototypeConfig:
    """How ``smpp prototypes`` selects class members and builds the prototype bank."""

    shots: int = 256
    """Members per class (classes with fewer use all of theirs)."""
    time_buckets: int = 8
    """Time strata for diversity sampling."""
    batch_size: int = 64
    """Posts per embedding batch."""
    num_actors: int = 1
    """Embedding actors in the Ray Data actor pool."""
    num_gpus_per_actor: float = 0.0
    """GPUs per embedding actor (0 on CPU)."""
    seed: int = 0
    """Seed of the farthest-point selection start."""

    def __post_init__(self) -> None:
        _require(self.shots >= 1, f"prototypes.shots must be >= 1, got {self.shots!r}")
        _require(self.time_buckets >= 1, f"prototypes.time_buckets must be >= 1, got {self.time_buckets!r}")
        _require(self.batch_size >= 1, f"prototypes.batch_size must be >= 1, got {self.batch_size!r}")
        _require(self.num_actors >= 1, f"prototypes.num_actors must be >= 1, got {self.num_actors!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Distributed prompt tuning with Ray Train."""

    num_workers: int = 2
    """Ray Train workers (one per GPU on a cluster)."""
    use_gpu: bool = False
    """Place each worker on a GPU (NCCL); otherwise CPU with gloo."""
    cpus_per_worker: float = 1.0
    """Logical CPUs per worker; keep some free for Ray Data preprocessing."""
    epochs: int = 5
    """Maximum number of epochs."""
    batch_size: int = 32
    """Per-worker batch size."""
    lr: float = 2e-3
    """Peak learning rate (prompts, fusion, heads)."""
    backbone_lr: float = 0.0
    """Peak learning rate of the unfrozen backbone blocks (model.unfreeze_*_blocks), lower than lr so fine-tuning keeps CLIP's alignment; 0 uses lr."""
    weight_decay: float = 1e-4
    """Decoupled weight decay."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer over the trainable parameters only."""
    warmup_epochs: float = 0.5
    """Linear warm-up length before the cosine decay, in epochs."""
    grad_accum_steps: int = 1
    """Gradient accumulation steps per optimizer step."""
    augment: bool = True
    """Train-time augmentation (random resized crop, flip)."""
    cache_image_features: bool = False
    """Encode every post's image once (frozen image tower only) into <run>/image_features on the run's storage and stream those instead of pixels; augmentation is then off."""
    image_features_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Stored precision of the cached image-tower outputs (bfloat16 halves storage and I/O)."""
    prefetch_batches: int = 2
    """Batches each worker's input iterator prepares ahead of the step (hides pipeline latency)."""
    sample_selection_keep: float = 1.0
    """Share of train posts kept by loss-based sample selection after selection_warmup_epochs (the paper keeps 0.77; 1.0: off)."""
    sample_selection: Literal["dataset", "batch"] = "dataset"
    """``dataset``: after the warm-up epochs, one pass ranks every train post by classification loss and later epochs read only the kept ones (the paper); ``batch``: the lowest total loss share of each batch gets gradients."""
    selection_warmup_epochs: int = 1
    """Epochs trained on every post before sample selection starts (early losses say little about label noise)."""
    checkpoints_to_keep: int = 2
    """Best checkpoints kept, by validation top-1."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    early_stopping_patience: int = 3
    """Epochs without a better val top-1 before stopping (0 disables)."""
    worker_resources: tuple[str, ...] = ()
    """Custom Ray resources each Train worker requests, as NAME=AMOUNT (pins workers to nodes that have them)."""
    storage_path: str = ""
    """Ray Train storage (local path, s3://, gs://); empty uses <out>/ray_results."""
    name: str = "smpp-train"
    """Run name under storage_path; relaunching with the same name resumes."""
    fail_at_epoch: int = -1
    """Testing aid: raise once in rank 1 at this epoch to exercise fault tolerance (-1: never)."""
    seed: int = 0
    """Seed of the prompt/head initialisation and of the train shuffle buffer."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, f"train.num_workers must be >= 1, got {self.num_workers!r}")
        _require(self.cpus_per_worker > 0, f"train.cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        parse_resources(self.worker_resources, "train.worker_resources")
        _require(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs!r}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size!r}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr!r}")
        _require(self.backbone_lr >= 0, f"train.backbone_lr must be >= 0 (0: train.lr), got {self.backbone_lr!r}")
        _require(self.image_features_dtype in ("bfloat16", "float32"),
                 f"unknown train.image_features_dtype {self.image_features_dtype!r}; expected bfloat16 or float32")
        _require(self.prefetch_batches >= 0, f"train.prefetch_batches must be >= 0, got {self.prefetch_batches!r}")
        _require(self.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps!r}")
        _require(0 < self.sample_selection_keep <= 1,
                 f"train.sample_selection_keep must be in (0, 1], got {self.sample_selection_keep!r}")
        _require(self.sample_selection in ("dataset", "batch"),
                 f"unknown train.sample_selection {self.sample_selection!r}; expected dataset or batch")
        _require(self.selection_warmup_epochs >= 0,
                 f"train.selection_warmup_epochs must be >= 0, got {self.selection_warmup_epochs!r}")
        _require(self.checkpoints_to_keep >= 1, f"train.checkpoints_to_keep must be >= 1, got {self.checkpoints_to_keep!r}")
        _require(self.max_failures >= 0, f"train.max_failures must be >= 0, got {self.max_failures!r}")


@dataclass(frozen=True)
class ExtractConfig:
    """Parallel feature extraction with a Ray Data actor pool."""

    batch_size: int = 64
    """Posts per inference batch."""
    min_actors: int = 1
    """Minimum actors in the inference pool."""
    max_actors: int = 2
    """Maximum actors in the inference pool."""
    num_gpus_per_actor: float = 0.0
    """GPUs per inference actor (0 on CPU)."""
    actor_resources: tuple[str, ...] = ()
    """Custom Ray resources each inference actor requests, as NAME=AMOUNT (pins actors to nodes)."""
    cpus_per_actor: float = 1.0
    """Logical CPUs per inference actor."""
    pca_components: int = 16
    """Components of the PCA (fitted on train only) that reduces image/text embeddings; 0 keeps them whole."""
    pca_fused: bool = True
    """Reduce the fused vector with its own train-only PCA too (pca_components of them; needs pca_components > 0)."""
    user_description_components: int = 4
    """Components kept of the user description vector."""
    gpu_decode: bool = False
    """CPU tasks only tokenise and pass the JPEG bytes on; the actors decode, resize and normalise on their device."""
    decode_concurrency: int = 0
    """Concurrent decode tasks; 0 sizes them from the decode rate measured on the driver (capped by free CPUs)."""
    actor_images_per_s: float = 0.0
    """Expected images/s of one inference actor, for sizing decode; 0 measures CPU actors on the driver (GPU: all free CPUs)."""
    neighbour_embeddings: tuple[str, ...] = ()
    """Embeddings (image, text, fused) whose nearest earlier training posts give retrieval features; [] (the default: they cost 0.01-0.03 test SRC on the synthetic corpus, bench/results.md) turns them off."""
    neighbour_ks: tuple[int, ...] = (5, 20, 100)
    """Neighbour counts k of the retrieval features (label mean/median/spread, weighted mean, similarity, ...)."""
    user_neighbour_snapshots: int = 8
    """Time snapshots of user profiles for the user-neighbour features (0: none)."""
    neighbour_duplicate_similarity: float = 0.999
    """A same-user bank post at least this similar is a re-upload of the post and is never its neighbour."""
    neighbour_block_rows: int = 1024
    """Query posts per block of the exact neighbour search (memory per block: rows x 16384 floats)."""
    neighbour_min_pool: int = 10
    """A post gets k-neighbour features only with >= this many x k earlier training posts (users) to choose from; fewer and the k "nearest" would be most of the past, a running mean that means something else."""
    neighbour_exact_rows: int = 2_000_000
    """Neighbour banks longer than this get an HNSW index (FAISS) for the part of the bank earlier than a whole block."""

    def __post_init__(self) -> None:
        parse_resources(self.actor_resources, "extract.actor_resources")
        _require(self.batch_size >= 1, f"extract.batch_size must be >= 1, got {self.batch_size!r}")
        _require(1 <= self.min_actors <= self.max_actors,
                 f"extract.min_actors ({self.min_actors}) must be >= 1 and <= extract.max_actors ({self.max_actors})")
        _require(self.pca_components >= 0, f"extract.pca_components must be >= 0, got {self.pca_components!r}")
        _require(self.decode_concurrency >= 0,
                 f"extract.decode_concurrency must be >= 0 (0: sized from the measured decode rate), "
                 f"got {self.decode_concurrency!r}")
        _require(self.actor_images_per_s >= 0,
                 f"extract.actor_images_per_s must be >= 0, got {self.actor_images_per_s!r}")
        # The same rules as smpp_ray.features.neighbours.NeighbourSettings (which checks a saved
        # bank's facts); repeated here so a bad config fails before Ray starts.
        unknown = [e for e in self.neighbour_embeddings if e not in ("image", "text", "fused")]
        _require(not unknown, f"extract.neighbour_embeddings: unknown embedding {unknown[:1]!r}; "
                              "expected some of ['image', 'text', 'fused']")
        _require(bool(self.neighbour_ks) and min(self.neighbour_ks) >= 1,
                 f"extract.neighbour_ks must be a non-empty list of k >= 1, got {list(self.neighbour_ks)!r}")
        _require(self.user_neighbour_snapshots >= 0,
                 f"extract.user_neighbour_snapshots must be >= 0, got {self.user_neighbour_snapshots!r}")
        _require(self.neighbour_min_pool >= 1,
                 f"extract.neighbour_min_pool must be >= 1, got {self.neighbour_min_pool!r}")
        _require(self.neighbour_exact_rows >= 0,
                 f"extract.neighbour_exact_rows must be >= 0, got {self.neighbour_exact_rows!r}")
        _require(self.neighbour_block_rows >= 1,
                 f"extract.neighbour_block_rows must be >= 1, got {self.neighbour_block_rows!r}")


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune search over LightGBM and CatBoost, the refit and the blend."""

    models: tuple[str, ...] = ("lightgbm", "catboost")
    """Model families searched (lightgbm, catboost)."""
    num_samples: int = 8
    """Trials per model family."""
    time_budget_s: float = 0.0
    """Wall-clock budget per model family in seconds (0: none)."""
    max_concurrent_trials: int = 1
    """Trials run at once; leave CPUs for Ray Data."""
    trial_resources: tuple[str, ...] = ()
    """Custom Ray resources each Tune trial requests, as NAME=AMOUNT (pins trials to nodes)."""
    cpus_per_trial: float = 1.0
    """Logical CPUs (and GBDT threads) per trial."""
    search_alg: Literal["optuna", "random", "optuna_multi"] = "optuna"
    """Seeded search algorithm: Optuna's TPE on ``tune.objective``, random search, or ``optuna_multi``: Optuna's multi-objective TPE on (val SRC, val MAE), which spreads the trials along their Pareto front (the best trial is still chosen by ``tune.objective``)."""
    max_rounds: int = 400
    """Boosting rounds per trial (ASHA stops weak trials earlier)."""
    grace_rounds: int = 50
    """ASHA grace period in boosting rounds."""
    report_every: int = 10
    """Trials report val_src/val_mae/val_score to Tune (and MLflow) every this many rounds (and at the last); long trials report at most ~200 times."""
    shared_data: bool = True
    """Read and encode train/val once on the driver and share them with every trial through Ray's object store (one read-only copy per node, no private copy per trial); false: each trial reads the features itself."""
    engine: Literal["local", "ray_train"] = "local"
    """How a LightGBM trial and refit fit: ``local``, in one process on one node; ``ray_train``, data-parallel across ``tune.train_workers`` Ray Train workers reading Ray Data shards (feature sets beyond one node's memory; CatBoost still fits on one node)."""
    train_workers: int = 2
    """Ray Train workers per LightGBM fit with ``tune.engine: ray_train`` (each holds ``tune.cpus_per_trial`` CPUs)."""
    validation: Literal["time", "group"] = "time"
    """``time``: the time-ordered val split; ``group``: GroupKFold by user over train+val."""
    folds: int = 3
    """Folds of the grouped validation."""
    objective: Literal["src", "mae", "src+mae"] = "src+mae"
    """What the search, the best round, the best trial and the blend weights maximise on val: SRC, the MAE skill (1 - MAE / MAE of the training median), or their mean (the challenge ranks by both)."""
    min_val_posts: int = 20
    """Fewest val (and train) posts the search runs on; checked after prepare and before any trial (a choice made on fewer is noise)."""
    min_rounds: int = 0
    """The best round of a trial is chosen among rounds >= this (0: any); guards a small val split against an early, noisy pick."""
    calibrate: bool = True
    """Map each model's and the blend's score to the label scale with a strictly increasing (rank-preserving) fit on val: SRC unchanged, MAE lower."""
    refit_on: Literal["train", "train+val"] = "train"
    """Data the best configuration is refit on."""
    fit_on_selected: bool = False
    """Fit the regressors (trials and refit) on the train posts the train stage's sample selection kept; val and test stay whole."""
    selected_ids: str = ""
    """A kept-ids Parquet to fit on with fit_on_selected; empty: the one the train stage recorded (the pipeline's, or `smpp tune --train`)."""
    feature_groups: tuple[str, ...] = ()
    """Feature groups used (empty: all); e.g. [user, time] for a metadata-only model."""
    registered_model_prefix: str = "smpp"
    """Registered MLflow model names are <prefix>-lightgbm, <prefix>-catboost and <prefix>-scorer (the whole scorer)."""
    champion_alias: str = "champion"
    """Alias the tune stage sets on the <prefix>-scorer version it registered (empty: none)."""
    seed: int = 0
    """Seed of the search algorithm and of the models."""
    interrupt_after_trials: int = 0
    """Testing aid: interrupt each search as Ctrl+C would after this many trials complete (0: never)."""

    def __post_init__(self) -> None:
        parse_resources(self.trial_resources, "tune.trial_resources")
        _require(1 <= self.report_every <= self.grace_rounds,
                 f"tune.report_every ({self.report_every}) must be in [1, tune.grace_rounds ({self.grace_rounds})]")
        _require(self.interrupt_after_trials >= 0,
                 f"tune.interrupt_after_trials must be >= 0, got {self.interrupt_after_trials!r}")
        unknown = set(self.models) - {"lightgbm", "catboost"}
        _require(not unknown and len(self.models) > 0,
                 f"tune.models must be a non-empty subset of [lightgbm, catboost], got {list(self.models)!r}")
        _require(self.num_samples >= 1, f"tune.num_samples must be >= 1, got {self.num_samples!r}")
        _require(self.time_budget_s >= 0, f"tune.time_budget_s must be >= 0, got {self.time_budget_s!r}")
        _require(self.max_concurrent_trials >= 1,
                 f"tune.max_concurrent_trials must be >= 1, got {self.max_concurrent_trials!r}")
        _require(self.max_rounds >= 1 and 1 <= self.grace_rounds <= self.max_rounds,
                 f"tune.grace_rounds ({self.grace_rounds}) must be in [1, tune.max_rounds ({self.max_rounds})]")
        _require(self.folds >= 2, f"tune.folds must be >= 2, got {self.folds!r}")
        _require(self.objective in ("src", "mae", "src+mae"),
                 f"unknown tune.objective {self.objective!r}; expected src, mae or src+mae")
        _require(self.engine in ("local", "ray_train"),
                 f"unknown tune.engine {self.engine!r}; expected local or ray_train")
        _require(self.train_workers >= 1, f"tune.train_workers must be >= 1, got {self.train_workers!r}")
        _require(self.engine == "local" or (self.validation == "time" and not self.fit_on_selected),
                 "tune.engine ray_train supports tune.validation time only, without tune.fit_on_selected "
                 f"(got validation {self.validation!r}, fit_on_selected {self.fit_on_selected!r})")
        _require(self.min_val_posts >= 2, f"tune.min_val_posts must be >= 2, got {self.min_val_posts!r}")
        _require(0 <= self.min_rounds <= self.max_rounds,
                 f"tune.min_rounds ({self.min_rounds}) must be in [0, tune.max_rounds ({self.max_rounds})]")


@dataclass(frozen=True)
class ServeConfig:
    """The online endpoint (``smpp serve``): a Ray Serve application."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; 0.0.0.0 only behind your own network controls."""
    port: int = 8000
    """HTTP port of the endpoint."""
    replicas: int = 1
    """Scoring replicas (each loads the whole scorer)."""
    cpus_per_replica: float = 1.0
    """Logical CPUs per replica."""
    gpus_per_replica: float = 0.0
    """GPUs per replica (0 on CPU)."""
    max_batch_size: int = 16
    """Posts batched into one forward pass across concurrent requests (@serve.batch)."""
    batch_wait_timeout_s: float = 0.01
    """How long a batch waits to fill before it runs."""
    max_posts_per_request: int = 256
    """Larger requests get 413: send big jobs to `smpp predict`."""

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, f"serve.port must be in 1..65535, got {self.port!r}")
        _require(self.replicas >= 1, f"serve.replicas must be >= 1, got {self.replicas!r}")
        _require(self.max_batch_size >= 1, f"serve.max_batch_size must be >= 1, got {self.max_batch_size!r}")
        _require(self.max_posts_per_request >= 1,
                 f"serve.max_posts_per_request must be >= 1, got {self.max_posts_per_request!r}")
        _require(self.batch_wait_timeout_s >= 0, f"serve.batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s!r}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    enabled: bool = True
    """Record runs in MLflow."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty uses $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlruns.db (a local out only)."""
    experiment: str = "smpp"
    """MLflow experiment name."""


@dataclass(frozen=True)
class RayConfig:
    """How the driver connects to Ray."""

    address: str = ""
    """Ray address (``auto`` inside ``ray job submit``); empty starts a local Ray unless RAY_ADDRESS is set."""
    num_cpus: int = 0
    """Logical CPUs of a local Ray (0: max(4, physical cores)); more than cores so trainers do not starve Ray Data."""
    object_store_memory_mb: int = 0
    """Object store size of a local Ray in MiB (0: Ray's default)."""


@dataclass(frozen=True)
class Config:
    """The whole configuration of a pipeline run."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ---------------------------------------------------------------------------------------------
# Loading


#: Field names that count a resource (CPUs, GPUs, memory, workers, actors): never negative.
_RESOURCE = re.compile(r"cpus|gpus|memory|workers|actors|replicas")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(annotation)
        _require(value in allowed, f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), f"{key}: expected a list, got {value!r}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {annotation}")
    if annotation is bool:
        _require(isinstance(value, bool), f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}: expected a number, got {value!r}")
        # YAML reads .inf and .nan as floats; no setting means either (a NaN passes every > check)
        _require(math.isfinite(value), f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        _require(isinstance(value, str), f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    _require(isinstance(values, dict), f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(f"unknown config key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
                          f"known keys: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            # `--set train=0` must not silently reset the section to its defaults
            _require(raw is None or isinstance(raw, dict), f"{key} is a section (a mapping of keys), got {raw!r}")
            kwargs[name] = _build(annotation, raw or {}, key)
        else:
            kwargs[name] = _coerce(raw, annotation, key)
        if _RESOURCE.search(name) and isinstance(kwargs[name], (int, float)):
            _require(kwargs[name] >= 0, f"{key} is an amount of a resource and must be >= 0, got {kwargs[name]!r}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a YAML-typed value (``3`` -> 3, ``[a, b]`` -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    _require(len(path) >= 1, f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return path, value


def _merge(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        _require(isinstance(child, dict), f"override {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a :class:`Config` from an optional YAML file and ``section.key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        _require(isinstance(loaded, dict), f"config file {str(path)!r} must hold a mapping at the top level")
        tree = loaded
    for text in overrides:
        key_path, value = parse_override(text)
        _merge(tree, key_path, value)
    try:
        return _build(Config, tree, "")
    except TypeError as err:  # a section given a scalar, e.g. --set model=3
        raise ConfigError(str(err)) from err


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists) for YAML, JSON and checkpoints."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def config_from_dict(values: dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict`."""
    return _build(Config, values, "")


def flatten_config(config: Any) -> dict[str, Any]:
    """``{"train.lr": 0.002, ...}``: the form MLflow params take, with credentials in any location
    (``http://user:PASSWORD@host``) redacted: params are shown to everyone who can read the run."""
    from smpp_ray.redact import redact_values

    return redact_values(flatten_config_dict(config_to_dict(config)))


def flatten_config_dict(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested dict."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_config_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------
# Reference documentation, generated from the field docstrings


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (litgpt style), by field name."""
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def config_reference_markdown() -> str:
    """A Markdown table per config section: key, type, default, meaning (embedded in README)."""
    lines: list[str] = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines += [f"#### `{section.name}` — {(cls.__doc__ or '').strip()}", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        docs = field_docs(cls)
        section_hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            kind = str(section_hints[f.name]).replace("typing.", "").replace("|", "\\|")
            kind = kind.replace("<class '", "").replace("'>", "")
            value = config_to_dict(default)[f.name]
            lines.append(f"| `{section.name}.{f.name}` | {kind} | `{value!r}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)
