"""The open_clip boundary: packaged tiny model, weights rules, text/image parity, freezing."""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch

from smpp_ray.model.backbone import TINY_MODEL, Backbone, create_backbone

TEXTS = ["a photo of a dog", "", "sunset over the sea #beach #travel " * 10, "ÄÖ émoji 📷 text"]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return create_backbone(TINY_MODEL)


def test_tiny_model_is_registered_from_the_package_json():
    assert TINY_MODEL in open_clip.list_models()
    config = open_clip.get_model_config(TINY_MODEL)
    assert config["embed_dim"] == 64 and config["text_cfg"]["context_length"] == 32


def test_text_path_from_embeddings_equals_open_clip_encode_text(backbone):
    tokens = backbone.tokenize(TEXTS)
    assert tokens.shape == (len(TEXTS), backbone.context_length) and tokens.dtype == torch.int64
    with torch.no_grad():
        ours = backbone.encode_text_embeddings(backbone.token_embedding(tokens), tokens)
        reference = backbone.clip.encode_text(tokens)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert ours.shape == (len(TEXTS), backbone.embed_dim)


def test_text_tokens_output_pools_to_the_end_of_text_position(backbone):
    tokens = backbone.tokenize(TEXTS)
    with torch.no_grad():
        pooled, per_token = backbone.encode_text_embeddings(backbone.token_embedding(tokens), tokens, return_tokens=True)
    assert per_token.shape == (len(TEXTS), backbone.context_length, backbone.embed_dim)
    eot = tokens.argmax(dim=-1)
    torch.testing.assert_close(per_token[torch.arange(len(TEXTS)), eot], pooled)


def test_text_parity_holds_for_a_custom_text_tower():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        clip = open_clip.create_model(TINY_MODEL, pretrained=None, force_custom_text=True)
    assert hasattr(clip, "text")
    custom = Backbone(clip.eval(), TINY_MODEL, "", True)
    tokens = custom.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(custom.encode_text(tokens), clip.encode_text(tokens), rtol=0, atol=1e-6)


def test_image_path_returns_open_clip_pooled_embedding_and_projected_patches(backbone):
    pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        pooled, patches = backbone.encode_image(pixels)
        reference = backbone.clip.encode_image(pixels)
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)
    assert patches.shape == (2, backbone.num_patches, backbone.embed_dim) and backbone.num_patches == 16


def test_random_init_only_for_the_tiny_model_is_seeded_and_logged(caplog, monkeypatch):
    from smpp_ray.model import backbone as backbone_module

    monkeypatch.setattr(backbone_module, "_RANDOM_INIT_WARNED", set())  # as in a fresh process
    with caplog.at_level(logging.INFO):
        first = create_backbone(TINY_MODEL)
        second = create_backbone(TINY_MODEL)
    assert first.randomly_initialised
    ours = [r for r in caplog.records if "randomly initialised" in r.getMessage()]
    # A warning (with what to do) once per process; later loads say it in the log file only.
    assert [(r.name, r.levelno) for r in ours] == [("smpp_ray.model.backbone", logging.WARNING),
                                                   ("smpp.details.smpp_ray.model.backbone", logging.INFO)]
    assert "set model.pretrained" in ours[0].getMessage()
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_other_models_need_weights_and_missing_checkpoints_are_named(tmp_path):
    with pytest.raises(ValueError, match="needs pretrained weights.*ViT-B-16|ViT-B-16.*needs pretrained"):
        create_backbone("ViT-B-16", "")
    missing = str(tmp_path / "nope" / "vit.pt")
    with pytest.raises(ValueError, match="nope/vit.pt"):
        create_backbone("ViT-B-16", missing)
    with pytest.raises(ValueError, match="unknown backbone 'no-such-model'"):
        create_backbone("no-such-model")


def test_local_checkpoint_file_is_loaded(tmp_path, backbone):
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in backbone.clip.state_dict().items()}
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    loaded = create_backbone(TINY_MODEL, str(path))
    assert not loaded.randomly_initialised
    torch.testing.assert_close(loaded.clip.visual.proj, state["visual.proj"])


def test_towers_are_frozen_unless_blocks_are_unfrozen(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    assert backbone.image_tower_frozen
    partly = create_backbone(TINY_MODEL, unfreeze_image_blocks=1, unfreeze_text_blocks=1)
    trainable = {n for n, p in partly.named_parameters() if p.requires_grad}
    assert trainable and not partly.image_tower_frozen
    assert all(n.startswith(("clip.visual.transformer.resblocks.1.", "clip.visual.ln_post", "clip.visual.proj",
                             "clip.transformer.resblocks.1.", "clip.ln_final", "clip.text_projection"))
               for n in trainable), trainable
    assert "clip.text_projection" in trainable and "clip.visual.proj" in trainable
    assert not any("resblocks.0." in n for n in trainable)
    with pytest.raises(ValueError, match="unfreeze_text_blocks=3"):
        create_backbone(TINY_MODEL, unfreeze_text_blocks=3)


def test_shorter_context_length_truncates_and_keeps_end_of_text():
    short = create_backbone(TINY_MODEL, context_length=8)
    tokens = short.tokenize([TEXTS[2]])
    assert tokens.shape == (1, 8) and int(tokens[0, -1]) == short.eot_token_id
    with torch.no_grad():
        assert short.encode_text(tokens).shape == (1, short.embed_dim)
    with pytest.raises(ValueError, match="context_length 64"):
        create_backbone(TINY_MODEL, context_length=64)


def test_checkpoint_in_s3_loads_once_per_node_like_the_local_file(tmp_path, monkeypatch, backbone, s3_bucket):
    from smpp_ray import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    state = {k: v - 0.25 if v.is_floating_point() else v for k, v in backbone.clip.state_dict().items()}
    local = tmp_path / "tiny.pt"
    torch.save(state, local)
    remote = storage.copy_file(str(local), f"{s3_bucket}/weights/tiny.pt")
    from_local, from_s3 = create_backbone(TINY_MODEL, str(local)), create_backbone(TINY_MODEL, remote)
    assert not from_s3.randomly_initialised and from_s3.pretrained == remote
    for (name, a), b in zip(from_local.state_dict().items(), from_s3.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(from_s3.clip.visual.proj, state["visual.proj"])
    cached = storage.list_files(str(tmp_path / "cache"))
    assert [storage.name(c) for c in cached] == ["tiny.pt"]  # fetched once into the node cache
    create_backbone(TINY_MODEL, remote)
    assert storage.list_files(str(tmp_path / "cache")) == cached  # and reused, not fetched again
    with pytest.raises(ValueError, match=f"{s3_bucket}/weights/missing.pt"):
        create_backbone(TINY_MODEL, f"{s3_bucket}/weights/missing.pt")
