"""The CPU stage shared by prototypes, training and extraction: decode JPEGs, tokenise text.

:class:`BatchPreprocessor` is a callable class for Ray Data ``map_batches`` (or plain calls in
tests). Construction only stores arguments, so it pickles small and is cheap to build; the
tokenizer and transforms are created on the first batch in the process that runs it.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Columns copied from prepared posts to the output (nulls filled as documented).
PASSTHROUGH_ID_COLUMNS = ("subcategory_id", "category_id")
PASSTHROUGH_COLUMNS = ("pid", "uid", "subcategory_id", "category_id", "label", "postdate")


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def post_texts(titles: Any, tags: Any, size: int) -> list[str]:
    """``title + " " + tags`` per post, nulls as empty strings."""
    titles = [""] * size if titles is None else titles
    tags = [""] * size if tags is None else tags
    return [f"{_as_text(t)} {_as_text(g)}".strip() for t, g in zip(titles, tags, strict=True)]


def _ids(values: np.ndarray) -> np.ndarray:
    """Nullable integer ids (None / NaN / masked) to int64 with -1 for missing."""
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        out[i] = -1 if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
    return out


def _floats(values: np.ndarray) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


class BatchPreprocessor:
    """Decode ``image`` JPEG bytes to ``pixels`` and tokenise ``title + " " + tags`` to ``tokens``.

    Output of ``__call__``: ``pixels`` float32 ``(B, 3, H, W)`` normalised with the CLIP mean/std
    (random-resized-crop + horizontal flip when ``train``, resize + centre crop otherwise),
    ``tokens`` int64 ``(B, L)``, and the pass-through columns ``pid``, ``uid``, ``postdate``,
    ``subcategory_id``, ``category_id`` (int64, null -> -1), ``label`` (float64, null -> NaN)
    for those present in the input. ``image`` and every other column are dropped.
    """

    def __init__(self, backbone_name: str, image_size: int, context_length: int, train: bool,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.backbone_name = backbone_name
        self.image_size = int(image_size)
        self.context_length = int(context_length)
        self.train = bool(train)
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self._tokenizer = None
        self._transform = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # rebuilt lazily where the batch runs
        state["_transform"] = None
        return state

    def _setup(self) -> None:
        import open_clip
        from torchvision import transforms as T

        from smpp_ray.model import backbone as _backbone  # noqa: F401  registers packaged configs

        self._tokenizer = open_clip.get_tokenizer(self.backbone_name, context_length=self.context_length or None)
        mean = self.mean or open_clip.OPENAI_DATASET_MEAN
        std = self.std or open_clip.OPENAI_DATASET_STD
        bicubic = T.InterpolationMode.BICUBIC
        if self.train:
            geometry = [T.RandomResizedCrop(self.image_size, scale=(0.6, 1.0), interpolation=bicubic),
                        T.RandomHorizontalFlip()]
        else:
            geometry = [T.Resize(self.image_size, interpolation=bicubic), T.CenterCrop(self.image_size)]
        self._transform = T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])

    def decode_images(self, images: Any, pids: Any = None) -> np.ndarray:
        """JPEG bytes -> normalised ``(B, 3, H, W)`` float32."""
        from PIL import Image

        if self._transform is None:
            self._setup()
        out = np.empty((len(images), 3, self.image_size, self.image_size), dtype=np.float32)
        for i, data in enumerate(images):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    out[i] = self._transform(image.convert("RGB")).numpy()
            except Exception as err:  # a corrupt image names its post instead of killing the batch silently
                pid = pids[i] if pids is not None else f"row {i}"
                raise ValueError(f"cannot decode image of post {pid!r}: {err}") from err
        return out

    def tokenize(self, texts: list[str]) -> np.ndarray:
        if self._tokenizer is None:
            self._setup()
        return self._tokenizer(texts).numpy().astype(np.int64)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # a pandas batch
            batch = {c: batch[c].to_numpy() for c in batch.columns}
        if "image" not in batch:
            raise ValueError(f"batch has no 'image' column; columns: {sorted(batch)}")
        pids = batch.get("pid")
        size = len(batch["image"])
        out: dict[str, np.ndarray] = {
            "pixels": self.decode_images(batch["image"], pids),
            "tokens": self.tokenize(post_texts(batch.get("title"), batch.get("tags"), size)),
        }
        for name in PASSTHROUGH_COLUMNS:
            if name not in batch:
                continue
            values = np.asarray(batch[name])
            if name in PASSTHROUGH_ID_COLUMNS:
                out[name] = _ids(values)
            elif name == "label":
                out[name] = _floats(values)
            elif name == "postdate":
                out[name] = values.astype(np.int64)
            else:
                out[name] = np.array([_as_text(v) for v in values], dtype=object)
        return out
