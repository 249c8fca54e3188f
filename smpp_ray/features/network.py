"""Network features of a trained checkpoint as a Ray Data callable class.

:class:`NetworkFeatureExtractor` loads the checkpoint (trainable state, prototypes, the frozen
backbone rebuilt from its config) once per actor in ``__init__``, from the checkpoint's location
(local or ``s3://``: the loader fetches it into the actor node's cache), and maps a batch that
the CPU stage (:func:`decode_batch`) has tokenised, and decoded unless ``extract.gpu_decode``
(then :class:`DeviceImageDecoder` decodes the JPEG bytes on the actor's device), to features,
under ``torch.inference_mode()`` and bf16 autocast on CUDA. It is a plain class: tests call it
directly, without Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import numpy as np

from smpp_ray import console

logger = logging.getLogger(__name__)

#: Tensor outputs written per post (name -> what it is); all float32 (B, K).
TENSOR_OUTPUTS = {
    "fused": "fused vector of the cross-modal attention",
    "prob_sub": "softmax over the 77 subcategories",
    "prob_cat": "softmax over the 11 categories",
    "sim_visual": "similarity to each visual prototype (77 subcategory rows, then 11 category rows)",
    "sim_text": "similarity to each textual prototype (same order)",
    "image_embedding": "image embedding (reduced by the train-only PCA in the output)",
    "text_embedding": "post text embedding (reduced by the train-only PCA in the output)",
}
#: Integer outputs per post.
CLASS_OUTPUTS = ("pred_subcategory", "pred_category")

_PREPROCESSORS: dict[tuple, Any] = {}


def _preprocessor(backbone: str, image_size: int, context_length: int, mean: tuple[float, ...] | None,
                  std: tuple[float, ...] | None):
    """The eval :class:`BatchPreprocessor`, cached per process: Ray reuses task workers, so the
    tokenizer is built once per process rather than once per batch."""
    from smpp_ray.model.preprocess import BatchPreprocessor

    key = (backbone, image_size, context_length, mean, std)
    preprocessor = _PREPROCESSORS.get(key)
    if preprocessor is None:
        preprocessor = BatchPreprocessor(backbone, image_size, context_length, train=False, mean=mean, std=std)
        _PREPROCESSORS[key] = preprocessor
    return preprocessor


def decode_batch(batch: dict[str, np.ndarray], *, backbone: str, image_size: int, context_length: int,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 decode_images: bool = True) -> dict[str, np.ndarray]:
    """CPU stage: JPEG bytes -> ``pixels``, text -> ``tokens`` (eval transforms), keeping ``pid``/``split``.

    ``decode_images`` False (``extract.gpu_decode``) only tokenises: the JPEG bytes go on as
    ``image`` for the actor's :class:`DeviceImageDecoder`.
    """
    from smpp_ray.model.preprocess import _as_text, post_texts

    preprocessor = _preprocessor(backbone, image_size, context_length, mean, std)
    if decode_images:
        decoded = preprocessor({name: batch[name] for name in ("pid", "image", "title", "tags") if name in batch})
        out = {"pid": decoded["pid"], "pixels": decoded["pixels"], "tokens": decoded["tokens"]}
    else:
        size = len(batch["image"])
        out = {"pid": np.array([_as_text(p) for p in batch["pid"]], dtype=object),
               "image": np.asarray(batch["image"], dtype=object),
               "tokens": preprocessor.tokenize(post_texts(batch.get("title"), batch.get("tags"), size))}
    if "split" in batch:
        out["split"] = np.asarray(batch["split"])
    return out


#: What every JPEG starts with (SOI marker + the first segment's marker byte).
JPEG_MAGIC = b"\xff\xd8\xff"


class DeviceImageDecoder:
    """JPEG bytes -> normalised ``(B, 3, S, S)`` float32 on ``device``: the eval transform of
    :class:`~smpp_ray.model.preprocess.BatchPreprocessor` (bicubic resize of the shorter side to
    ``S``, centre crop, CLIP mean/std) with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA).

    The resized pixels are clamped and rounded to 0..255 as PIL's 8-bit resize leaves them, so
    only the resampling kernels differ from the CPU path. Images that are not JPEG (prepare
    stores JPEG only, but a dataset written by another tool may not) fall back to that CPU path,
    one warning per decoder; a corrupt JPEG raises ValueError naming its post.
    """

    def __init__(self, image_size: int, device: Any, *, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, backbone: str = "", context_length: int = 0) -> None:
        import open_clip
        import torch

        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.mean = torch.tensor(mean or open_clip.OPENAI_DATASET_MEAN, dtype=torch.float32,
                                 device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std or open_clip.OPENAI_DATASET_STD, dtype=torch.float32,
                                device=self.device).view(1, 3, 1, 1)
        self._fallback_args = (backbone, self.image_size, context_length,
                               tuple(mean) if mean else None, tuple(std) if std else None)
        self.fallbacks = 0

    def __call__(self, images: Any, pids: Any = None) -> Any:
        import torch

        out = torch.empty((len(images), 3, self.image_size, self.image_size), dtype=torch.float32, device=self.device)
        jpeg = [i for i, data in enumerate(images) if bytes(data[:3]) == JPEG_MAGIC]
        others = sorted(set(range(len(images))) - set(jpeg))
        if jpeg:
            out[jpeg] = self._decode_jpegs([images[i] for i in jpeg], [pids[i] if pids is not None else f"row {i}"
                                                                      for i in jpeg])
        if others:
            if not self.fallbacks:
                logger.warning("%d image(s) of a batch are not JPEG (e.g. post %r): decoding them on the CPU "
                               "with PIL", len(others), pids[others[0]] if pids is not None else others[0])
            self.fallbacks += len(others)
            pil = _preprocessor(*self._fallback_args).decode_images(
                [images[i] for i in others], [pids[i] for i in others] if pids is not None else None)
            out[others] = torch.from_numpy(pil).to(self.device)
        return out

    def _decode_jpegs(self, images: list, pids: list) -> Any:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            decoded = [self._decode_one(d, pid) for d, pid in zip(data, pids, strict=True)]  # names the bad post
        size = self.image_size
        crops = []
        for image in decoded:  # (3, H, W) uint8; sizes differ, so resize one by one
            resized = F.resize(image.float(), [size], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
            crops.append(F.center_crop(resized.clamp_(0, 255).round_(), [size, size]))
        pixels = torch.stack(crops) / 255.0  # (B, 3, S, S)
        return (pixels - self.mean) / self.std

    def _decode_one(self, data: Any, pid: Any) -> Any:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as err:
            raise ValueError(f"cannot decode image of post {pid!r}: {err}") from err


def outputs_to_numpy(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Model outputs (``SMPPModel.forward``'s dict) -> the per-post feature arrays."""
    import torch

    logits_sub = outputs["logits_sub"].float()
    logits_cat = outputs["logits_cat"].float()
    tensors = {
        "fused": outputs["fused"],
        "prob_sub": torch.softmax(logits_sub, dim=-1),
        "prob_cat": torch.softmax(logits_cat, dim=-1),
        "sim_visual": outputs["proto_sim_visual"],
        "sim_text": outputs["proto_sim_text"],
        "image_embedding": outputs["image_embedding"],
        "text_embedding": outputs["text_embedding"],
    }
    out = {name: value.float().cpu().numpy() for name, value in tensors.items()}
    out["pred_subcategory"] = outputs["pred_subcategory"].cpu().numpy().astype(np.int64)
    out["pred_category"] = outputs["pred_category"].cpu().numpy().astype(np.int64)  # parent of pred_subcategory
    return out


class NetworkFeatureExtractor:
    """Callable class for ``map_batches``: decoded batch -> network features per post.

    Input columns: ``pid``, ``pixels`` (B, 3, H, W) float32 or, with ``image_size`` given, the
    JPEG bytes as ``image`` (decoded here by :class:`DeviceImageDecoder`), ``tokens`` (B, L)
    int64 and optionally ``split`` (passed through). Output: ``pid``, [``split``], the float32
    arrays of :data:`TENSOR_OUTPUTS` and :data:`CLASS_OUTPUTS`, ``worker`` (host:pid of the
    actor, so a run can show how many actors did the work) and ``finished_at`` (unix seconds).
    On CUDA the model runs under bf16 autocast; on CPU in float32.

    ``checkpoint_dir`` is a location, never a path on the driver's disk: the actor loads it on
    its own node. ``pretrained`` replaces the backbone weights location the checkpoint names.
    ``image_size``, ``mean``, ``std``, ``backbone`` and ``context_length`` (the checkpoint's
    input spec) enable decoding ``image`` bytes on the device.
    """

    def __init__(self, checkpoint_dir: str, device: str = "auto", num_threads: int = 0,
                 pretrained: str | None = None, *, image_size: int = 0, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, backbone: str = "", context_length: int = 0) -> None:
        import torch

        from smpp_ray.model.checkpoint import load_model_from_checkpoint

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = load_model_from_checkpoint(checkpoint_dir, device=self.device, pretrained=pretrained)
        self.image_decoder = (DeviceImageDecoder(image_size, self.device, mean=mean, std=std, backbone=backbone,
                                                 context_length=context_length) if image_size > 0 else None)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        console.details(__name__).info("feature extractor %s loaded %s on %s", self.worker, checkpoint_dir,
                                       self.device)

    def _pixels(self, batch: dict[str, np.ndarray]) -> Any:
        import torch

        if "pixels" in batch:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"], dtype=np.float32))
            return pixels.to(self.device, non_blocking=self.device.type == "cuda")
        if "image" not in batch:
            raise ValueError(f"batch has neither 'pixels' nor 'image'; columns: {sorted(batch)}")
        if self.image_decoder is None:
            raise ValueError("batch brings JPEG bytes ('image') but this extractor was built without image_size: "
                             "pass the checkpoint's input spec to decode on the device (extract.gpu_decode)")
        return self.image_decoder(batch["image"], batch.get("pid"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from smpp_ray.model.precision import autocast

        tokens = torch.from_numpy(np.ascontiguousarray(batch["tokens"], dtype=np.int64))
        with torch.inference_mode():
            pixels = self._pixels(batch)
            with autocast(self.device):
                outputs = self.model(pixels, tokens.to(self.device, non_blocking=self.device.type == "cuda"))
            features = outputs_to_numpy(outputs)  # every float output cast to float32 first
        features["pid"] = np.asarray(batch["pid"])
        if "split" in batch:
            features["split"] = np.asarray(batch["split"])
        features["worker"] = np.full(len(features["pid"]), self.worker, dtype=object)
        # When the batch left the model: lets a run measure its steady-state throughput.
        features["finished_at"] = np.full(len(features["pid"]), time.time(), dtype=np.float64)
        return features
