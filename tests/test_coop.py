"""The method on a CLIP that has learned something: CoOp's zero-shot start, both hierarchy levels.

The backbone is the tiny open_clip model trained contrastively on synthetic captioned shapes
(:mod:`pretrained_clip`, built once per run) and loaded through ``model.pretrained`` from a
local checkpoint file, as a real pretrained CLIP would be.
"""

from __future__ import annotations

import logging

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from pretrained_clip import TAXONOMY, captions, pretrained_clip_file, render

from smpp_ray.config import ModelConfig
from smpp_ray.features.network import NetworkFeatureExtractor
from smpp_ray.model.backbone import TINY_MODEL, create_backbone
from smpp_ray.model.model import create_model
from smpp_ray.model.prototypes import compute_prototypes

logger = logging.getLogger(__name__)

NUM_CLASSES = TAXONOMY.num_subcategories
CHANCE = 1 / NUM_CLASSES
HELD_OUT_SEED = 987_654  # the fixture trains on images drawn with seed 0
COOP = {"use_prototypes": False, "ctx_init": "a photo of a", "n_ctx": 4, "global_head": "coop"}


@pytest.fixture(scope="session")
def pretrained_clip(tmp_path_factory) -> str:
    return pretrained_clip_file(tmp_path_factory)


@pytest.fixture(scope="module")
def held_out():
    """Held-out images (20 per class), their class ids and any post text."""
    classes = np.repeat(np.arange(NUM_CLASSES), 20)
    pixels = render(classes, seed=HELD_OUT_SEED)
    return pixels, torch.from_numpy(classes), captions(classes, seed=HELD_OUT_SEED)


def _zero_shot_model(pretrained: str):
    torch.manual_seed(0)
    return create_model(ModelConfig(pretrained=pretrained, **COOP), TAXONOMY, None).eval()


def _accuracy(logits: torch.Tensor, classes: torch.Tensor) -> float:
    return float((logits.argmax(-1) == classes).float().mean())


def test_pretrained_loads_a_local_checkpoint_file(pretrained_clip):
    backbone = create_backbone(TINY_MODEL, pretrained_clip)
    assert not backbone.randomly_initialised and backbone.pretrained == pretrained_clip
    saved = torch.load(pretrained_clip, weights_only=True)
    loaded = backbone.clip.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert backbone.logit_scale == pytest.approx(float(saved["logit_scale"].exp()))
    assert not any(p.requires_grad for p in backbone.parameters())


def test_untrained_global_head_reproduces_open_clip_zero_shot(pretrained_clip, held_out):
    pixels, classes, texts = held_out
    model = _zero_shot_model(pretrained_clip)
    reference = open_clip.create_model(TINY_MODEL, pretrained=pretrained_clip, weights_only=True).eval()
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    prompts = [f"a photo of a {name}." for name in TAXONOMY.subcategories]
    with torch.no_grad():
        out = model(pixels, model.backbone.tokenize(texts))
        image = F.normalize(reference.encode_image(pixels), dim=-1)
        text = F.normalize(reference.encode_text(tokenizer(prompts)), dim=-1)
        zero_shot = reference.logit_scale.exp() * image @ text.t()  # open_clip's zero-shot classifier
    torch.testing.assert_close(out["logits_global"], zero_shot, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        direct = model.head_sub(out["fused"])
    torch.testing.assert_close(out["logits_sub"], direct + out["logits_global"])
    accuracy = _accuracy(out["logits_global"], classes)
    logger.info("zero-shot top-1 of the pretrained fixture: %.3f (chance %.3f; with the untrained "
                "fused head added: %.3f)", accuracy, CHANCE, _accuracy(out["logits_sub"], classes))
    assert accuracy >= 4 * CHANCE


def test_random_backbone_is_not_above_chance(held_out):
    pixels, classes, texts = held_out
    model = _zero_shot_model("")
    assert model.backbone.randomly_initialised
    with torch.no_grad():
        out = model(pixels, model.backbone.tokenize(texts))
    accuracy = _accuracy(out["logits_global"], classes)
    logger.info("zero-shot top-1 of the random backbone: %.3f (chance %.3f)", accuracy, CHANCE)
    assert accuracy <= 2 * CHANCE


def _embed(backbone, pixels: torch.Tensor, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        image = F.normalize(backbone.encode_image(pixels)[0], dim=-1)
        text = backbone.encode_text(backbone.tokenize(texts), normalize=True)
    return image.numpy(), text.numpy()


@pytest.fixture(scope="module")
def bank_and_members(pretrained_clip):
    """A prototype bank from pretrained embeddings of 16 posts per class, and its members record."""
    classes = np.repeat(np.arange(NUM_CLASSES), 16)
    backbone = create_backbone(TINY_MODEL, pretrained_clip)
    texts = captions(classes, seed=5)
    image, text = _embed(backbone, render(classes, seed=5), texts)
    rows = {"pid": np.array([f"p{i}" for i in range(len(classes))], dtype=object),
            "uid": np.array([f"u{i % 7}" for i in range(len(classes))], dtype=object),
            "postdate": np.arange(len(classes), dtype=np.int64) * 3600,
            "subcategory_id": classes, "category_id": np.asarray(TAXONOMY.parents)[classes],
            "image_emb": image, "text_emb": text}
    bank, members = compute_prototypes(rows, TAXONOMY, shots=6, time_buckets=2, seed=0, embed_dim=64,
                                       metadata={"backbone": TINY_MODEL, "pretrained": pretrained_clip})
    return bank, members, {"classes": classes, "texts": texts}


def test_each_prototype_is_the_normalised_mean_of_its_members(pretrained_clip, bank_and_members):
    """Recomputed from scratch: the members' images rendered and embedded again, one by one."""
    bank, members, posts = bank_and_members
    backbone = create_backbone(TINY_MODEL, pretrained_clip)
    index = {f"p{i}": i for i in range(len(posts["classes"]))}
    for record in members["classes"]:
        ids = np.array([index[pid] for pid in record["pids"]])
        assert len(ids) == min(6, record["available"]) > 0
        wanted = (posts["classes"][ids] if record["level"] == "subcategory"
                  else np.asarray(TAXONOMY.parents)[posts["classes"][ids]])
        assert (wanted == record["id"]).all(), record["name"]
        pixels = render(posts["classes"], seed=5)[torch.from_numpy(ids)]
        image, text = _embed(backbone, pixels, [posts["texts"][i] for i in ids])
        for kind, embeddings in (("visual", image), ("textual", text)):
            expected = F.normalize(torch.from_numpy(embeddings).mean(0), dim=0)
            torch.testing.assert_close(bank.normalized(kind)[record["row"]], expected, rtol=1e-5, atol=1e-5)


def _save_checkpoint(directory, pretrained: str, bank) -> str:
    from smpp_ray.model.checkpoint import save_checkpoint

    bank_path = str(directory / "bank.safetensors")
    bank.save(bank_path)
    config = ModelConfig(pretrained=pretrained, global_head="both")
    torch.manual_seed(0)
    model = create_model(config, TAXONOMY, bank_path)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking trainable values
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = save_checkpoint(directory / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler,
                           model_config=config, taxonomy=TAXONOMY, prototypes_path=bank_path,
                           metrics={"val_top1": 0.0}, state={"epoch": 0})
    return str(path), model


def test_extracted_category_is_the_parent_of_the_extracted_subcategory(pretrained_clip, bank_and_members,
                                                                       held_out, tmp_path):
    pixels, _, texts = held_out
    bank, _, _ = bank_and_members
    checkpoint, model = _save_checkpoint(tmp_path, pretrained_clip, bank)
    extractor = NetworkFeatureExtractor(checkpoint, device="cpu")
    tokens = extractor.model.backbone.tokenize(texts)
    features = extractor({"pid": np.arange(len(texts)).astype(str), "pixels": pixels.numpy(),
                          "tokens": tokens.numpy()})
    parents = np.asarray(TAXONOMY.parents)
    assert (parents[features["pred_subcategory"]] == features["pred_category"]).all()
    assert (features["pred_subcategory"] == features["prob_sub"].argmax(1)).all()
    children_sum = np.stack([features["prob_sub"][:, parents == c].sum(1) for c in range(TAXONOMY.num_categories)], 1)
    np.testing.assert_allclose(features["prob_cat"], children_sum, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the reloaded checkpoint is the saved model
        expected = model.eval()(pixels, tokens)["logits_sub"]
    np.testing.assert_allclose(features["prob_sub"], torch.softmax(expected, -1).numpy(), rtol=1e-5, atol=1e-6)
