"""The Ray Data side of training: Parquet shards -> decoded, tokenised batches -> torch tensors.

Nothing here materialises a split: ``read_parquet`` streams the shards, ``map_batches`` decodes
JPEGs and tokenises text in CPU tasks, and Ray Train hands each worker a streaming shard of the
train split (``DataConfig(datasets_to_split=["train"])``) while the val split stays whole.
The dataset is a location (local folder or URI): the read tasks fetch the shards themselves on
whichever node they run.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from smpp_ray import storage
from smpp_ray.data.dataset import Dataset
from smpp_ray.data.reads import parquet_rows, read_parquet
from smpp_ray.model.backbone import BackboneSpec

logger = logging.getLogger(__name__)

#: Columns the preprocessor needs; reading only these skips geo/user columns in the shards.
INPUT_COLUMNS = ["pid", "uid", "image", "title", "tags", "subcategory_id", "category_id", "label",
                 "postdate"]

#: Columns that stay Python strings after collation (ids, not tensors).
STRING_COLUMNS = ("pid", "uid")

#: Rows per preprocessing task; big enough to amortise task overhead, small enough to stream.
PREPROCESS_BATCH_ROWS = 64


def count_rows(data_dir: str, split: str) -> int:
    """Rows of one split from the Parquet footers (no data pages are read)."""
    location = Dataset(storage.normalize(data_dir)).posts(split)
    try:
        return parquet_rows(location)
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"no Parquet shards for split {split!r} at {location!r}; "
                                "run `smpp prepare` first") from err


def create_split_dataset(data_dir: str, split: str, spec: BackboneSpec, *, train: bool, kept_ids: str = ""):
    """A lazy Ray Dataset of one split, decoded and tokenised by the model's BatchPreprocessor.

    ``train`` switches on the preprocessor's augmentation (random resized crop + flip).
    ``kept_ids`` (a location) puts a :class:`~smpp_ray.data.selection.KeptPostsFilter` ahead of
    decoding: every post passes until sample selection writes that file, then only its posts. The
    preprocessor instance is a plain callable, so Ray Data runs it in stateless CPU tasks that
    hold no CPUs between epochs; an actor pool would pin CPUs that the training workers and the
    other split's pipeline also need on a small machine.
    """

    from smpp_ray.model.preprocess import BatchPreprocessor

    path = Dataset(storage.normalize(data_dir)).posts(split)
    rows = count_rows(data_dir, split)
    if rows == 0:
        raise ValueError(f"split {split!r} at {path!r} has no rows; training needs train and val posts")
    preprocessor = BatchPreprocessor(spec.backbone, spec.image_size, spec.context_length, train,
                                     mean=spec.mean, std=spec.std)
    dataset = read_parquet(path).select_columns(INPUT_COLUMNS)
    if kept_ids:
        from smpp_ray.data.selection import KeptPostsFilter

        # Same compute as the preprocessor, so Ray Data fuses the two into one task per batch.
        dataset = dataset.map_batches(KeptPostsFilter(kept_ids), batch_size=PREPROCESS_BATCH_ROWS,
                                      batch_format="pyarrow", num_cpus=1)
    return dataset.map_batches(preprocessor, batch_size=PREPROCESS_BATCH_ROWS, batch_format="numpy",
                               num_cpus=1)


def collate_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Numeric columns become tensors; ``pid``/``uid`` stay a list of strings (cache keys, probes)."""
    out: dict[str, Any] = {}
    for name, values in batch.items():
        if name in STRING_COLUMNS or values.dtype.kind in ("U", "S", "O"):
            out[name] = [str(v) for v in values]
        else:
            # Ray hands out read-only views of object-store memory; torch needs a writable array.
            out[name] = torch.from_numpy(values if values.flags.writeable else values.copy())
    return out


class CollateBatch(NumpyBatchCollateFn):
    """:func:`collate_batch` as the collate class ``iter_torch_batches`` expects.

    ``iter_torch_batches`` cannot turn string columns into tensors, hence a collate function.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return collate_batch(batch)


def iterate_torch(iterator, batch_size: int, *, train: bool, seed: int | None = None, prefetch_batches: int = 1):
    """Collated torch batches from a Ray ``DataIterator`` (a worker's shard or the whole val split).

    Train batches get a local shuffle buffer so consecutive batches mix shards; the device move
    is left to the loop so the same batches feed CPU and GPU runs. ``prefetch_batches`` are
    fetched and collated in the background while the step runs.
    """
    return iterator.iter_torch_batches(
        batch_size=batch_size, collate_fn=CollateBatch(), drop_last=False, prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=4 * batch_size if train else None,
        local_shuffle_seed=seed if train else None)
