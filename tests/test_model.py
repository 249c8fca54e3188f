"""The SMPP network on the tiny backbone: outputs, gradients, checkpoints, ablations, overfit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from smpp_ray.config import ModelConfig
from smpp_ray.data.schema import Taxonomy
from smpp_ray.model.backbone import TINY_MODEL, create_backbone
from smpp_ray.model.losses import compute_losses
from smpp_ray.model.model import SMPPModel, create_model
from smpp_ray.model.prototypes import PrototypeBank

NUM_SUB, NUM_CAT = 77, 11
TAXONOMY = Taxonomy(tuple(f"category {c}" for c in range(NUM_CAT)),
                    tuple(f"sub_{s}" for s in range(NUM_SUB)), tuple(s % NUM_CAT for s in range(NUM_SUB)))
CONTRACT_KEYS = {"logits_sub", "logits_cat", "pred_subcategory", "pred_category", "fused", "image_embedding",
                 "text_embedding", "proto_sim_visual", "proto_sim_text", "local_feature"}
PROTOTYPE_TOKENS = ("visual_prototype_sub", "textual_prototype_sub", "visual_prototype_cat", "textual_prototype_cat")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_bank(seed: int = 0, backbone: str = TINY_MODEL) -> PrototypeBank:
    g = torch.Generator().manual_seed(seed)
    return PrototypeBank(torch.randn(88, 64, generator=g), torch.randn(88, 64, generator=g),
                         torch.full((88,), 4), NUM_SUB, {"backbone": backbone})


@pytest.fixture(scope="module")
def proto_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("proto") / "prototypes.safetensors")
    make_bank().save(path)
    return path


@pytest.fixture(scope="module")
def batch():
    backbone = create_backbone(TINY_MODEL)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(4, 3, 64, 64, generator=g)
    tokens = backbone.tokenize(["red car on a road", "", "sunset " * 40, "cat"])
    return pixels, tokens, torch.tensor([0, 5, 12, 76]), torch.tensor([0, 5, 1, 10])


def build(proto_path: str | None, **changes) -> SMPPModel:
    torch.manual_seed(0)
    return create_model(ModelConfig(**changes), TAXONOMY, proto_path)


def test_forward_keys_and_shapes(proto_path, batch):
    pixels, tokens, _, _ = batch
    model = build(proto_path, direct_regression=True)
    for size in (1, 4):
        out = model(pixels[:size], tokens[:size])
        assert CONTRACT_KEYS | {"regression"} <= set(out)
        assert out["logits_sub"].shape == out["logits_global"].shape == (size, NUM_SUB)
        assert out["logits_cat"].shape == (size, NUM_CAT)
        assert out["pred_subcategory"].shape == out["pred_category"].shape == (size,)
        assert out["proto_sim_visual"].shape == out["proto_sim_text"].shape == (size, NUM_SUB + NUM_CAT)
        for key in ("fused", "image_embedding", "text_embedding", "local_feature"):
            assert out[key].shape == (size, 64), key
        assert out["regression"].shape == (size,)
        torch.testing.assert_close(out["image_embedding"].norm(dim=-1), torch.ones(size))


def test_category_is_the_sum_of_its_children_and_agrees_with_the_subcategory(proto_path):
    """No category head of its own: P(category) = sum of its children's P(subcategory), and the
    predicted category is the predicted subcategory's parent on every row."""
    model = build(proto_path)
    assert not any("head_cat" in name for name, _ in model.named_parameters())
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(32, 3, 64, 64, generator=g)
    tokens = model.backbone.tokenize([f"post {i} about {i % 5} things" for i in range(32)])
    with torch.no_grad():
        out = model(pixels, tokens)
    prob_sub, prob_cat = torch.softmax(out["logits_sub"], -1), torch.softmax(out["logits_cat"], -1)
    parents = torch.tensor(TAXONOMY.parents)
    for c in range(NUM_CAT):
        torch.testing.assert_close(prob_cat[:, c], prob_sub[:, parents == c].sum(-1))
        torch.testing.assert_close(out["logits_cat"][:, c], torch.logsumexp(out["logits_sub"][:, parents == c], -1))
    assert torch.equal(out["pred_subcategory"], out["logits_sub"].argmax(-1))
    assert torch.equal(out["pred_category"], parents[out["logits_sub"].argmax(-1)])


def test_a_childless_category_has_probability_zero_and_finite_losses():
    taxonomy = Taxonomy(("empty", "a", "b"), ("x", "y", "z"), (1, 2, 2))
    model = SMPPModel(ModelConfig(use_prototypes=False), taxonomy, create_backbone(TINY_MODEL))
    out = model(torch.randn(2, 3, 64, 64), model.backbone.tokenize(["one", "two"]))
    assert torch.equal(torch.softmax(out["logits_cat"], -1)[:, 0], torch.zeros(2))
    losses = model.compute_losses(out, torch.tensor([0, -1]), torch.tensor([-1, 2]))  # row 0: no category
    assert torch.isfinite(losses["loss"]) and float(losses["ce_cat"].detach()) > 0
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters() if p.grad is not None)


def test_image_features_argument_skips_the_image_tower(proto_path, batch):
    pixels, tokens, _, _ = batch
    model = build(proto_path)
    with torch.no_grad():
        full = model(pixels, tokens)
        cached = model(None, tokens, image_features=model.backbone.encode_image(pixels))
    torch.testing.assert_close(full["logits_sub"], cached["logits_sub"])


@pytest.mark.parametrize("global_head", ["coop", "both"])
def test_one_step_updates_every_trainable_parameter_and_no_frozen_one(proto_path, batch, global_head):
    pixels, tokens, sub, cat = batch
    model = build(proto_path, direct_regression=True, weight_regression=1.0, global_head=global_head)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(frozen_before) > 0 and len(trainable_before) > 10
    out = model(pixels, tokens)
    model.compute_losses(out, sub, cat, torch.tensor([1.0, 2.0, 3.0, 4.0]))["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert no_grad == []
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, trainable_before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, frozen_before[name]), f"frozen {name} changed"


def test_checkpoint_holds_exactly_the_trainable_parameters_and_reloads(proto_path, batch, tmp_path):
    pixels, tokens, sub, cat = batch
    model = build(proto_path)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model.compute_losses(model(pixels, tokens), sub, cat)["loss"].backward()
        optimizer.step()
    state = model.trainable_state_dict()
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.startswith("backbone.") or k.startswith("bank.") for k in state)
    torch.save(state, tmp_path / "trainable.pt")
    torch.manual_seed(123)  # a different init that the load must overwrite
    fresh = create_model(ModelConfig(), TAXONOMY, proto_path)
    fresh.load_trainable_state_dict(torch.load(tmp_path / "trainable.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(model(pixels, tokens)["logits_sub"], fresh(pixels, tokens)["logits_sub"])
    other = build(None, use_prototypes=False)
    with pytest.raises(ValueError, match="unexpected.*log_scale_prototype"):
        other.load_trainable_state_dict(state)


def test_model_is_deterministic_given_a_seed(proto_path, batch):
    pixels, tokens, _, _ = batch
    with torch.no_grad():
        assert torch.equal(build(proto_path)(pixels, tokens)["fused"], build(proto_path)(pixels, tokens)["fused"])


def test_prototypes_off_ignores_the_bank_in_the_prediction(proto_path, batch, tmp_path):
    pixels, tokens, sub, cat = batch
    other_path = str(tmp_path / "other.safetensors")
    make_bank(seed=9).save(other_path)
    with torch.no_grad():
        off_a = build(proto_path, use_prototypes=False)(pixels, tokens)
        off_b = build(other_path, use_prototypes=False)(pixels, tokens)
        on_a = build(proto_path)(pixels, tokens)
        on_b = build(other_path)(pixels, tokens)
    assert torch.equal(off_a["logits_sub"], off_b["logits_sub"])
    assert not torch.allclose(on_a["logits_sub"], on_b["logits_sub"])
    assert not torch.allclose(off_a["proto_sim_visual"], off_b["proto_sim_visual"])  # still features
    assert "proto_align_sub" not in off_a
    assert float(compute_losses(off_a, sub, cat)["prototype"]) == 0.0
    no_bank = build(None, use_prototypes=False)(pixels, tokens)
    assert torch.equal(no_bank["proto_sim_visual"], torch.zeros(4, 88))
    with pytest.raises(ValueError, match="use_prototypes"):
        build(None)


def test_bank_from_another_backbone_is_rejected(tmp_path):
    path = str(tmp_path / "vit.safetensors")
    make_bank(backbone="ViT-B-16").save(path)
    with pytest.raises(ValueError, match="built with backbone 'ViT-B-16'"):
        build(path)


def test_global_prompts_off_leaves_only_the_direct_head(proto_path, batch):
    pixels, tokens, _, _ = batch
    model = build(proto_path, use_global_prompts=False)
    assert model.global_prompts is None and not any("global" in n for n in model.trainable_state_dict())
    with torch.no_grad():
        out = model(pixels, tokens)
        torch.testing.assert_close(out["logits_sub"], model.head_sub(out["fused"]))
    assert "logits_global" not in out


@pytest.mark.parametrize("global_head", ["coop", "fused", "both"])
def test_global_head_scores_class_text_against_the_configured_vectors(proto_path, batch, global_head):
    """coop: CLIP's image embedding with CLIP's temperature; fused: the fused vector; both: the sum."""
    pixels, tokens, _, _ = batch
    model = build(proto_path, global_head=global_head)
    keys = {n for n in model.trainable_state_dict() if n.startswith("log_scale_global")}
    expected_keys = {"coop": {"log_scale_global"}, "fused": {"log_scale_global_fused"},
                     "both": {"log_scale_global", "log_scale_global_fused"}}[global_head]
    assert keys == expected_keys
    if "log_scale_global" in keys:
        assert float(model.log_scale_global.detach().exp()) == pytest.approx(model.backbone.logit_scale)
    with torch.no_grad():
        out = model(pixels, tokens)
        class_text = model.global_prompts(model.backbone)  # (S, D)
        image = torch.nn.functional.normalize(model.backbone.encode_image(pixels)[0], dim=-1)
        fused = torch.nn.functional.normalize(out["fused"], dim=-1)
        expected = torch.zeros(4, NUM_SUB)
        if global_head in ("coop", "both"):
            expected += model.log_scale_global.exp() * image @ class_text.t()
        if global_head in ("fused", "both"):
            expected += model.log_scale_global_fused.exp() * fused @ class_text.t()
        torch.testing.assert_close(out["logits_global"], expected)
        torch.testing.assert_close(out["logits_sub"], model.head_sub(out["fused"]) + expected)


def test_global_head_is_validated():
    with pytest.raises(ValueError, match="global_head 'image'"):
        ModelConfig(global_head="image")


def test_category_prototypes_are_fusion_tokens(proto_path, batch, tmp_path):
    """A bank that differs only in its category rows changes the fused vector (both levels are
    tokens of the attention), with prototypes on; the soft mixtures use no label."""
    pixels, tokens, _, _ = batch
    bank = PrototypeBank.load(proto_path)
    other = PrototypeBank(bank.visual.clone(), bank.textual.clone(), bank.counts, NUM_SUB, bank.metadata)
    other.visual[NUM_SUB:] = torch.randn(NUM_CAT, 64)
    other_path = str(tmp_path / "other_categories.safetensors")
    other.save(other_path)
    model = build(proto_path)
    assert set(PROTOTYPE_TOKENS) <= set(model.modalities) == set(model.fusion.modalities)
    with torch.no_grad():
        a, b = model(pixels, tokens), build(other_path)(pixels, tokens)
    assert not torch.allclose(a["fused"], b["fused"])
    torch.testing.assert_close(a["proto_sim_visual"][:, :NUM_SUB], b["proto_sim_visual"][:, :NUM_SUB])


def test_local_prompts_off_uses_the_plain_text_embedding(proto_path, batch):
    pixels, tokens, _, _ = batch
    model = build(proto_path, use_local_prompts=False)
    assert model.local_prompts is None and "local" not in model.modalities
    with torch.no_grad():
        out = model(pixels, tokens)
        plain = model.backbone.encode_text(tokens, normalize=True)
    torch.testing.assert_close(out["text_embedding"], plain)
    assert torch.equal(out["local_feature"], torch.zeros(4, 64))
    with torch.no_grad():
        on = build(proto_path)(pixels, tokens)
    assert not torch.allclose(on["text_embedding"], plain)  # the learnable tokens change the text path


def test_fusion_off_averages_the_tokens(proto_path, batch):
    """The fused vector is the plain mean of image, text, local feature and the four soft
    prototypes (each level's rows weighted by a softmax over the post's own similarities)."""
    pixels, tokens, _, _ = batch
    model = build(proto_path, use_fusion=False)
    assert model.fusion is None and not any(k.startswith("fusion.") for k in model.trainable_state_dict())
    assert model.modalities == ("image", "text", "local") + PROTOTYPE_TOKENS
    with torch.no_grad():
        out = model(pixels, tokens)
    bank, scale = make_bank(), float(model.log_scale_prototype.detach().exp())
    visual = torch.nn.functional.normalize(bank.visual, dim=-1)
    textual = torch.nn.functional.normalize(bank.textual, dim=-1)
    prototypes = []
    for rows in (slice(0, NUM_SUB), slice(NUM_SUB, None)):
        weights = torch.softmax(scale * (out["proto_sim_visual"][:, rows] + out["proto_sim_text"][:, rows]) / 2, -1)
        prototypes += [weights @ visual[rows], weights @ textual[rows]]
    tokens_in = [out["image_embedding"], out["text_embedding"], out["local_feature"], *prototypes]
    torch.testing.assert_close(out["fused"], torch.stack(tokens_in).mean(0))
    assert not torch.allclose(out["fused"], out["image_embedding"])


def test_direct_regression_head_and_loss(proto_path, batch):
    pixels, tokens, sub, cat = batch
    plain = build(proto_path)
    assert "regression" not in plain(pixels, tokens)
    model = build(proto_path, direct_regression=True, weight_regression=2.0)
    out = model(pixels, tokens)
    label = torch.tensor([1.0, float("nan"), 3.0, 4.0])
    losses = model.compute_losses(out, sub, cat, label, reduction="none")
    expected = (out["regression"] - torch.nan_to_num(label)) ** 2 * torch.isfinite(label)
    torch.testing.assert_close(losses["regression"], expected)


def test_losses_per_sample_and_ignored_labels(proto_path, batch):
    pixels, tokens, sub, cat = batch
    model = build(proto_path)
    out = model(pixels, tokens)
    none = model.compute_losses(out, torch.tensor([0, -1, 12, 76]), cat, reduction="none")
    assert none["loss"].shape == (4,) and float(none["ce_sub"][1].detach()) == 0.0
    mean = model.compute_losses(out, sub, cat)
    torch.testing.assert_close(mean["loss"], model.compute_losses(out, sub, cat, reduction="none")["loss"].mean())
    with pytest.raises(ValueError, match="reduction 'sum'"):
        model.compute_losses(out, sub, cat, reduction="sum")


def _synthetic_posts(backbone, n: int = 64, classes: int = 8, seed: int = 0):
    """Posts whose image colour and title words depend on the class (a learnable proxy task)."""
    rng = np.random.default_rng(seed)
    subs = np.arange(n) % classes
    words = ["beach", "city", "food", "dog", "car", "flower", "snow", "concert"]
    pixels = torch.empty(n, 3, 64, 64)
    texts = []
    for i, s in enumerate(subs):
        colour = torch.tensor([(s * 37 % 255) / 255, (s * 91 % 255) / 255, (s * 53 % 255) / 255]).view(3, 1, 1)
        pixels[i] = colour * 4 - 2 + 0.5 * torch.from_numpy(rng.standard_normal((3, 64, 64))).float()
        texts.append(f"{words[s]} {rng.choice(words)} photo {i}")
    return pixels, backbone.tokenize(texts), torch.from_numpy(subs).long()


def test_full_model_overfits_a_small_fixed_batch(proto_path):
    model = build(proto_path)
    pixels, tokens, sub = _synthetic_posts(model.backbone, n=64)
    cat = torch.tensor([TAXONOMY.parents[s] for s in sub])
    with torch.no_grad():
        image_features = model.backbone.encode_image(pixels)  # frozen tower: cache once
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        optimizer.zero_grad()
        out = model(None, tokens, image_features=image_features)
        loss = model.compute_losses(out, sub, cat)["loss"]
        loss.backward()
        optimizer.step()
        first = float(loss.detach()) if first is None else first
    with torch.no_grad():
        out = model(None, tokens, image_features=image_features)
    accuracy = float((out["logits_sub"].argmax(-1) == sub).float().mean())
    assert float(loss.detach()) < 0.5 * first
    assert accuracy >= 0.95


def test_config_switches_map_to_modules():
    config = dataclasses.replace(ModelConfig(), n_ctx=2, ctx_init="a photo")
    backbone = create_backbone(TINY_MODEL)
    model = SMPPModel(dataclasses.replace(config, use_prototypes=False), TAXONOMY, backbone)
    assert model.global_prompts.ctx.shape == (2, backbone.text_width)
    csc = SMPPModel(dataclasses.replace(config, use_prototypes=False, class_specific_ctx=True), TAXONOMY, backbone)
    assert csc.global_prompts.ctx.shape == (NUM_SUB, 2, backbone.text_width)
    with pytest.raises(ValueError, match="tokenises to"):
        SMPPModel(dataclasses.replace(config, use_prototypes=False, ctx_init="a zxqvj"), TAXONOMY, backbone)
