"""Network features of a trained checkpoint as a Ray Data callable class.

:class:`NetworkFeatureExtractor` loads the checkpoint (trainable state, prototypes, the frozen
backbone rebuilt from its config) once per actor in ``__init__``, from the checkpoint's location
(local or ``s3://``: the loader fetches it into the actor node's cache), and maps a batch that
the CPU stage (:func:`decode_batch`) has already decoded and tokenised to features, under
``torch.inference_mode()``. It is a plain class: tests call it directly, without Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import numpy as np

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


def decode_batch(batch: dict[str, np.ndarray], *, backbone: str, image_size: int, context_length: int,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> dict[str, np.ndarray]:
    """CPU stage: JPEG bytes -> ``pixels``, text -> ``tokens`` (eval transforms), keeping ``pid``/``split``.

    The preprocessor is cached per worker process: Ray reuses task workers, so the tokenizer is
    built once per process rather than once per batch.
    """
    from smpp_ray.model.preprocess import BatchPreprocessor

    key = (backbone, image_size, context_length, mean, std)
    preprocessor = _PREPROCESSORS.get(key)
    if preprocessor is None:
        preprocessor = BatchPreprocessor(backbone, image_size, context_length, train=False, mean=mean, std=std)
        _PREPROCESSORS[key] = preprocessor
    decoded = preprocessor({name: batch[name] for name in ("pid", "image", "title", "tags") if name in batch})
    out = {"pid": decoded["pid"], "pixels": decoded["pixels"], "tokens": decoded["tokens"]}
    if "split" in batch:
        out["split"] = np.asarray(batch["split"])
    return out


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

    Input columns: ``pid``, ``pixels`` (B, 3, H, W) float32, ``tokens`` (B, L) int64 and
    optionally ``split`` (passed through). Output: ``pid``, [``split``], the arrays of
    :data:`TENSOR_OUTPUTS` and :data:`CLASS_OUTPUTS`, ``worker`` (host:pid of the actor, so a
    run can show how many actors did the work) and ``finished_at`` (unix seconds).

    ``checkpoint_dir`` is a location, never a path on the driver's disk: the actor loads it on
    its own node. ``pretrained`` replaces the backbone weights location the checkpoint names.
    """

    def __init__(self, checkpoint_dir: str, device: str = "auto", num_threads: int = 0,
                 pretrained: str | None = None) -> None:
        import torch

        from smpp_ray.train.checkpoint import load_model_from_checkpoint

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = load_model_from_checkpoint(checkpoint_dir, device=self.device, pretrained=pretrained)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        logger.info("feature extractor %s loaded %s on %s", self.worker, checkpoint_dir, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"], dtype=np.float32))
        tokens = torch.from_numpy(np.ascontiguousarray(batch["tokens"], dtype=np.int64))
        non_blocking = self.device.type == "cuda"
        with torch.inference_mode():
            outputs = self.model(pixels.to(self.device, non_blocking=non_blocking),
                                 tokens.to(self.device, non_blocking=non_blocking))
            features = outputs_to_numpy(outputs)
        features["pid"] = np.asarray(batch["pid"])
        if "split" in batch:
            features["split"] = np.asarray(batch["split"])
        features["worker"] = np.full(len(features["pid"]), self.worker, dtype=object)
        # When the batch left the model: lets a run measure its steady-state throughput.
        features["finished_at"] = np.full(len(features["pid"]), time.time(), dtype=np.float64)
        return features
