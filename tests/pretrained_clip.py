"""A tiny open_clip CLIP that has really learned an image-text alignment, for tests.

Every other test runs a randomly initialised backbone, which cannot show what the method does
with a pretrained CLIP (CoOp's zero-shot start, prototypes that mean something). Here the
packaged ``smpp-tiny-clip`` is trained contrastively, from scratch on CPU, on synthetic
coloured shapes captioned with their class name ("a photo of a red circle.", "a blue
triangle.", ...), then saved as an open_clip checkpoint file that ``model.pretrained`` loads.

:func:`train_tiny_clip` is a plain function (a benchmark can call it too);
:func:`pretrained_clip_file` builds the checkpoint once per test run for the session fixtures
of the test modules that use it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from smpp_ray.data.schema import Taxonomy
from smpp_ray.model.backbone import TINY_MODEL

logger = logging.getLogger(__name__)

COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.25, 0.9),
           "yellow": (0.9, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
#: Subcategory ``colour * len(SHAPES) + shape``; its category is the shape.
TAXONOMY = Taxonomy(SHAPES, tuple(f"{c} {s}" for c in COLOURS for s in SHAPES),
                    tuple(i % len(SHAPES) for i in range(len(COLOURS) * len(SHAPES))))
TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}.", "a {} on a grey background.",
             "this is a {}.", "a small {}.", "a big {}.")
IMAGE_SIZE = 64


def render(class_ids: np.ndarray, seed: int, mean: tuple[float, ...] = open_clip.OPENAI_DATASET_MEAN,
           std: tuple[float, ...] = open_clip.OPENAI_DATASET_STD) -> torch.Tensor:
    """Normalised pixels ``(N, 3, 64, 64)``: one coloured shape per image on a noisy grey ground,
    at a random place and size; the same ``seed`` draws the same images."""
    rng = np.random.default_rng(seed)
    n = len(class_ids)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    colours = np.array(list(COLOURS.values()), dtype=np.float32)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    for i, class_id in enumerate(class_ids):
        colour_id, shape_id = divmod(int(class_id), len(SHAPES))
        radius = rng.uniform(12, 20)
        cx, cy = rng.uniform(radius, IMAGE_SIZE - radius, size=2)
        if SHAPES[shape_id] == "circle":
            inside = (x - cx) ** 2 + (y - cy) ** 2 < radius ** 2
        elif SHAPES[shape_id] == "square":
            side = radius * 0.85
            inside = (np.abs(x - cx) < side) & (np.abs(y - cy) < side)
        else:  # an upward triangle: apex at the top, base at the bottom
            top, bottom = cy - radius, cy + radius
            inside = (y > top) & (y < bottom) & (np.abs(x - cx) < (y - top) / 2)
        ground = rng.uniform(0.35, 0.65)
        image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), ground, dtype=np.float32)
        image[inside] = np.clip(colours[colour_id] + rng.normal(0, 0.05, 3), 0, 1)
        images[i] = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def captions(class_ids: np.ndarray, seed: int) -> list[str]:
    """One caption per image: a random template around the class name."""
    rng = np.random.default_rng(seed)
    return [TEMPLATES[rng.integers(len(TEMPLATES))].format(TAXONOMY.subcategories[int(c)]) for c in class_ids]


def train_tiny_clip(path: str | Path, *, steps: int = 300, per_class: int = 4, pool_per_class: int = 64,
                    lr: float = 2e-3, seed: int = 0) -> Path:
    """Train ``smpp-tiny-clip`` contrastively on synthetic captioned shapes; save its state dict.

    Each step draws ``per_class`` images of every class from a pool of ``pool_per_class``
    rendered once (seed ``seed``; held-out images should use another seed); the InfoNCE counts every same-class
    pair as a positive (the captions of a class differ only by template, so treating them as
    negatives would fight the task). Returns ``path`` (an open_clip checkpoint file).
    """
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.create_model(TINY_MODEL, pretrained=None)
        tokenizer = open_clip.get_tokenizer(TINY_MODEL)
        clip.train()
        # The 49k-row token table stays at its random init: captions use a few dozen of its rows,
        # and updating all of them is most of a CPU step's time.
        clip.token_embedding.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        num_classes = TAXONOMY.num_subcategories
        pool_classes = np.repeat(np.arange(num_classes), pool_per_class)
        pool = render(pool_classes, seed=seed)  # (num_classes * pool_per_class, 3, 64, 64)
        rng = np.random.default_rng(seed)
        classes = np.repeat(np.arange(num_classes), per_class)
        same = torch.from_numpy(classes[:, None] == classes[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)  # (N, N) rows sum to one
        for step in range(steps):
            picks = classes * pool_per_class + rng.integers(pool_per_class, size=len(classes))
            pixels = pool[torch.from_numpy(picks)]
            tokens = tokenizer(captions(classes, seed=seed * 100_003 + step))
            image = F.normalize(clip.encode_image(pixels), dim=-1)
            text = F.normalize(clip.encode_text(tokens), dim=-1)
            logits = clip.logit_scale.exp() * image @ text.t()  # (N, N)
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, np.log(100.0))
    path = Path(path)
    torch.save(clip.state_dict(), path)
    logger.info("trained %s for %d steps in %.1f s (last loss %.3f) -> %s", TINY_MODEL, steps,
                time.perf_counter() - started, float(loss.detach()), path)
    return path


_BUILT: dict[str, str] = {}


def pretrained_clip_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Location of a ``smpp-tiny-clip`` checkpoint file with a learned alignment, trained once per
    test run however many modules ask (wrap it in a session fixture:
    ``def pretrained_clip(tmp_path_factory): return pretrained_clip_file(tmp_path_factory)``)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = str(train_tiny_clip(tmp_path_factory.mktemp("pretrained_clip") / "tiny-clip.pt"))
    return _BUILT[key]
